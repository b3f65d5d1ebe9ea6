"""The device mesh and one logical-axis rules table that places parameters, optimizer state and batches.

Mesh axes: ``data`` (pure data parallelism) and ``fsdp`` (data parallel too, and the
axis parameters are sharded over). The batch is split over both; with ``fsdp`` of
size 1 (the default) every parameter is replicated, which is plain data
parallelism. Layers only name logical axes (``embed``, ``mlp``, ...); the rules table
is the only place those names meet mesh axes. :data:`LOGICAL_AXIS_RULES` is the
default; a run takes its table from ``config.mesh.rules`` (whose defaults are these),
so ``--config.mesh.rules.vocab=`` keeps the embeddings' vocabulary dimension whole.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis it may be sharded over (first listed dimension that divides wins)
LOGICAL_AXIS_RULES = (
    ("embed", "fsdp"),
    ("mlp", "fsdp"),
    ("heads", "fsdp"),
    ("vocab", "fsdp"),
    ("position", None),
    ("type", None),
    ("labels", None),
)


def rules_from(mapping) -> tuple[tuple[str, str | None], ...]:
  """A rules table from ``{logical axis: mesh axis}`` (``config.mesh.rules``; ``""`` or None: never sharded). A mesh
  axis this module does not make is refused with a ValueError naming the rule and the mesh axes there are."""
  out = []
  for name, axis in mapping.items():
    if axis not in MESH_AXES + ("", None):
      raise ValueError(f"mesh.rules.{name}={axis!r}: expected a mesh axis ({', '.join(MESH_AXES)}) or '' (never "
                       f"sharded)")
    out.append((name, axis or None))
  return tuple(out)


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  """A ``(data, fsdp)`` mesh over all devices; ``-1`` takes what is left."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if fsdp == -1 and data == -1:
    data, fsdp = 1, n
  elif fsdp == -1:
    fsdp = n // data
  elif data == -1:
    data = n // fsdp
  if data * fsdp != n or data < 1 or fsdp < 1:
    raise ValueError(f"mesh.data={data} x mesh.fsdp={fsdp} does not match the {n} available devices")
  return Mesh(np.asarray(devices).reshape(data, fsdp), MESH_AXES)


def traced_in(mesh: Mesh, fn):
  """``fn`` whose body is traced with ``mesh`` as the abstract mesh, so layers that must split their work by hand
  (a Pallas attention kernel, which XLA cannot partition, runs per batch shard) see how the batch is split."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return wrapped


def spec_for(shape: tuple[int, ...], logical_axes, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> P:
  """PartitionSpec for one array: shard the first dimension whose logical axis maps to a mesh axis
  of size > 1 that divides it; every other dimension is replicated."""
  table = dict(rules)
  spec = [None] * len(shape)
  if logical_axes is None or len(logical_axes) != len(shape):
    return P(*spec)
  used = set()
  for d, name in enumerate(logical_axes):
    axis = table.get(name)
    if axis is None or axis in used:
      continue
    size = mesh.shape[axis]
    if size > 1 and shape[d] % size == 0:
      spec[d] = axis
      used.add(axis)
      break
  return P(*spec)


def param_shardings(abstract_params: nnx.State, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> nnx.State:
  """NamedSharding for every parameter from its ``logical_axes`` metadata and the ``rules`` table."""
  def one(v):
    axes = v.get_metadata().get("logical_axes")
    return v.replace(NamedSharding(mesh, spec_for(tuple(v.shape), axes, mesh, rules)))
  return jax.tree.map(one, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_shardings(mesh: Mesh, packed: bool, per_token: bool) -> dict:
  """The shardings of a host batch's arrays: tokens ``[rows, length]``; labels and weights per token, per packed
  slot ``[rows, max_segments]`` or per example ``[rows]``."""
  two = batch_sharding(mesh, 2)
  if packed:
    return {"input_ids": two, "token_type_ids": two, "segment_ids": two, "labels": two, "weights": two}
  one = two if per_token else batch_sharding(mesh, 1)
  return {"input_ids": two, "token_type_ids": two, "attention_mask": two, "labels": one, "weights": one}


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Host numpy batch (the same global batch on every process) -> global arrays split over the batch axes."""
  out = {}
  n_proc, pid = jax.process_count(), jax.process_index()
  for k, x in batch.items():
    sh = batch_sharding(mesh, x.ndim)
    if n_proc == 1:
      out[k] = jax.device_put(x, sh)
    else:
      rows = x.shape[0] // n_proc
      out[k] = jax.make_array_from_process_local_data(sh, x[pid * rows:(pid + 1) * rows], x.shape)
  return out


def state_shardings(abstract_state, param_sh, mesh: Mesh):
  """Shardings for a whole train state: optimizer moments follow the parameter they mirror (matched by
  the parameter's path being a suffix of theirs, and equal shape); everything else is replicated."""
  flat_p = jax.tree_util.tree_flatten_with_path(param_sh, is_leaf=lambda x: isinstance(x, NamedSharding))[0]
  by_path = {jax.tree_util.keystr(p): s for p, s in flat_p}
  shapes = {jax.tree_util.keystr(p): x.shape
            for p, x in jax.tree_util.tree_flatten_with_path(abstract_state["params"])[0]}

  def one(path, x):
    k = jax.tree_util.keystr(path)
    for pk, s in by_path.items():
      if k.endswith(pk) and shapes.get(pk) == x.shape:
        return s
    return replicated(mesh)

  out = jax.tree_util.tree_map_with_path(one, {k: v for k, v in abstract_state.items() if k != "params"})
  out["params"] = param_sh
  return out
