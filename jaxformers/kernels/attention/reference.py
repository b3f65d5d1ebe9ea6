"""Plain-jnp attention: the numerical reference every kernel is tested against.

Shapes: q ``[batch, q_len, heads, head_dim]``, k and v ``[batch, kv_len, heads, head_dim]``.
Masking is expressed with segment ids: a query attends to a key when both carry the
same segment id and that id is not 0 (0 marks padding). A padded batch uses the
attention mask (1 = token, 0 = pad) as its segment ids; packed rows number their
sequences 1, 2, ... An optional boolean ``mask`` broadcastable to
``[batch, heads, q_len, kv_len]`` is and-ed in (True = may attend).
Rows with no key to attend to return zeros, never NaN.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxformers.dropout import dropout

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def segment_mask(segment_ids: jax.Array, kv_segment_ids: jax.Array | None = None) -> jax.Array:
  """Boolean ``[batch, 1, q_len, kv_len]`` mask from segment ids (0 = padding)."""
  kv = segment_ids if kv_segment_ids is None else kv_segment_ids
  same = segment_ids[:, :, None] == kv[:, None, :]
  return (same & (kv[:, None, :] != 0))[:, None]


def combined_mask(segment_ids=None, kv_segment_ids=None, mask=None) -> jax.Array | None:
  """The boolean mask implied by segment ids and an explicit mask, or None for 'attend everywhere'."""
  out = None
  if segment_ids is not None:
    out = segment_mask(segment_ids, kv_segment_ids)
  elif kv_segment_ids is not None:
    out = (kv_segment_ids != 0)[:, None, None, :]
  if mask is not None:
    out = mask if out is None else (out & mask)
  return out


def attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    mask: jax.Array | None = None,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    dropout_impl: str = "hash",
) -> jax.Array:
  """Softmax attention in float32 accumulation; returns ``[batch, q_len, heads, head_dim]`` in q's dtype."""
  head_dim = q.shape[-1]
  scale = head_dim**-0.5 if scale is None else scale
  logits_BNQK = jnp.einsum("bqnh,bknh->bnqk", q, k, preferred_element_type=jnp.float32) * scale
  valid = combined_mask(segment_ids, kv_segment_ids, mask)
  if valid is not None:
    logits_BNQK = jnp.where(valid, logits_BNQK, _MASKED)
  probs_BNQK = jax.nn.softmax(logits_BNQK, axis=-1)
  if valid is not None:
    probs_BNQK = jnp.where(valid, probs_BNQK, 0.0)
  if dropout_rate > 0.0:
    if dropout_rng is None:
      raise ValueError("attention dropout_rate > 0 needs a dropout_rng")
    probs_BNQK = dropout(probs_BNQK, dropout_rate, dropout_rng, dropout_impl)
  out = jnp.einsum("bnqk,bknh->bqnh", probs_BNQK.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.astype(q.dtype)
