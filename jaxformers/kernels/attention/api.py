"""The public ``attention()``: checks its arguments and runs the implementation ``impl`` names."""
from __future__ import annotations

import logging

import jax

from jaxformers.kernels.attention.config import BlockSizes
from jaxformers.kernels.attention.dispatch import (IMPLS, choose_impl, cudnn_attention, cudnn_unsupported_reason,
                                                   log_once)
from jaxformers.kernels.attention.flash import flash_attention
from jaxformers.kernels.attention.masks import BlockSparseMask, dense_block_sparse_mask
from jaxformers.kernels.attention.reference import attention_reference
from jaxformers.targets import Target, as_target, current_target


def attention(q, k, v, *, segment_ids=None, kv_segment_ids=None, mask=None, scale=None,
              impl: str = "auto", dropout_rate: float = 0.0, dropout_rng=None, dropout_impl: str = "hash",
              block_mask: BlockSparseMask | None = None, block_sizes: BlockSizes | None = None,
              target: Target | str | None = None) -> jax.Array:
  """Bidirectional softmax attention, q/k/v ``[batch, length, heads, head_dim]``.

  ``impl``: ``"auto"``, ``"xla"`` (reference), ``"cudnn"`` or ``"pallas"`` (see the module
  docstring). ``block_mask`` restricts attention to a static block-sparse pattern (run by the
  block-sparse kernel under ``pallas``, as a dense mask under ``xla``). ``block_sizes`` overrides
  the per-backend default blocks of the dense Pallas kernel. Attention dropout (``xla`` only) draws its
  masks from ``dropout_rng`` with ``dropout_impl`` (see :mod:`jaxformers.dropout`). ``target`` (a
  :class:`~jaxformers.targets.Target` or a chip / platform name; default the current target) decides the
  implementation ``auto`` picks, the kernels' lowering and their default block sizes.
  """
  target = current_target() if target is None else as_target(target)
  if impl not in IMPLS:
    raise ValueError(f"unknown attention impl {impl!r}; expected one of {', '.join(IMPLS)}")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
  if block_mask is not None and not isinstance(block_mask, BlockSparseMask):
    raise ValueError(f"block_mask must be a BlockSparseMask or None, got {type(block_mask).__name__}")
  if impl == "auto":
    impl = choose_impl(q, k, v, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, mask=mask,
                       block_mask=block_mask, dropout_rate=dropout_rate, target=target)

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
                                      require_concrete_segments=False, target=target)
    if reason is not None:
      raise ValueError(f"impl='cudnn' cannot run this call: {reason}")
    return cudnn_attention(q, k, v, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, scale=scale)

  # impl == "pallas"
  if dropout_rate > 0.0:
    raise ValueError(f"impl='pallas' has no attention dropout (dropout_rate={dropout_rate}); use impl='xla' or 'auto'")
  if mask is not None:
    raise ValueError("impl='pallas' takes no dense `mask`; pass segment_ids or a block_mask, or use impl='xla'")
  backend = target.kernel_backend
  if backend is None:
    raise ValueError(f"impl='pallas': the Pallas kernels have no lowering for {target.spec.label}; use impl='auto' "
                     f"(XLA attention there) or 'xla'")
  if target.platform == "cpu":
    log_once("attention: impl='pallas' on the cpu backend runs the kernels in interpret mode", logging.INFO)
  return flash_attention(q, k, v, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, scale=scale,
                         block_sizes=block_sizes, block_mask=block_mask, target=target)
