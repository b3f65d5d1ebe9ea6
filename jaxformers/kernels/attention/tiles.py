"""The per-tile math of flash attention, shared by every kernel driver.

A tile is one (query block, key block) pair. Query-major tiles are ``[block_q, block_k]``
(forward, dq); key-major tiles are ``[block_k, block_q]`` (dk/dv, so no matmul needs a
transposed operand and the per-query vectors are lane-dense rows). Masking convention: a
query attends a key when their segment ids are equal and non-zero (0 = padding); with
``q_any`` only the key segment id must be non-zero. A block-sparse mask's token pattern
(window / global tokens) is and-ed in from absolute positions. Matmuls take the input dtype
and accumulate in float32; probabilities of masked pairs are exactly 0, so fully masked rows
get zero output and zero gradients.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from jaxformers.kernels.attention.masks import BlockSparseMask

NEG = -0.7 * float(np.finfo(np.float32).max)
NT = (((1,), (1,)), ((), ()))  # dot_general numbers for a @ b.T


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static settings of one attention launch (hashable: a ``custom_vjp`` nondiff argument)."""
  scale: float
  block_q: int
  block_k: int
  num_q_blocks: int
  num_kv_blocks: int
  q_any: bool  # only kv segment ids given: every query attends every non-padding key
  backend: str  # "interpret" | "interpret_tpu" | "triton" | "mosaic"
  block_mask: BlockSparseMask | None = None
  num_warps: int = 4
  num_stages: int = 2


def tile_mask(cfg: KernelConfig, qseg, kseg, q_block, k_block, key_major: bool = False):
  """Boolean tile of which query/key pairs may attend.

  Query-major: ``[block_q, block_k]`` from ``qseg [block_q, 1]`` and ``kseg [1, block_k]``.
  Key-major: ``[block_k, block_q]`` from ``qseg [1, block_q]`` and ``kseg [block_k, 1]``.
  """
  shape = (cfg.block_k, cfg.block_q) if key_major else (cfg.block_q, cfg.block_k)
  q_axis, k_axis = (1, 0) if key_major else (0, 1)
  valid = jnp.broadcast_to(kseg != 0, shape)
  if not cfg.q_any:
    valid = valid & (qseg == kseg)
  bm = cfg.block_mask
  if bm is not None and bm.has_token_pattern:
    qpos = q_block * cfg.block_q + lax.broadcasted_iota(jnp.int32, shape, q_axis)
    kpos = k_block * cfg.block_k + lax.broadcasted_iota(jnp.int32, shape, k_axis)
    pattern = jnp.abs(qpos - kpos) <= bm.window
    if bm.num_global:
      pattern = pattern | (qpos < bm.num_global) | (kpos < bm.num_global)
    valid = valid & pattern
  return valid


def fwd_init(block_q: int, head_dim: int):
  """Online-softmax state: running max ``m [Q,1]``, normaliser ``l [Q,1]``, accumulator ``[Q,D]``."""
  return (jnp.full((block_q, 1), NEG, jnp.float32), jnp.zeros((block_q, 1), jnp.float32),
          jnp.zeros((block_q, head_dim), jnp.float32))


def fwd_tile(cfg: KernelConfig, q_QH, k_KH, v_KH, qseg_Q1, kseg_1K, qi, kj, m_Q1, l_Q1, acc_QH):
  """One online-softmax step over a key block; returns the new ``(m, l, acc)``."""
  s_QK = lax.dot_general(q_QH, k_KH, NT, preferred_element_type=jnp.float32) * cfg.scale
  valid_QK = tile_mask(cfg, qseg_Q1, kseg_1K, qi, kj)
  s_QK = jnp.where(valid_QK, s_QK, NEG)
  m_new_Q1 = jnp.maximum(m_Q1, jnp.max(s_QK, axis=1, keepdims=True))
  p_QK = jnp.where(valid_QK, jnp.exp(s_QK - m_new_Q1), 0.0)
  alpha_Q1 = jnp.exp(m_Q1 - m_new_Q1)
  l_Q1 = alpha_Q1 * l_Q1 + jnp.sum(p_QK, axis=1, keepdims=True)
  pv_QH = jnp.dot(p_QK.astype(v_KH.dtype), v_KH, preferred_element_type=jnp.float32)
  return m_new_Q1, l_Q1, alpha_Q1 * acc_QH + pv_QH


