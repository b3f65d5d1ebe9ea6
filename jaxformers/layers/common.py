"""Parameter builders shared by every layer: BERT-style initialisation and logical axis names.

Each ``nnx.Param`` carries ``logical_axes`` metadata (one name per dimension, from
``vocab, embed, mlp, heads, position, type, labels`` or None); the training code maps
those names onto a device mesh with one rules table, so layers never name mesh axes.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformers.config import EncoderConfig
from jaxformers.layers.quant import Int8Dense, fake_quant


def dtype_of(name: str):
  return jnp.dtype(name)


def on_rows(fn, x: jax.Array) -> jax.Array:
  """``fn`` (a map over the last axis) applied to the 2-D ``[rows, features]`` view of ``x``.

  In the backward pass of a matmul the weight gradient then contracts a single rows axis, which
  XLA:CPU runs without first writing a transposed copy of the incoming gradient (with
  ``[batch, length, features]`` operands it makes one per matmul)."""
  if x.ndim <= 2:
    return fn(x)
  y = fn(x.reshape(-1, x.shape[-1]))
  return y.reshape(*x.shape[:-1], y.shape[-1])


def flat_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """``x @ w`` over the last axis, on the rows view of ``x`` (see :func:`on_rows`)."""
  return on_rows(lambda rows: rows @ w, x)


class Dense(nnx.Linear):
  """``nnx.Linear`` (same parameters) applied to the rows view of its input (see :func:`on_rows`). With
  ``fake_quant`` the kernel (per output channel) and the input (per token) are rounded to int8 grids with
  straight-through gradients (quantization-aware training, see :mod:`jaxformers.layers.quant`)."""

  fake_quant = False

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    if self.fake_quant:
      w = fake_quant(self.kernel[...].astype(jnp.float32), axis=0)
      b = self.bias[...].astype(jnp.float32)
      rows = lambda r: (fake_quant(r.astype(jnp.float32), axis=-1) @ w + b).astype(self.dtype)  # noqa: E731
      return on_rows(rows, inputs)
    return on_rows(lambda rows: super(Dense, self).__call__(rows, out_sharding), inputs)


def linear(cfg: EncoderConfig, d_in: int, d_out: int, axes: tuple, *, rngs: nnx.Rngs):
  if cfg.quantization == "int8":
    return Int8Dense(d_in, d_out, axes, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype), rngs=rngs)
  dense = Dense(
      d_in, d_out, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype),
      kernel_init=nnx.initializers.normal(cfg.initializer_range),
      kernel_metadata={"logical_axes": axes}, bias_metadata={"logical_axes": axes[-1:]}, rngs=rngs)
  if cfg.quant_aware:
    dense.fake_quant = True
  return dense


def layer_norm(cfg: EncoderConfig, dim: int, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(
      dim, epsilon=cfg.layer_norm_eps, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype),
      scale_metadata={"logical_axes": ("embed",)}, bias_metadata={"logical_axes": ("embed",)}, rngs=rngs)


def embed(cfg: EncoderConfig, num: int, dim: int, axes: tuple, *, rngs: nnx.Rngs) -> nnx.Embed:
  return nnx.Embed(
      num, dim, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype),
      embedding_init=nnx.initializers.normal(cfg.initializer_range),
      embedding_metadata={"logical_axes": axes}, rngs=rngs)


DEFAULT_MAX_SEGMENTS = 32


class Sequences(NamedTuple):
  """Where each token's sequence starts and ends, shared by every block of one forward pass.

  ``segment_ids`` ``[batch, length]`` int32: 0 marks padding, 1, 2, ... number the
  sequences of a row (a padded batch has one sequence per row, so its attention mask
  is its segment ids). ``positions`` ``[batch, length]``: a token's index inside its own
  sequence. ``packed`` (static) says rows may hold several sequences, at most
  ``max_segments`` (static) of them. ``None`` segment ids mean every token of a row
  belongs to one sequence, no padding.
  """

  segment_ids: jax.Array | None
  positions: jax.Array
  packed: bool = False
  max_segments: int = 1

  @classmethod
  def build(cls, batch: int, length: int, attention_mask=None, segment_ids=None,
            max_segments: int | None = None) -> "Sequences":
    if segment_ids is not None:
      seg = jnp.asarray(segment_ids, jnp.int32)
      return cls(seg, positions_in_segment(seg), packed=True,
                 max_segments=min(length, max_segments or DEFAULT_MAX_SEGMENTS))
    if attention_mask is not None:
      seg = jnp.asarray(attention_mask, jnp.int32)
      return cls(seg, positions_in_segment(seg), packed=False)
    return cls(None, jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length)), packed=False)

  def lengths(self) -> jax.Array:
    """``[batch, length]``: the length of the sequence each token belongs to (0 for padding)."""
    if self.segment_ids is None:
      b, l = self.positions.shape
      return jnp.full((b, l), l, jnp.int32)
    if not self.packed:
      n_B = jnp.sum(self.segment_ids != 0, axis=-1, dtype=jnp.int32)
      return jnp.where(self.segment_ids != 0, n_B[:, None], 0)
    same_BLL = self.segment_ids[:, :, None] == self.segment_ids[:, None, :]
    return jnp.where(self.segment_ids != 0, jnp.sum(same_BLL, axis=-1, dtype=jnp.int32), 0)


def positions_in_segment(segment_ids: jax.Array) -> jax.Array:
  """Index of each token inside its run of equal segment ids: [0,0,1,1,1,2] -> [0,1,0,1,2,0]."""
  length = segment_ids.shape[-1]
  idx = jnp.arange(length, dtype=jnp.int32)
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=-1)
  first = jax.lax.cummax(jnp.where(starts, idx, 0), axis=segment_ids.ndim - 1)
  return idx - first
