"""Per-backend block sizes and the switch that forces Pallas interpret mode.

Backends: ``"gpu"`` lowers through the Pallas Triton backend, ``"tpu"`` through Mosaic, and
``"cpu"`` (or any backend with interpret forced) runs the same kernels with
``pallas_call(..., interpret=True)``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

import jax

_INTERPRET_ENV = "JAXFORMERS_PALLAS_INTERPRET"
_force_interpret: bool | None = None


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


# Starting points, not tuned on hardware here. Triton needs power-of-two blocks; Mosaic wants the
# key block (the lane dimension of the logits tile) to be a multiple of 128.
_DEFAULTS = {
    "gpu": {64: BlockSizes(128, 64), 128: BlockSizes(128, 64)},
    "tpu": {64: BlockSizes(128, 128), 128: BlockSizes(128, 128)},
    "cpu": {64: BlockSizes(32, 32), 128: BlockSizes(32, 32)},
}


def kernel_backend() -> str:
  """``"interpret"``, ``"triton"`` or ``"mosaic"``: how a Pallas call is lowered right now."""
  if interpret_forced():
    return "interpret"
  platform = jax.default_backend()
  if platform in ("gpu", "cuda", "rocm"):
    return "triton"
  if platform == "tpu":
    return "mosaic"
  return "interpret"


def default_block_sizes(platform: str | None = None, head_dim: int = 64) -> BlockSizes:
  """Default blocks for ``platform`` (``"gpu"``, ``"tpu"``, ``"cpu"``; None = current backend)."""
  platform = platform or jax.default_backend()
  platform = "gpu" if platform in ("cuda", "rocm") else platform
  table = _DEFAULTS.get(platform, _DEFAULTS["cpu"])
  return table[64] if head_dim <= 64 else table[128]


def interpret_forced() -> bool:
  """True when :func:`force_interpret` or ``JAXFORMERS_PALLAS_INTERPRET=1`` asks for interpret mode."""
  if _force_interpret is not None:
    return _force_interpret
  return os.environ.get(_INTERPRET_ENV, "0") not in ("", "0", "false", "False")


def set_force_interpret(value: bool | None) -> None:
  """Force (True), forbid (False) or reset to the environment default (None) interpret mode."""
  global _force_interpret
  _force_interpret = value


@contextlib.contextmanager
def force_interpret(value: bool = True):
  """Context manager: run Pallas kernels in interpret mode on any backend (and let ``auto`` pick them on CPU)."""
  global _force_interpret
  old = _force_interpret
  _force_interpret = value
  try:
    yield
  finally:
    _force_interpret = old
