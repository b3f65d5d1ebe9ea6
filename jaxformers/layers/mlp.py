"""Position-wise feed-forward sublayer: up-projection, activation, down-projection."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformers.config import EncoderConfig
from jaxformers.layers.common import linear


_SQRT_HALF = float(np.sqrt(0.5))


def gelu_erf(x: jax.Array) -> jax.Array:
  """Exact GELU written as BERT and PyTorch write it, ``x/2 (1 + erf(x/sqrt(2)))``: the same function as
  ``jax.nn.gelu(approximate=False)`` (which goes through erfc) and cheaper on CPU."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype)))


def activation(name: str):
  if name == "gelu":
    return gelu_erf
  if name == "gelu_tanh":
    return lambda x: jax.nn.gelu(x, approximate=True)
  if name == "relu":
    return jax.nn.relu
  raise ValueError(f"unknown activation {name!r}; expected gelu, gelu_tanh or relu")


class FeedForward(nnx.Module):
  """``down(act(up(x)))``; ``up`` is HF's ``intermediate.dense``, ``down`` its ``output.dense``."""

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, width: int | None = None):
    """``width``: this sublayer's hidden width when pruned; default ``cfg.intermediate_size``."""
    width = width or cfg.intermediate_size
    self.up = linear(cfg, cfg.hidden_size, width, ("embed", "mlp"), rngs=rngs)
    self.down = linear(cfg, width, cfg.hidden_size, ("mlp", "embed"), rngs=rngs)
    self.act = activation(cfg.hidden_act)

  def __call__(self, x_BLD: jax.Array, hidden_BLF: jax.Array | None = None) -> jax.Array:
    """``hidden_BLF`` lets a caller that already computed ``up(x)`` (a fused projection) pass it in."""
    h_BLF = self.up(x_BLD) if hidden_BLF is None else hidden_BLF
    return self.down(self.act(h_BLF))
