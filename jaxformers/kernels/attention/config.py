"""Block sizes per target, and the kernel lowering a target takes.

Lowerings: ``"triton"`` (GPU), ``"mosaic"`` (TPU), or the Pallas interpreter (``"interpret"``; and
``"interpret_tpu"`` / ``"interpret_gpu"``, which run the TPU / GPU driver's code on the interpreter). Which one
applies comes from a :class:`~jaxformers.targets.Target`, by default the current one
(:func:`jaxformers.targets.current_target`: the host's devices unless ``use_target`` names another chip).
"""
from __future__ import annotations

import dataclasses

from jaxformers.kernels.attention.block_table import TABLE
from jaxformers.targets import (Target, current_target, force_interpret, interpret_forced,  # noqa: F401 (re-exported)
                                set_force_interpret)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Query and key block lengths of the flash kernels (also the padding multiple of each length)."""
  block_q: int
  block_k: int

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 8 or v % 8:
        raise ValueError(f"BlockSizes.{name} must be an int multiple of 8 (>= 8), got {v!r}")


# A platform's blocks where no chip is named or the chip has no row in the generated table (block_table.py).
# Triton needs power-of-two blocks; Mosaic wants the key block (the lanes of the logits tile) a multiple of 128.
_DEFAULTS = {
    "gpu": {64: BlockSizes(128, 64), 128: BlockSizes(128, 64)},
    "tpu": {64: BlockSizes(128, 128), 128: BlockSizes(128, 128)},
    "cpu": {64: BlockSizes(32, 32), 128: BlockSizes(32, 32)},
}


def kernel_backend(target: Target | None = None) -> str | None:
  """How a Pallas call lowers on ``target`` (default: the current target); None where the kernels do not run."""
  return (target or current_target()).kernel_backend


def default_block_sizes(target: Target | str | None = None, head_dim: int = 64, length: int | None = None) \
    -> BlockSizes:
  """The blocks for ``target`` (a :class:`Target`, a platform name, or None: the current target), ``head_dim``
  and sequence ``length``: the generated table's row for the chip (see ``benchmarks/block_sizes.py``), else the
  platform's default."""
  if target is None:
    target = current_target()
  if isinstance(target, str):
    target = Target("gpu" if target in ("cuda", "rocm") else target)
  hd = 64 if head_dim <= 64 else 128
  if target.chip is not None and length is not None:
    rows = TABLE.get(target.chip, {}).get(hd)
    if rows:
      for max_len, bq, bk in rows:
        if length <= max_len:
          return BlockSizes(bq, bk)
      return BlockSizes(*rows[-1][1:])
  return _DEFAULTS[target.platform][hd]
