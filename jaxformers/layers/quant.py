"""int8 dense layers: weights stored as int8 with one scale per output channel, inputs quantised per token at run time.

``y = (q(x) @ W_q) * s_x * s_w + b`` with ``q(x) = round(x / s_x)``, ``s_x = max|x_row| / 127`` (one scale per
token, computed at run time: dynamic quantization) and ``W_q = round(W / s_w)``, ``s_w = max|W[:, j]| / 127``
(symmetric, per output channel). The matmul multiplies int8 by int8 and accumulates in int32, which XLA:CPU runs
about twice as fast as the float32 matmul. :func:`fake_quant` is the same rounding in float with a
straight-through gradient, for quantization-aware fine-tuning.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

QMAX = 127.0


def absmax_scale(x: jax.Array, axis: int) -> jax.Array:
  """Symmetric int8 scale along ``axis`` (kept), never zero."""
  return jnp.maximum(jnp.max(jnp.abs(x), axis=axis, keepdims=True), 1e-12) / QMAX


def quantize_array(x: jax.Array, scale: jax.Array) -> jax.Array:
  return jnp.clip(jnp.round(x / scale), -QMAX, QMAX).astype(jnp.int8)


def quantize_kernel(kernel) -> tuple[np.ndarray, np.ndarray]:
  """``(int8 kernel [in, out], float32 scale [out])`` of a float kernel, per output channel."""
  k = jnp.asarray(kernel, jnp.float32)
  s = absmax_scale(k, axis=0)
  return np.asarray(quantize_array(k, s)), np.asarray(s[0])


def fake_quant(x: jax.Array, axis: int) -> jax.Array:
  """``x`` rounded to the int8 grid of its absmax scale along ``axis``, with an identity (straight-through) gradient."""
  s = jax.lax.stop_gradient(absmax_scale(x, axis))
  q = jnp.clip(jnp.round(x / s), -QMAX, QMAX) * s
  return x + jax.lax.stop_gradient(q - x)


def int8_matmul(x_RI: jax.Array, kernel_IO: jax.Array, scale_O: jax.Array) -> jax.Array:
  """``x @ dequant(kernel)`` with ``x`` quantised per row; float32 result ``[rows, out]``."""
  x = x_RI.astype(jnp.float32)
  s_R1 = absmax_scale(x, axis=-1)
  acc = jax.lax.dot_general(quantize_array(x, s_R1), kernel_IO, (((1,), (0,)), ((), ())),
                            preferred_element_type=jnp.int32)
  return acc.astype(jnp.float32) * s_R1 * scale_O


class Int8Dense(nnx.Module):
  """A dense layer with an int8 ``kernel`` ``[in, out]``, its float32 ``kernel_scale`` ``[out]`` and a float ``bias``;
  parameter names and logical axes as :class:`jaxformers.layers.common.Dense` (plus the scale)."""

  def __init__(self, d_in: int, d_out: int, axes: tuple, *, dtype, param_dtype, rngs: nnx.Rngs | None = None):
    del rngs   # int8 layers are converted from float ones, never initialised at random
    self.kernel = nnx.Param(jnp.zeros((d_in, d_out), jnp.int8), logical_axes=axes)
    self.kernel_scale = nnx.Param(jnp.ones((d_out,), jnp.float32), logical_axes=axes[-1:])
    self.bias = nnx.Param(jnp.zeros((d_out,), param_dtype), logical_axes=axes[-1:])
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    rows = x.reshape(-1, x.shape[-1])
    y = int8_matmul(rows, self.kernel[...], self.kernel_scale[...]) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype).reshape(*x.shape[:-1], y.shape[-1])
