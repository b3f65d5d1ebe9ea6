"""Running attention on a device mesh: batch (and optionally heads) sharded with ``jax.shard_map``.

Attention is independent per batch row and per head, so each device runs the single-device
:func:`~jaxformers.kernels.attention.attention` (any ``impl``, Pallas kernels included) on its
shard with no communication. q/k/v are ``[batch, length, heads, head_dim]`` sharded as
``P(batch_axes, None, head_axes, None)``; segment ids ``[batch, length]`` as ``P(batch_axes, None)``.
Use it inside a jitted, sharded training step::

  attn = functools.partial(sharded_attention, mesh=mesh, batch_axes="data", head_axes="model")
  out = attn(q, k, v, segment_ids=seg, impl="pallas")
"""
from __future__ import annotations

import jax
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from jaxformers.kernels.attention.api import attention


def _axes_tuple(axes) -> tuple:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def sharded_attention(q, k, v, *, mesh: Mesh, batch_axes="data", head_axes=None, segment_ids=None,
                      kv_segment_ids=None, mask=None, dropout_rng=None, **kwargs) -> jax.Array:
  """:func:`attention` under ``jax.shard_map`` over ``mesh``; other keyword args pass through.

  ``batch_axes`` / ``head_axes``: a mesh axis name, a tuple of names, or None (not sharded).
  ``mask`` must be 4-D; its batch / head dims are sharded when they are not broadcast (size 1).
  With dropout, ``dropout_rng`` is folded with the shard index so shards draw different masks.
  """
  b_axes, h_axes = _axes_tuple(batch_axes), _axes_tuple(head_axes)
  for name in b_axes + h_axes:
    if name not in mesh.axis_names:
      raise ValueError(f"mesh axis {name!r} (from batch_axes / head_axes) is not in mesh.axis_names "
                       f"{mesh.axis_names}")
  if set(b_axes) & set(h_axes):
    raise ValueError(f"batch_axes {b_axes} and head_axes {h_axes} must not share mesh axes")
  b_spec = b_axes or None
  h_spec = h_axes or None
  qkv_spec = P(b_spec, None, h_spec, None)
  seg_spec = P(b_spec, None)

  names, args, specs = ["q", "k", "v"], [q, k, v], [qkv_spec] * 3
  for name, val in (("segment_ids", segment_ids), ("kv_segment_ids", kv_segment_ids)):
    if val is not None:
      names.append(name), args.append(val), specs.append(seg_spec)
  if mask is not None:
    if mask.ndim != 4:
      raise ValueError(f"sharded_attention needs a 4-D mask [batch|1, heads|1, q_len, kv_len], got shape {mask.shape}")
    names.append("mask"), args.append(mask)
    specs.append(P(b_spec if mask.shape[0] > 1 else None, h_spec if mask.shape[1] > 1 else None, None, None))
  if dropout_rng is not None:
    names.append("dropout_rng"), args.append(dropout_rng), specs.append(P())

  def per_shard(*shard_args):
    kw = dict(zip(names[3:], shard_args[3:]))
    if "dropout_rng" in kw:
      for axis in b_axes + h_axes:
        kw["dropout_rng"] = jax.random.fold_in(kw["dropout_rng"], lax.axis_index(axis))
    return attention(*shard_args[:3], **kw, **kwargs)

  fn = jax.shard_map(per_shard, mesh=mesh, in_specs=tuple(specs), out_specs=qkv_spec, check_vma=False)
  return fn(*args)
