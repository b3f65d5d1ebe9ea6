"""Sparse (sliding window + global) vs dense attention encoders at long lengths: time and memory.

    python benchmarks/sparse.py                  # BERT-base width, 4 layers, window 256, lengths 1024-4096

Time: jitted forward, interleaved runs, medians. Memory: XLA's compiled temporary
buffers for the forward and for forward+backward (deterministic, from the compiler's
buffer assignment), which is the activation memory the run needs beyond parameters.
"""
from __future__ import annotations

import argparse
import os
import sys


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--window", type=int, default=256)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  sys.path.insert(0, os.path.dirname(__file__))
  from common import interleaved_medians, machine, table
  from jaxformers import EncoderConfig, models

  rows = []
  for length in args.lengths:
    fns, mem = {}, {}
    for kind in ("dense", "sparse"):
      block = "serial" if kind == "dense" else "sparse"
      cfg = EncoderConfig(layout=f"{block}*{args.layers}", max_position_embeddings=max(args.lengths),
                          sparse_window=args.window, hidden_dropout=0.0, attention_dropout=0.0)
      model = models.Encoder(cfg, rngs=nnx.Rngs(0))
      graphdef, params, rest = nnx.split(model, nnx.Param, ...)

      def fwd(params, ids, graphdef=graphdef, rest=rest):
        return nnx.merge(graphdef, params, rest)(ids).last_hidden_state

      def loss(params, ids, fwd=fwd):
        return jnp.mean(fwd(params, ids) ** 2)
      spec = jax.ShapeDtypeStruct((1, length), jnp.int32)
      f = jax.jit(fwd).lower(params, spec).compile()
      g = jax.jit(jax.grad(loss)).lower(params, spec).compile()
      mem[kind] = (f.memory_analysis().temp_size_in_bytes, g.memory_analysis().temp_size_in_bytes)
      ids = np.random.default_rng(0).integers(1000, 30000, (1, length)).astype(np.int32)
      fns[kind] = (lambda f=f, params=params, ids=ids: f(params, ids).block_until_ready())
    med = interleaved_medians(fns, args.repeats, warmup=1)
    rows.append([length, f"{med['dense'] * 1e3:.0f}", f"{med['sparse'] * 1e3:.0f}", f"{med['dense'] / med['sparse']:.2f}x",
                 f"{mem['dense'][0] / 2**20:.0f}", f"{mem['sparse'][0] / 2**20:.0f}",
                 f"{mem['dense'][1] / 2**20:.0f}", f"{mem['sparse'][1] / 2**20:.0f}"])
  print(f"# sparse (window {args.window}, first token global) vs dense attention, hidden 768, 12 heads, "
        f"{args.layers} layers, batch 1, float32, {jax.devices()[0].platform}; "
        f"medians of {args.repeats} interleaved runs")
  print(machine() + "\n")
  print(table(["length", "dense fwd ms", "sparse fwd ms", "sparse speed-up", "dense fwd MiB", "sparse fwd MiB",
               "dense fwd+bwd MiB", "sparse fwd+bwd MiB"], rows))


if __name__ == "__main__":
  main()
