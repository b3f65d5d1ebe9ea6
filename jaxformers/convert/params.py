"""Flat ``"a.b.0.c" -> array`` views of a model's parameters."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx


def _key(path: tuple) -> str:
  return ".".join(str(p) for p in path)


def param_shapes(model) -> dict[str, tuple]:
  return {_key(p): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def get_params(model) -> dict[str, np.ndarray]:
  return {_key(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def set_params(model, flat: dict[str, np.ndarray]) -> None:
  """Overwrite the named parameters in place (dtype follows the model's parameter)."""
  for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    k = _key(p)
    if k in flat:
      v[...] = jnp.asarray(flat[k], dtype=v[...].dtype)
