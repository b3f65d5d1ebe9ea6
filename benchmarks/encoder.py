"""Encoder forward speed: jaxformers vs transformers' PyTorch BertModel, and block layouts vs serial.

    python benchmarks/encoder.py                     # BERT-base, batch 8, lengths 128 and 512
    python benchmarks/encoder.py --lengths 128 --repeats 5
    python benchmarks/encoder.py --lengths 512 --serial-only   # jaxformers serial vs PyTorch only

Both frameworks run float32 on the same number of CPU threads (PyTorch in inference
mode with its default SDPA attention); runs are interleaved and medians reported.
"""
from __future__ import annotations

import argparse
import os
import sys


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
  p.add_argument("--serial-only", action="store_true", help="time the serial layout only (no layout table)")
  args = p.parse_args()
  # XLA:CPU and PyTorch each use one thread per core by default; --threads sets PyTorch's count.

  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  sys.path.insert(0, os.path.dirname(__file__))
  from common import interleaved_medians, machine, table
  from jaxformers import EncoderConfig, models
  from jaxformers.layout import fnet_hybrid_layout, par_layout

  n = args.layers
  layouts = {"serial (BERT)": f"serial*{n}", "parallel (PAF)": f"parallel*{n}",
             "parallel, fused projections": f"parallel*{n}", "Fourier (FNet)": f"fourier*{n}",
             "FNet-hybrid": fnet_hybrid_layout(n), "PAR (attention in first 2/3)": par_layout(n)}
  base = EncoderConfig(vocab_size=30522, hidden_size=768, num_heads=12, intermediate_size=3072,
                       max_position_embeddings=512, hidden_dropout=0.0, attention_dropout=0.0)

  def jax_forward(layout: str, fuse: bool):
    model = models.Encoder(base.replace(layout=layout, fuse_projections=fuse), rngs=nnx.Rngs(0))
    model.eval()
    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, ids, mask):
      return nnx.merge(graphdef, state)(ids, mask).last_hidden_state
    return lambda ids, mask: fwd(state, ids, mask).block_until_ready()

  torch_fwd = None
  if not args.no_torch:
    import torch
    import transformers as T
    torch.set_num_threads(args.threads)
    tcfg = T.BertConfig(num_hidden_layers=n, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    tmodel = T.BertModel(tcfg, add_pooling_layer=False).eval()

    def torch_fwd(ids, mask):
      with torch.inference_mode():
        return tmodel(input_ids=ids, attention_mask=mask).last_hidden_state

  if args.serial_only:
    layouts = {"serial (BERT)": layouts["serial (BERT)"]}
  fns_by_layout = {name: jax_forward(lay, "fused" in name) for name, lay in layouts.items()}
  print(f"# encoder forward, batch {args.batch}, float32, {args.threads} threads, {n} layers, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}; medians of {args.repeats} interleaved runs")
  print(machine(args.threads) + "\n")
  rows, layout_rows = [], []
  for length in args.lengths:
    rng = np.random.default_rng(0)
    ids_np = rng.integers(1000, 30000, (args.batch, length)).astype(np.int32)
    mask_np = np.ones_like(ids_np)
    ids, mask = jnp.asarray(ids_np), jnp.asarray(mask_np)
    fns = {name: (lambda f=f: f(ids, mask)) for name, f in fns_by_layout.items()}
    if torch_fwd is not None:
      import torch
      tids, tmask = torch.tensor(ids_np, dtype=torch.long), torch.tensor(mask_np, dtype=torch.long)
      fns["PyTorch BertModel"] = lambda: torch_fwd(tids, tmask)
    med = interleaved_medians(fns, args.repeats)
    tokens = args.batch * length
    serial = med["serial (BERT)"]
    if torch_fwd is not None:
      pt = med["PyTorch BertModel"]
      rows.append([length, f"{tokens / serial:,.0f}", f"{tokens / pt:,.0f}", f"{pt / serial:.2f}x"])
    for name in layouts:
      layout_rows.append([length, name, layouts[name], f"{med[name] * 1e3:.1f}", f"{tokens / med[name]:,.0f}",
                          f"{serial / med[name]:.2f}x"])
  if rows:
    print(table(["length", "jaxformers serial tokens/s", "PyTorch tokens/s", "jaxformers / PyTorch"], rows))
    print()
  if not args.serial_only:
    print(table(["length", "layout", "string", "ms / batch", "tokens/s", "speed vs serial"],
                layout_rows))


if __name__ == "__main__":
  main()
