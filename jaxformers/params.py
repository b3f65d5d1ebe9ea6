"""Flat ``"a.b.0.c" -> array`` views of a model's parameters, and their shapes (the form saved metadata keeps)."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _key(path: tuple) -> str:
  return ".".join(str(p) for p in path)


def _path_part(k) -> str | None:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      part = str(getattr(k, attr))
      return None if attr == "name" and part in ("value", "raw_value") else part
  return str(k)


def param_shapes(model_or_state) -> dict[str, list[int]]:
  """``"a.b.0.c" -> shape`` of every parameter of a model, or of every array of a (possibly abstract) state."""
  tree = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {".".join(p for p in map(_path_part, path) if p is not None): list(np.shape(x)) for path, x in flat}


_KEYSTR_PART = re.compile(r"\['([^']*)'\]|\[(\d+)\]")


def read_shapes(saved: dict) -> dict[str, list[int]]:
  """Saved ``param_shapes`` metadata in :func:`param_shapes`' form; states saved with keys such as
  ``['encoder']['blocks'][0]['mixer']['key']['bias'].value`` are read too."""
  out = {}
  for k, v in saved.items():
    if k.startswith("["):
      k = ".".join(a or b for a, b in _KEYSTR_PART.findall(k))
    out[k] = list(v)
  return out


def get_params(model) -> dict[str, np.ndarray]:
  return {_key(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def set_params(model, flat: dict[str, np.ndarray]) -> None:
  """Overwrite the named parameters in place (dtype follows the model's parameter)."""
  for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    k = _key(p)
    if k in flat:
      v[...] = jnp.asarray(flat[k], dtype=v[...].dtype)
