"""Block-sparse attention: the flash kernels walking only the block pairs of a static mask.

``block_sparse_attention`` runs the Pallas kernels with a
:class:`~jaxformers.kernels.attention.masks.BlockSparseMask`; ``block_sparse_reference`` is its
dense plain-jnp twin (the reference with the mask's token-level mask and-ed in). Shapes are
q/k/v ``[batch, length, heads, head_dim]``; segment ids ``[batch, length]`` (0 = padding,
equal non-zero ids attend) are and-ed with the block mask.
"""
from __future__ import annotations

import jax

from jaxformers.kernels.attention.flash import flash_attention
from jaxformers.kernels.attention.masks import BlockSparseMask, dense_block_sparse_mask
from jaxformers.kernels.attention.reference import attention_reference


def block_sparse_attention(q, k, v, block_mask: BlockSparseMask, *, segment_ids=None, kv_segment_ids=None,
                           scale: float | None = None, backend: str | None = None) -> jax.Array:
  """Pallas block-sparse attention; cost proportional to the number of visited block pairs."""
  if not isinstance(block_mask, BlockSparseMask):
    raise ValueError(f"block_mask must be a BlockSparseMask, got {type(block_mask).__name__}")
  return flash_attention(q, k, v, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, scale=scale,
                         block_mask=block_mask, backend=backend)


def block_sparse_reference(q, k, v, block_mask: BlockSparseMask, *, segment_ids=None, kv_segment_ids=None,
                           scale: float | None = None) -> jax.Array:
  """Dense reference attention with the same token-level mask as :func:`block_sparse_attention`."""
  mask = dense_block_sparse_mask(block_mask, segment_ids, kv_segment_ids)
  return attention_reference(q, k, v, mask=mask, scale=scale)
