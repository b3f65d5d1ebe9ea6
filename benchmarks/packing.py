"""Padded vs packed (padding-free) execution on a length-skewed batch.

    python benchmarks/packing.py                 # BERT-base shape, 16 examples, max 512, mean ~0.4 of max

Lengths are drawn from 512 * Beta(2, 3) (mean 0.4 of the maximum). The padded run pads
every example to the batch maximum; the packed run first-fit packs the same examples into
rows of 512 tokens. Both are jitted; runs are interleaved and medians reported. Useful
tokens/s counts only real tokens.
"""
from __future__ import annotations

import argparse
import os
import sys


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--examples", type=int, default=16)
  p.add_argument("--max-length", type=int, default=512)
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  sys.path.insert(0, os.path.dirname(__file__))
  from common import interleaved_medians, machine, table
  from jaxformers import EncoderConfig, models
  from jaxformers.packing import pack

  rng = np.random.default_rng(args.seed)
  lengths = np.maximum(8, (args.max_length * rng.beta(2, 3, args.examples)).astype(int))
  examples = [rng.integers(1000, 30000, n) for n in lengths]
  width = int(lengths.max())
  ids = np.zeros((args.examples, width), np.int32)
  mask = np.zeros_like(ids)
  for i, e in enumerate(examples):
    ids[i, :len(e)], mask[i, :len(e)] = e, 1
  batch = pack(examples, row_length=args.max_length, max_segments=16)
  labels_padded = np.zeros(args.examples, np.int32)

  cfg = EncoderConfig(layout=f"serial*{args.layers}", hidden_dropout=0.0, attention_dropout=0.0)
  model = models.SequenceClassifier(cfg, num_labels=2, rngs=nnx.Rngs(0))
  model.eval()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adamw(1e-5)
  opt_state = tx.init(params)

  @jax.jit
  def infer_padded(params, ids, mask):
    return nnx.merge(graphdef, params, rest).encoder(ids, mask).last_hidden_state

  @jax.jit
  def infer_packed(params, ids, seg):
    return nnx.merge(graphdef, params, rest).encoder(ids, segment_ids=seg, max_segments=16).last_hidden_state

  def train_step(loss_fn):
    @jax.jit
    def step(params, opt_state, *inputs):
      loss, grads = jax.value_and_grad(loss_fn)(params, *inputs)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss
    return step

  def loss_padded(params, ids, mask, labels):
    logits = nnx.merge(graphdef, params, rest)(ids, mask)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def loss_packed(params, ids, seg, labels, valid):
    logits = nnx.merge(graphdef, params, rest)(ids, segment_ids=seg, max_segments=16)  # [rows, slots, labels]
    per = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(per * valid) / jnp.sum(valid)

  step_padded, step_packed = train_step(loss_padded), train_step(loss_packed)
  slot_labels = np.zeros(batch.slots.shape, np.int32)
  slot_valid = (batch.slots >= 0).astype(np.float32)
  fns = {
      "inference, padded": lambda: infer_padded(params, ids, mask).block_until_ready(),
      "inference, packed": lambda: infer_packed(params, batch.input_ids, batch.segment_ids).block_until_ready(),
      "train step, padded": lambda: jax.block_until_ready(step_padded(params, opt_state, ids, mask, labels_padded)),
      "train step, packed": lambda: jax.block_until_ready(
          step_packed(params, opt_state, batch.input_ids, batch.segment_ids, slot_labels, slot_valid)),
  }
  med = interleaved_medians(fns, args.repeats, warmup=1)
  useful = int(lengths.sum())
  print(f"# padded vs packed, BERT-base shape ({args.layers} layers), {args.examples} examples, max {args.max_length}, "
        f"mean length {lengths.mean():.0f} ({lengths.mean() / args.max_length:.2f} of max), float32, "
        f"{jax.devices()[0].platform}; medians of {args.repeats} interleaved runs")
  print(machine() + "\n")
  print(f"padded: {ids.shape[0]} rows x {ids.shape[1]} ({1 - useful / ids.size:.0%} padding); "
        f"packed: {batch.input_ids.shape[0]} rows x {args.max_length} ({batch.padding_fraction:.0%} padding)\n")
  rows = []
  for kind in ("inference", "train step"):
    a, b = med[f"{kind}, padded"], med[f"{kind}, packed"]
    rows.append([kind, f"{a * 1e3:.0f}", f"{b * 1e3:.0f}", f"{useful / a:,.0f}", f"{useful / b:,.0f}", f"{a / b:.2f}x"])
  print(table(["", "padded ms", "packed ms", "padded useful tok/s", "packed useful tok/s", "packed speed-up"], rows))


if __name__ == "__main__":
  main()
