"""How the default block sizes are chosen: a roofline model of the flash kernels, over the blocks that compile.

``benchmarks/block_sizes.py`` compiles each candidate ``(block_q, block_k)`` for each chip and head dimension
(forward and backward, with the chip's own compiler) and keeps those that compile; :func:`choose` then picks, per
sequence length, the compiling blocks with the least :func:`roofline_seconds`, and the result is written to
``block_table.py``. The model counts, for one ``[batch x heads]`` slab of ``BATCH_HEADS`` heads in bfloat16:

* FLOPs over the padded lengths (a length is padded to a multiple of its block): forward 4, dk/dv 8 and dq 6
  times ``Lq * Lk * head_dim``;
* HBM bytes: each kernel reads its own blocks once and the other side once per own block (the forward and dq read
  K and V once per query block, dk/dv reads Q, dO and the row statistics once per key block);
* a fixed cost per grid step (TPU: the pipeline's step overhead) or the wave quantisation of the launched
  programs over the streaming multiprocessors (GPU).
"""
from __future__ import annotations

import math

from jaxformers.targets import CHIPS

BATCH_HEADS = 96                      # e.g. batch 8 x 12 heads
LENGTHS = (128, 256, 512, 1024, 2048, 4096)
HEAD_DIMS = (64, 128)
CANDIDATES = {
    "tpu": [(q, k) for q in (128, 256, 512, 1024) for k in (128, 256, 512, 1024)],
    "gpu": [(q, k) for q in (32, 64, 128) for k in (32, 64, 128)],
}
TPU_STEP_SECONDS = 0.35e-6            # per grid step (Pallas TPU pipeline overhead)
BYTES = 2                             # bfloat16


def roofline_seconds(chip_name: str, head_dim: int, length: int, block_q: int, block_k: int) -> float:
  """Predicted seconds of forward + backward flash attention for ``BATCH_HEADS`` heads at ``length``."""
  chip = CHIPS[chip_name]
  nq, nk = math.ceil(length / block_q), math.ceil(length / block_k)
  lq, lk, h = nq * block_q, nk * block_k, head_dim
  flops = (4 + 8 + 6) * BATCH_HEADS * lq * lk * h
  row = h * BYTES
  fwd = (2 * lq * row) + nq * 2 * lk * row
  dkv = (4 * lk * row) + nk * (2 * lq * row + 2 * lq * 4)
  dq = (3 * lq * row) + nq * 2 * lk * row
  hbm = BATCH_HEADS * (fwd + dkv + dq)
  seconds = max(flops / chip.peak_flops, hbm / chip.hbm_bandwidth)
  if chip.platform == "tpu":
    return seconds + 3 * BATCH_HEADS * nq * nk * TPU_STEP_SECONDS
  waves = []
  for programs in (BATCH_HEADS * nq, BATCH_HEADS * nk, BATCH_HEADS * nq):
    waves.append(programs / (math.ceil(programs / chip.sm_count) * chip.sm_count))
  return seconds / min(waves)


def choose(chip_name: str, head_dim: int, compiled: list[tuple[int, int]],
           lengths=LENGTHS) -> tuple[tuple[int, int, int], ...]:
  """Rows ``(longest length, block_q, block_k)``: per length the compiling blocks with the least roofline time
  (ties to the smaller blocks), consecutive lengths with the same blocks merged."""
  rows: list[tuple[int, int, int]] = []
  for length in lengths:
    bq, bk = min(compiled, key=lambda b: (roofline_seconds(chip_name, head_dim, length, *b), b[0] * b[1], b))
    if rows and rows[-1][1:] == (bq, bk):
      rows[-1] = (length, bq, bk)
    else:
      rows.append((length, bq, bk))
  return tuple(rows)
