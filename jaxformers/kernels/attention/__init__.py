"""Attention: one public function, a plain-jnp reference, and implementations chosen by ``impl``."""
from __future__ import annotations

import jax

from jaxformers.kernels.attention.reference import attention_reference, combined_mask, segment_mask

IMPLS = ("auto", "xla")


def attention(q, k, v, *, segment_ids=None, kv_segment_ids=None, mask=None, scale=None,
              impl: str = "auto", dropout_rate: float = 0.0, dropout_rng=None) -> jax.Array:
  """Bidirectional softmax attention, q/k/v ``[batch, length, heads, head_dim]``.

  See :mod:`jaxformers.kernels.attention.reference` for the masking convention.
  """
  if impl not in IMPLS:
    raise ValueError(f"unknown attention impl {impl!r}; expected one of {', '.join(IMPLS)}")
  return attention_reference(q, k, v, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, mask=mask,
                             scale=scale, dropout_rate=dropout_rate, dropout_rng=dropout_rng)


__all__ = ["attention", "attention_reference", "combined_mask", "segment_mask", "IMPLS"]
