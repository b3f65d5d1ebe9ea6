"""Time one full training step (forward, backward, AdamW update) of jaxformers against transformers'
PyTorch BertForSequenceClassification at the same configuration on this CPU.

  python benchmarks/train_step.py                       # BERT-base, batch 8 x 128, float32, ratio vs PyTorch
  python benchmarks/train_step.py --table               # + step time and memory per layout at 128 and 512
  python benchmarks/train_step.py --dtypes float32 bfloat16 --no-compile   # + bfloat16: mixed precision both sides

Each peer lives in its own worker process (so neither framework's thread pool competes with the
other's), and the runs are interleaved (JAX, PyTorch, torch.compile, JAX, ...): the medians are
compared. Both sides use the same dropout (0.1), thread count, batch, and AdamW; PyTorch keeps
its default SDPA attention. bfloat16 is mixed precision on both sides: jaxformers ``dtype="bfloat16"``
(float32 parameters and optimizer, bfloat16 matmuls), PyTorch ``torch.autocast("cpu", dtype=torch.bfloat16)``
around the forward pass (float32 parameters). With several ``--dtypes`` all peers are interleaved.
Memory: each worker's peak RSS (for JAX it includes XLA's compiler);
the layout table gives XLA's compiled memory analysis (arguments + outputs + temporaries).
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine, table  # noqa: E402


def parse():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--length", type=int, default=128)
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (medians over these)")
  p.add_argument("--steps", type=int, default=3, help="steps timed per round")
  p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
  p.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                 help="compute dtypes (bfloat16: jaxformers dtype=bfloat16, PyTorch autocast)")
  p.add_argument("--table", action="store_true", help="also time each block layout at 128 and 512")
  p.add_argument("--table-repeats", type=int, default=2, help="steps timed per layout in the table (median)")
  p.add_argument("--table-only", action="store_true", help="skip the PyTorch comparison")
  return p.parse_args()


def jax_step(layout: str, batch: int, length: int, layers_hidden=(768, 12, 3072), dtype: str = "float32"):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx
  from jaxformers import models
  from jaxformers.config import EncoderConfig
  from jaxformers.train import steps
  from jaxformers.train.defaults import base_config
  from jaxformers.train.tasks import make_task

  hidden, heads, inter = layers_hidden
  cfg = EncoderConfig(vocab_size=30522, hidden_size=hidden, num_heads=heads, intermediate_size=inter,
                      max_position_embeddings=512, layout=layout, hidden_dropout=0.1, attention_dropout=0.1,
                      dtype=dtype)
  model = models.SequenceClassifier(cfg, num_labels=2, rngs=nnx.Rngs(params=0, dropout=1))
  model.train()
  gd, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adamw(2e-5, eps=1e-8, weight_decay=0.01)
  state = {"params": params, "opt_state": tx.init(params), "rngs": rest, "step": jnp.zeros((), jnp.int32)}
  fn = jax.jit(steps.make_train_step(gd, tx, lambda s: 2e-5, make_task(base_config())), donate_argnums=0)
  rng = np.random.default_rng(0)
  batch_d = {"input_ids": jnp.asarray(rng.integers(1000, 30000, (batch, length)), jnp.int32),
             "token_type_ids": jnp.zeros((batch, length), jnp.int32),
             "attention_mask": jnp.ones((batch, length), jnp.int32),
             "labels": jnp.asarray(rng.integers(0, 2, (batch,)), jnp.int32),
             "weights": jnp.ones((batch,), jnp.float32)}
  compiled = fn.lower(state, batch_d, {}).compile()
  mem = compiled.memory_analysis()
  peak = None
  if mem is not None:
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes) / 2**20
  box = {"state": state}

  def run(n):
    t = time.perf_counter()
    for _ in range(n):
      box["state"], m = compiled(box["state"], batch_d, {})
    jax.block_until_ready(m["loss"])
    return (time.perf_counter() - t) / n
  run(1)
  return run, peak


def torch_step(batch: int, length: int, compile_: bool, dtype: str = "float32"):
  import torch
  from transformers import BertConfig, BertForSequenceClassification
  cfg = BertConfig(num_labels=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
  model = BertForSequenceClassification(cfg)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=2e-5, eps=1e-8, weight_decay=0.01)
  g = torch.Generator().manual_seed(0)
  ids = torch.randint(1000, 30000, (batch, length), generator=g)
  mask = torch.ones(batch, length, dtype=torch.long)
  labels = torch.randint(0, 2, (batch,), generator=g)

  def step():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss
  if compile_:
    step = torch.compile(step)

  def run(n):
    t = time.perf_counter()
    for _ in range(n):
      step()
    return (time.perf_counter() - t) / n
  run(1)
  run(1)
  return run


def _peer(kind: str, dtype: str, a, conn) -> None:
  """Worker process: build one peer, then time ``n`` steps for every ``n`` received (None stops)."""
  if kind == "jaxformers":   # XLA:CPU uses one thread per core by default; --threads sets PyTorch's to match
    run = jax_step(f"serial*{a.layers}", a.batch, a.length, dtype=dtype)[0]
  else:
    import torch
    torch.set_num_threads(a.threads)
    try:
      run = torch_step(a.batch, a.length, compile_=kind == "torch.compile", dtype=dtype)
    except Exception as e:  # inductor needs a C++ compiler; report and go on
      conn.send(f"skipped: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
      return
  conn.send("ready")
  while (n := conn.recv()) is not None:
    conn.send(run(n))
  conn.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def compare(a) -> None:
  import multiprocessing as mp
  ctx = mp.get_context("spawn")
  print(f"BERT-base train step, batch {a.batch} x {a.length}, {' and '.join(a.dtypes)}, {a.threads} threads, "
        f"{a.repeats} interleaved rounds x {a.steps} steps, one worker process per peer")
  print(machine(a.threads), flush=True)
  peers = {}
  for dtype in a.dtypes:
    for kind in ("jaxformers", "torch (eager, SDPA)", "torch.compile")[:2 if a.no_compile else 3]:
      t = time.time()
      mine, theirs = ctx.Pipe()
      proc = ctx.Process(target=_peer, args=(kind, dtype, a, theirs), daemon=True)
      proc.start()
      msg = mine.recv()   # workers are built one at a time, so compile times do not overlap
      print(f"{kind} {dtype}: {msg} after {time.time() - t:.0f}s", flush=True)
      if msg == "ready":
        peers[(kind, dtype)] = (proc, mine)
  times = {k: [] for k in peers}
  for i in range(a.repeats):
    for k, (_, conn) in peers.items():
      conn.send(a.steps)
      times[k].append(conn.recv())
    print(f"round {i + 1}: " + "  ".join(f"{k} {d} {v[-1]:.3f}s" for (k, d), v in times.items()), flush=True)
  rss = {}
  for k, (proc, conn) in peers.items():
    conn.send(None)
    rss[k] = conn.recv()
    proc.join()
  tokens = a.batch * a.length
  rows = []
  for (k, d), ts in times.items():
    base = statistics.median(times[("jaxformers", d)])
    rows.append([k, d, f"{statistics.median(ts):.3f}", f"{tokens / statistics.median(ts):.0f}",
                 f"{statistics.median(ts) / base:.2f}x", f"{rss[(k, d)]:.0f}"])
  print(table(["peer", "dtype", "median s/step", "tokens/s", "jaxformers speed-up (same dtype)",
               "process peak RSS MiB"], rows))


def main():
  a = parse()
  if not a.table_only:
    compare(a)

  if a.table:
    from jaxformers.layout import fnet_hybrid_layout, par_layout
    n = a.layers
    layouts = {"serial (BERT)": f"serial*{n}", "parallel (PAF)": f"parallel*{n}", "Fourier (FNet)": f"fourier*{n}",
               "FNet-hybrid": fnet_hybrid_layout(n), "PAR": par_layout(n), "sparse (window 128)": f"sparse*{n}"}
    rows = []
    for length in (128, 512):
      for name, lay in layouts.items():
        fn, peak = jax_step(lay, a.batch, length)
        med = statistics.median(fn(1) for _ in range(a.table_repeats))
        rows.append([length, name, f"`{lay}`", f"{med:.2f}", f"{a.batch * length / med:.0f}", f"{peak:.0f}"])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
    print()
    print(table(["length", "layout", "string", "s/step", "tokens/s", "XLA peak MiB"], rows))


if __name__ == "__main__":
  main()
