"""Attention: one public function, a plain-jnp reference, Pallas kernels, and dispatch by ``impl``.

Shapes: q ``[batch, q_len, heads, head_dim]``, k and v ``[batch, kv_len, heads, head_dim]``;
output ``[batch, q_len, heads, head_dim]`` in q's dtype. Masking: a query attends to a key when
their segment ids are equal and non-zero (0 = padding); ``kv_segment_ids`` alone masks padded
keys only; ``mask`` (boolean, broadcastable to ``[batch, heads, q_len, kv_len]``) and
``block_mask`` (a static :class:`BlockSparseMask`) are and-ed in. Fully masked rows are zeros.

Modules: ``reference`` (plain jnp), ``tiles`` (per-tile flash math shared by all kernels),
``flash`` (custom_vjp wrapper and the loop-driver kernels for GPU/Triton and interpret mode),
``flash_tpu`` (grid-driver kernels for TPU/Mosaic), ``masks`` (block-sparse masks and helpers),
``block_sparse`` (block-sparse entry points), ``config`` (per-backend block sizes, interpret
switch), ``dispatch`` (``impl`` selection, cuDNN path), ``sharding`` (``shard_map`` wrapper).

Interpret mode: the Pallas kernels lower through Triton on GPU and Mosaic on TPU. On CPU an
explicit ``impl="pallas"`` runs them with ``pallas_call(interpret=True)`` (logged once) rather
than raising, so the exact kernel code is testable without an accelerator; ``impl="auto"`` on
CPU uses the XLA reference unless :func:`force_interpret` (or ``JAXFORMERS_PALLAS_INTERPRET=1``)
is set. See :mod:`jaxformers.kernels.attention.dispatch` for the full dispatch rules.
"""
from __future__ import annotations

import logging

import jax

from jaxformers.kernels.attention.block_sparse import block_sparse_attention, block_sparse_reference
from jaxformers.kernels.attention.config import (BlockSizes, default_block_sizes, force_interpret, interpret_forced,
                                                 kernel_backend, set_force_interpret)
from jaxformers.kernels.attention.dispatch import (IMPLS, choose_impl, cudnn_attention, cudnn_unsupported_reason,
                                                   log_once)
from jaxformers.kernels.attention.flash import flash_attention
from jaxformers.kernels.attention.masks import (BlockSparseMask, dense_block_sparse_mask, local_global_mask,
                                                sliding_window_mask, token_pattern)
from jaxformers.kernels.attention.reference import attention_reference, combined_mask, segment_mask


def attention(q, k, v, *, segment_ids=None, kv_segment_ids=None, mask=None, scale=None,
              impl: str = "auto", dropout_rate: float = 0.0, dropout_rng=None, dropout_impl: str = "hash",
              block_mask: BlockSparseMask | None = None, block_sizes: BlockSizes | None = None) -> jax.Array:
  """Bidirectional softmax attention, q/k/v ``[batch, length, heads, head_dim]``.

  ``impl``: ``"auto"``, ``"xla"`` (reference), ``"cudnn"`` or ``"pallas"`` (see the module
  docstring). ``block_mask`` restricts attention to a static block-sparse pattern (run by the
  block-sparse kernel under ``pallas``, as a dense mask under ``xla``). ``block_sizes`` overrides
  the per-backend default blocks of the dense Pallas kernel. Attention dropout (``xla`` only) draws its
  masks from ``dropout_rng`` with ``dropout_impl`` (see :mod:`jaxformers.dropout`).
  """
  if impl not in IMPLS:
    raise ValueError(f"unknown attention impl {impl!r}; expected one of {', '.join(IMPLS)}")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
  if block_mask is not None and not isinstance(block_mask, BlockSparseMask):
    raise ValueError(f"block_mask must be a BlockSparseMask or None, got {type(block_mask).__name__}")
  if impl == "auto":
    impl = choose_impl(q, k, v, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, mask=mask,
                       block_mask=block_mask, dropout_rate=dropout_rate)

  if impl == "xla":
    if block_mask is not None:
      token_mask = dense_block_sparse_mask(block_mask)
      mask = token_mask if mask is None else (mask & token_mask)
    return attention_reference(q, k, v, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, mask=mask,
                               scale=scale, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                               dropout_impl=dropout_impl)

  if impl == "cudnn":
    reason = cudnn_unsupported_reason(q, k, v, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, mask=mask,
                                      block_mask=block_mask, dropout_rate=dropout_rate,
                                      require_concrete_segments=False)
    if reason is not None:
      raise ValueError(f"impl='cudnn' cannot run this call: {reason}")
    return cudnn_attention(q, k, v, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, scale=scale)

  # impl == "pallas"
  if dropout_rate > 0.0:
    raise ValueError(f"impl='pallas' has no attention dropout (dropout_rate={dropout_rate}); use impl='xla' or 'auto'")
  if mask is not None:
    raise ValueError("impl='pallas' takes no dense `mask`; pass segment_ids or a block_mask, or use impl='xla'")
  if kernel_backend() == "interpret" and jax.default_backend() not in ("gpu", "tpu"):
    log_once(f"attention: impl='pallas' on the {jax.default_backend()} backend runs the kernels in interpret mode",
             logging.INFO)
  return flash_attention(q, k, v, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, scale=scale,
                         block_sizes=block_sizes, block_mask=block_mask)


from jaxformers.kernels.attention.sharding import sharded_attention  # noqa: E402  (needs `attention`)

__all__ = [
    "attention", "attention_reference", "combined_mask", "segment_mask", "IMPLS",
    "flash_attention", "block_sparse_attention", "block_sparse_reference",
    "BlockSparseMask", "local_global_mask", "sliding_window_mask", "token_pattern", "dense_block_sparse_mask",
    "BlockSizes", "default_block_sizes", "force_interpret", "set_force_interpret", "interpret_forced",
    "kernel_backend", "choose_impl", "cudnn_attention", "sharded_attention",
]
