"""Attention: one public function, a plain-jnp reference, Pallas kernels, and dispatch by ``impl``.

Shapes: q ``[batch, q_len, heads, head_dim]``, k and v ``[batch, kv_len, heads, head_dim]``;
output ``[batch, q_len, heads, head_dim]`` in q's dtype. Masking: a query attends to a key when
their segment ids are equal and non-zero (0 = padding); ``kv_segment_ids`` alone masks padded
keys only; ``mask`` (boolean, broadcastable to ``[batch, heads, q_len, kv_len]``) and
``block_mask`` (a static :class:`BlockSparseMask`) are and-ed in. Fully masked rows are zeros.

Modules: ``api`` (:func:`attention`), ``reference`` (plain jnp), ``tiles`` (per-tile flash math shared by all kernels),
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

from jaxformers.kernels.attention.api import attention
from jaxformers.kernels.attention.block_sparse import block_sparse_attention, block_sparse_reference
from jaxformers.kernels.attention.config import (BlockSizes, default_block_sizes, force_interpret, interpret_forced,
                                                 kernel_backend, set_force_interpret)
from jaxformers.kernels.attention.dispatch import IMPLS, choose_impl, cudnn_attention
from jaxformers.kernels.attention.flash import flash_attention
from jaxformers.kernels.attention.masks import (BlockSparseMask, dense_block_sparse_mask, local_global_mask,
                                                sliding_window_mask, token_pattern)
from jaxformers.kernels.attention.reference import attention_reference, combined_mask, segment_mask
from jaxformers.kernels.attention.sharding import sharded_attention

__all__ = [
    "attention", "attention_reference", "combined_mask", "segment_mask", "IMPLS",
    "flash_attention", "block_sparse_attention", "block_sparse_reference",
    "BlockSparseMask", "local_global_mask", "sliding_window_mask", "token_pattern", "dense_block_sparse_mask",
    "BlockSizes", "default_block_sizes", "force_interpret", "set_force_interpret", "interpret_forced",
    "kernel_backend", "choose_impl", "cudnn_attention", "sharded_attention",
]
