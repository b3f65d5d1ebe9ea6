"""Architecture search study on the embedded default task: search, then train what it finds against the serial baseline.

  python benchmarks/search.py --out runs/search_study [--seeds 0,1,2] [--search-steps 80] [--train-steps 160]

Per seed: a search (configs/search.py's settings on a small encoder, ``--layout`` sublayers, FLOPs target
``--target``); the serial baseline is initialised once (seeded) and saved, and both the baseline and the found
layout are trained from that initialisation (the found layout re-arranged from it, the same sublayer mapping as
``init_from``) for the same steps on the same batches. Reported: found layout, FLOPs/token ratio (the cost model
of :mod:`jaxformers.search`), measured train-step time ratio (found / baseline: both compiled steps timed
interleaved on one fixed batch, medians), held-out accuracy of both, and the search's wall time against the
baseline's training wall time. The heat-map of the first seed is copied to ``--heatmap``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def config(seed: int, layout: str, search: bool, steps: int, args, init_from: str = "", tokenizer: str = ""):
  from jaxformers.train.defaults import base_config
  c = base_config()
  c.seed = seed
  c.init_from = init_from
  c.model.layout = layout
  c.model.hidden_size = args.hidden
  c.model.num_heads = 4
  c.model.intermediate_size = 4 * args.hidden
  c.model.max_position_embeddings = args.length + 2
  c.model.hidden_dropout = 0.0
  c.model.attention_dropout = 0.0
  c.data.source = "embedded"
  c.data.vocab_size = 4000
  c.data.max_length = args.length
  c.data.batch_size = 32
  c.data.tokenizer = tokenizer
  c.optim.lr = 2e-3
  c.optim.warmup_ratio = 0.1
  c.train.num_steps = steps
  c.train.eval_every = 0
  c.train.checkpoint_every = 100000
  c.train.log_every = 10
  c.train.progress = False
  c.train.async_checkpoint = False
  if search:
    s = c.search
    s.enabled = True
    s.target_flops_ratio = args.target
    s.warmup_steps = steps // 4
    s.arch_every = args.arch_every
    s.arch_lr = args.arch_lr
    s.heldout_batch_size = 16
  return c


def step_time_ratio(cfg_a, cfg_b, wd: Path, reps: int = 15) -> tuple[float, float, float]:
  """Median seconds of one train step of each model (interleaved on the same fixed batch) and their ratio b / a."""
  import jax
  import jax.numpy as jnp

  from jaxformers.data import batching
  from jaxformers.train import sharding
  from jaxformers.train.loop import Run
  prepared = []
  for i, c in enumerate((cfg_a, cfg_b)):
    r = Run(c, wd / f"probe{i}")
    tx, lr = r.task.optimizer(c, 100)
    # the trainer's state shardings in and out, so the step compiles once (not again for its own output's layout)
    abs_state = {"params": r.abs_params, "opt_state": jax.eval_shape(tx.init, r.abs_params), "rngs": r.abs_rest,
                 "step": jax.ShapeDtypeStruct((), jnp.int32)}
    state_sh = sharding.state_shardings(abs_state, r.param_sh, r.mesh)
    params, rest = r.init_params()
    opt_state = jax.jit(tx.init, in_shardings=(state_sh["params"],), out_shardings=state_sh["opt_state"])(params)
    state = {"params": params, "opt_state": opt_state, "rngs": rest,
             "step": jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(r.mesh))}
    step = jax.jit(r.task.make_train_step(r.gd_train, tx, lr, 1, r.max_segments),
                   in_shardings=(state_sh, r.task.batch_shardings(r.context), r.input_shardings()),
                   out_shardings=(state_sh, sharding.replicated(r.mesh)), donate_argnums=0)
    data = r.tokenized("train")
    b = batching.TrainBatches(data, c.data.batch_size, 0, r.max_length, r.special["pad"])
    b.buckets = b.buckets[-1:]
    batch = sharding.shard_batch(next(b), r.mesh)
    state, m = step(state, batch, r.inputs)
    jax.block_until_ready(m["loss"])
    prepared.append([step, state, batch, r.inputs])
  times = ([], [])
  for _ in range(reps):
    for k, p in enumerate(prepared):
      t0 = time.perf_counter()
      p[1], m = p[0](p[1], p[2], p[3])
      jax.block_until_ready(m["loss"])
      times[k].append(time.perf_counter() - t0)
  a, b = statistics.median(times[0]), statistics.median(times[1])
  return a, b, b / a


def save_init(c, out: Path, tokenizer_dir: Path) -> None:
  """The baseline's seeded initialisation as a native checkpoint (with the search's tokenizer)."""
  from flax import nnx

  from jaxformers.checkpoints.pretrained import save_pretrained
  from jaxformers.train.loop import Run
  r = Run(c, out.parent / "init_probe")
  params, rest = r.init_params()
  model = nnx.merge(r.gd_train, params, rest)
  save_pretrained(model, out, tokenizer=tokenizer_dir)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="runs/search_study")
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--layout", default="serial*4")
  ap.add_argument("--hidden", type=int, default=64)
  ap.add_argument("--length", type=int, default=64)
  ap.add_argument("--target", type=float, default=0.65)
  ap.add_argument("--search-steps", type=int, default=80)
  ap.add_argument("--train-steps", type=int, default=160)
  ap.add_argument("--arch-every", type=int, default=2)
  ap.add_argument("--arch-lr", type=float, default=0.15)
  ap.add_argument("--heatmap", default="")
  args = ap.parse_args(argv)
  import logging
  logging.basicConfig(level=logging.WARNING)

  from jaxformers.layout import parse_layout
  from jaxformers.train import run
  cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
  import os
  print(f"CPU: {cpu} ({os.cpu_count()} cores)", flush=True)
  out = Path(args.out)
  rows = []
  for seed in [int(s) for s in args.seeds.split(",")]:
    wd = out / f"seed{seed}"
    if wd.exists():
      shutil.rmtree(wd)
    s = run(config(seed, args.layout, True, args.search_steps, args), wd / "search")
    found = s["search"]["layout"]
    print(f"seed {seed}: found {found} in {s['wall_time_s']:.0f}s", flush=True)
    base_cfg = config(seed, args.layout, False, args.train_steps, args, tokenizer=str(wd / "search"))
    save_init(base_cfg, wd / "init", wd / "search")
    b = run(config(seed, "", False, args.train_steps, args, init_from=str(wd / "init")), wd / "baseline")
    f = run(config(seed, found, False, args.train_steps, args, init_from=str(wd / "init")), wd / "found")
    ta, tb, ratio = step_time_ratio(config(seed, args.layout, False, 10, args, tokenizer=str(wd / "search")),
                                    config(seed, found, False, 10, args, tokenizer=str(wd / "search")), wd)
    row = {"seed": seed, "found": found, "found_blocks": len(parse_layout(found)),
           "flops_ratio": s["search"]["flops_ratio"], "step_s_baseline": ta, "step_s_found": tb,
           "step_time_ratio": ratio, "acc_baseline": b["eval"]["validation/accuracy"],
           "acc_found": f["eval"]["validation/accuracy"], "search_wall_s": s["wall_time_s"],
           "baseline_train_wall_s": b["wall_time_s"], "found_train_wall_s": f["wall_time_s"],
           "chosen": s["search"]["chosen"], "probabilities": s["search"]["probabilities"]}
    rows.append(row)
    print(json.dumps({k: v for k, v in row.items() if k != "probabilities"}), flush=True)
    if args.heatmap and seed == int(args.seeds.split(",")[0]) and (wd / "search" / "search_heatmap.png").is_file():
      Path(args.heatmap).parent.mkdir(parents=True, exist_ok=True)
      shutil.copyfile(wd / "search" / "search_heatmap.png", args.heatmap)
  (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
  print(f"\nCPU: {cpu}; source layout {args.layout} (sublayer positions: {2 * len(parse_layout(args.layout))}), "
        f"hidden {args.hidden}, length {args.length}, target FLOPs ratio {args.target}; search {args.search_steps} "
        f"steps (arch update every {args.arch_every}, arch lr {args.arch_lr}), training {args.train_steps} steps\n")
  print("| seed | found layout | FLOPs/token ratio | step time ratio | acc serial | acc found | search wall / "
        "baseline train wall |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['seed']} | `{r['found']}` | {r['flops_ratio']:.3f} | {r['step_time_ratio']:.3f} | "
          f"{100 * r['acc_baseline']:.1f}% | {100 * r['acc_found']:.1f}% | "
          f"{r['search_wall_s']:.0f}s / {r['baseline_train_wall_s']:.0f}s = "
          f"{r['search_wall_s'] / r['baseline_train_wall_s']:.2f} |")
  print(f"\nwrote {out / 'results.json'} (every seed's row); runs in {out}"
        + (f"; heat-map {args.heatmap}" if args.heatmap else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())
