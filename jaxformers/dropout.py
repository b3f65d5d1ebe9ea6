"""Dropout masks.

``impl="hash"`` (the default) draws each element's keep bit from a counter-based hash: the
element's flat index, offset by 64 bits of seed drawn from the dropout key, goes through two
rounds of the MurmurHash3 32-bit finaliser (a bijection with full avalanche), and the element
is kept when the result is at least ``rate * 2**32``. That is five integer operations per round
and vectorises well; on CPU it is about 8x faster than ``jax.random.bernoulli`` with the default
threefry key, which at BERT-base shape was 4% of a training step. Masks are a pure function of
the key, so runs stay reproducible and resumable. ``impl="threefry"`` uses ``jax.random.bernoulli``
(whatever the key's implementation is).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

DROPOUT_IMPLS = ("hash", "threefry")
_GOLDEN = 0x9E3779B9


def _fmix32(h: jax.Array) -> jax.Array:
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  """Row-major element index (mod 2**32) built from per-axis iotas, so it partitions like any array."""
  idx = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
    stride *= shape[axis]
  return idx


def _check_impl(impl: str) -> None:
  if impl not in DROPOUT_IMPLS:
    raise ValueError(f"dropout impl {impl!r}: expected one of {', '.join(DROPOUT_IMPLS)}")


def keep_mask(key: jax.Array, rate: float, shape: tuple[int, ...], impl: str = "hash") -> jax.Array:
  """Boolean ``shape`` mask, True with probability ``1 - rate``."""
  _check_impl(impl)
  if impl == "threefry":
    return jax.random.bernoulli(key, 1.0 - rate, shape)
  seed = jax.random.bits(key, (2,), jnp.uint32)
  h = _fmix32(_flat_index(tuple(shape)) * jnp.uint32(_GOLDEN) + seed[0])
  h = _fmix32(h ^ seed[1])
  threshold = min(int(round(rate * 2**32)), 2**32 - 1)
  return h >= jnp.uint32(threshold)


def dropout(x: jax.Array, rate: float, key: jax.Array, impl: str = "hash") -> jax.Array:
  """Inverted dropout: zero each element with probability ``rate``, scale the rest by ``1 / (1 - rate)``."""
  if rate == 0.0:
    return x
  keep = keep_mask(key, rate, x.shape, impl)
  return jax.lax.select(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


class Dropout(nnx.Dropout):
  """``nnx.Dropout`` (same state and train/eval switch) drawing its masks with :func:`keep_mask`."""

  def __init__(self, rate: float, *, impl: str = "hash", rngs: nnx.Rngs):
    _check_impl(impl)
    super().__init__(rate, rngs=rngs)
    self.impl = impl

  def __call__(self, inputs: jax.Array) -> jax.Array:
    if self.rate == 0.0 or self.deterministic:
      return inputs
    return dropout(inputs, self.rate, self.rngs(), self.impl)