def fwd_finish(m_Q1, l_Q1, acc_QH):
  """Normalised output (zeros for rows with no key) and logsumexp (0 for those rows)."""
  empty_Q1 = l_Q1 == 0.0
  l_safe_Q1 = jnp.where(empty_Q1, 1.0, l_Q1)
  o_QH = jnp.where(empty_Q1, 0.0, acc_QH / l_safe_Q1)
  lse_Q1 = jnp.where(empty_Q1, 0.0, m_Q1 + jnp.log(l_safe_Q1))
  return o_QH, lse_Q1


def dkv_tile(cfg: KernelConfig, q_QH, k_KH, v_KH, do_QH, lse_1Q, delta_1Q, qseg_1Q, kseg_K1, qi, kj, dk_KH, dv_KH):
  """Adds one query block's contribution to (unscaled) dk and dv, on key-major tiles."""
  s_KQ = lax.dot_general(k_KH, q_QH, NT, preferred_element_type=jnp.float32) * cfg.scale
  valid_KQ = tile_mask(cfg, qseg_1Q, kseg_K1, qi, kj, key_major=True)
  p_KQ = jnp.where(valid_KQ, jnp.exp(jnp.where(valid_KQ, s_KQ - lse_1Q, 0.0)), 0.0)
  dv_KH = dv_KH + jnp.dot(p_KQ.astype(do_QH.dtype), do_QH, preferred_element_type=jnp.float32)
  dp_KQ = lax.dot_general(v_KH, do_QH, NT, preferred_element_type=jnp.float32)
  ds_KQ = p_KQ * (dp_KQ - delta_1Q)
  dk_KH = dk_KH + jnp.dot(ds_KQ.astype(q_QH.dtype), q_QH, preferred_element_type=jnp.float32)
  return dk_KH, dv_KH


def dq_tile(cfg: KernelConfig, q_QH, k_KH, v_KH, do_QH, lse_Q1, delta_Q1, qseg_Q1, kseg_1K, qi, kj, dq_QH):
  """Adds one key block's contribution to (unscaled) dq, on query-major tiles."""
  s_QK = lax.dot_general(q_QH, k_KH, NT, preferred_element_type=jnp.float32) * cfg.scale
  valid_QK = tile_mask(cfg, qseg_Q1, kseg_1K, qi, kj)
  p_QK = jnp.where(valid_QK, jnp.exp(jnp.where(valid_QK, s_QK - lse_Q1, 0.0)), 0.0)
  dp_QK = lax.dot_general(do_QH, v_KH, NT, preferred_element_type=jnp.float32)
  ds_QK = p_QK * (dp_QK - delta_Q1)
  return dq_QH + jnp.dot(ds_QK.astype(k_KH.dtype), k_KH, preferred_element_type=jnp.float32)


_MATMUL_FLOPS = {"flash_fwd": 4, "flash_bwd_dkv": 8, "flash_bwd_dq": 6}   # 2 * (matmuls per query-key pair)


def cost_estimate(cfg: KernelConfig, name: str, args, out_shape):
  """What one launch costs, for XLA's cost analysis and scheduler (a kernel is opaque to it otherwise): FLOPs
  of its matmuls over the visited tiles, one exp per query-key pair, and the bytes of its operands and results."""
  B, N, _, H = args[0].shape
  pairs = cfg.num_q_blocks * cfg.block_q * cfg.num_kv_blocks * cfg.block_k
  if cfg.block_mask is not None:
    visited = int(np.sum(cfg.block_mask.kv_block_lists()[1]))
    pairs = visited * cfg.block_q * cfg.block_k
  factor = next(v for k, v in _MATMUL_FLOPS.items() if name.startswith(k))
  outs = out_shape if isinstance(out_shape, (list, tuple)) else [out_shape]
  nbytes = sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in list(args) + list(outs))
  return pl.CostEstimate(flops=factor * B * N * pairs * H, transcendentals=B * N * pairs, bytes_accessed=nbytes)
