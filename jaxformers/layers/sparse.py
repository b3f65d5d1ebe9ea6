"""Sliding-window + global-token self-attention (Longformer / BigBird style).

A query ``i`` may attend to key ``j`` of the same sequence when ``|i - j| <= window // 2``,
or when either token is global. Global tokens are given by their position inside their
sequence (``global_positions``, the first token by default), so packed rows get one set
per sequence.

The XLA path never builds a ``length x length`` mask. Queries are cut into blocks of
``b = ceil(window / 2)`` tokens; block ``q`` looks only at key blocks ``q - 1, q, q + 1``
(``3 b`` keys, which cover the window) plus the gathered global keys, and the global
queries, gathered too, attend over the whole row. Memory and time are
``O(length x (3 b + n_global))``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


def is_global_token(positions: jax.Array, segment_ids: jax.Array | None, global_positions: tuple[int, ...]) -> jax.Array:
  g = jnp.zeros(positions.shape, bool)
  for p in global_positions:
    g = g | (positions == p)
  return g if segment_ids is None else g & (segment_ids != 0)


def sparse_mask_dense(segment_ids, positions, window: int, global_positions: tuple[int, ...]) -> jax.Array:
  """The equivalent dense boolean mask ``[batch, 1, L, L]`` (for tests and small inputs only)."""
  b, l = positions.shape
  seg = jnp.ones((b, l), jnp.int32) if segment_ids is None else segment_ids
  idx = jnp.arange(l)
  band = jnp.abs(idx[:, None] - idx[None, :]) <= window // 2
  glob = is_global_token(positions, segment_ids, global_positions)
  allowed = band[None] | glob[:, :, None] | glob[:, None, :]
  same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
  return (allowed & same)[:, None]


def _softmax_attend(logits, valid, values_fn):
  logits = jnp.where(valid, logits, _NEG)
  m = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.where(valid, jnp.exp(logits - m), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  return values_fn(p / jnp.where(denom == 0, 1.0, denom))


def sparse_attention_xla(q, k, v, *, segment_ids, positions, window: int, global_positions: tuple[int, ...],
                         max_global: int, scale: float | None = None) -> jax.Array:
  """Banded + global attention. q, k, v ``[batch, length, heads, head_dim]``; ``max_global`` bounds the
  number of global tokens per row (a static shape). Computes head-major so every contraction is a
  plain batched matmul over (batch, heads, block)."""
  bsz, l, n, h = q.shape
  scale = h**-0.5 if scale is None else scale
  seg = jnp.ones((bsz, l), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  glob = is_global_token(positions, segment_ids, global_positions)
  blk = max(1, -(-window // 2))
  nb = -(-l // blk)
  pad = nb * blk - l
  f32 = jnp.float32
  q_BNLH, k_BNLH, v_BNLH = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))

  def blocks(x, axis, fill=0):  # split the length axis into [nb, blk]
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    x = jnp.pad(x, widths, constant_values=fill)
    return x.reshape(x.shape[:axis] + (nb, blk) + x.shape[axis + 1:])

  def neighbours(xb, axis, fill=0):  # [..., nb, blk, ...] -> [..., nb, 3 blk, ...]: blocks q-1, q, q+1
    widths = [(0, 0)] * xb.ndim
    widths[axis] = (1, 1)
    xp = jnp.pad(xb, widths, constant_values=fill)
    take = lambda a, b: jax.lax.slice_in_dim(xp, a, b, axis=axis)
    return jnp.concatenate([take(0, nb), take(1, nb + 1), take(2, nb + 2)], axis=axis + 1)

  far = -(10**9)
  idx = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (bsz, l))
  q_b = blocks(q_BNLH, 2)                                                     # [B, N, nb, blk, H]
  k_n, v_n = neighbours(blocks(k_BNLH, 2), 2), neighbours(blocks(v_BNLH, 2), 2)  # [B, N, nb, 3blk, H]
  seg_q, idx_q = blocks(seg, 1), blocks(idx, 1, far)                          # [B, nb, blk]
  seg_k = neighbours(blocks(seg, 1), 1)                                       # [B, nb, 3blk]
  idx_k = neighbours(blocks(idx, 1, far), 1, far)
  glob_k = neighbours(blocks(glob, 1, False), 1, False)
  # band part: same sequence, inside the window, key not global (global keys are attended below)
  band_valid = ((seg_q[..., :, None] == seg_k[..., None, :]) & (seg_k[..., None, :] != 0)
                & (jnp.abs(idx_q[..., :, None] - idx_k[..., None, :]) <= window // 2) & ~glob_k[..., None, :])
  band_logits = jnp.einsum("bnqxh,bnqyh->bnqxy", q_b, k_n, preferred_element_type=f32) * scale

  # global keys (and queries): gather up to max_global of them per row
  order = jnp.argsort(~glob, axis=-1, stable=True)[:, :max_global]            # [B, G]
  g_valid = jnp.take_along_axis(glob, order, axis=-1)                          # [B, G]
  g_seg = jnp.take_along_axis(seg, order, axis=-1)
  gather = lambda t: jnp.take_along_axis(t, order[:, None, :, None], axis=2)  # [B, N, L, H] -> [B, N, G, H]
  k_g, v_g = gather(k_BNLH), gather(v_BNLH)
  g_logits = jnp.einsum("bnqxh,bngh->bnqxg", q_b, k_g, preferred_element_type=f32) * scale
  g_key_valid = g_valid[:, None, None, :] & (seg_q[..., :, None] == g_seg[:, None, None, :])  # [B, nb, blk, G]

  logits = jnp.concatenate([band_logits, g_logits], axis=-1)                  # [B, N, nb, blk, 3blk + G]
  valid = jnp.concatenate([band_valid, g_key_valid], axis=-1)[:, None]        # [B, 1, nb, blk, 3blk + G]

  def values(p):
    pb, pg = p[..., : 3 * blk], p[..., 3 * blk:]
    out = jnp.einsum("bnqxy,bnqyh->bnqxh", pb.astype(v.dtype), v_n, preferred_element_type=f32)
    return out + jnp.einsum("bnqxg,bngh->bnqxh", pg.astype(v.dtype), v_g, preferred_element_type=f32)
  out_BNLH = _softmax_attend(logits, valid, values).reshape(bsz, n, nb * blk, h)[:, :, :l]

  # global queries attend to every key of their sequence
  q_g = gather(q_BNLH)                                                         # [B, N, G, H]
  gq_logits = jnp.einsum("bngh,bnkh->bngk", q_g, k_BNLH, preferred_element_type=f32) * scale
  gq_valid = (g_seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
  out_g = _softmax_attend(gq_logits, gq_valid[:, None],
                          lambda p: jnp.einsum("bngk,bnkh->bngh", p.astype(v.dtype), v_BNLH, preferred_element_type=f32))
  # write global rows back (rows of filler slots are dropped by sending them out of range)
  rows = jnp.where(g_valid, order, l)
  out_BNLH = out_BNLH.at[jnp.arange(bsz)[:, None, None], jnp.arange(n)[None, :, None], rows[:, None, :]].set(
      out_g, mode="drop")
  return jnp.swapaxes(out_BNLH, 1, 2).astype(q.dtype)
