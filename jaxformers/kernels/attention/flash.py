"""Flash attention in Pallas: forward, and a backward made of two Pallas kernels (dk/dv and dq).

Layout inside the kernels is ``[batch, heads, length, head_dim]`` (``*_BNLD``); the public
wrapper :func:`flash_attention` takes ``[batch, length, heads, head_dim]`` like the reference.

Masking convention (same as the reference): query ``i`` attends key ``j`` when their segment
ids are equal and non-zero (0 = padding). When only ``kv_segment_ids`` is given, every query
attends every non-zero key. A :class:`~jaxformers.kernels.attention.masks.BlockSparseMask`
restricts the visited (query block, key block) pairs and applies its token pattern exactly.
Rows with no key to attend return zeros and get zero gradients.

Design (one source for every backend): the grid is ``(batch, heads, query blocks)`` for the
forward and dq kernels and ``(batch, heads, key blocks)`` for the dk/dv kernel. Each program
keeps its own block of queries (or keys) and loops with ``lax.fori_loop`` over the other side,
slicing it out of the full-length ref with ``pl.ds``: on GPU (Triton) the full-length ref
lives in global memory and only the visited blocks are loaded; on TPU (Mosaic) it is a
full-length VMEM block. The online softmax keeps running max ``m``, normaliser ``l`` and the
float32 accumulator as loop carries, so no scratch memory and no cross-program accumulation
is needed. The block-sparse variant loops over a per-block index list instead of
``range(num_blocks)``; on TPU the lists are scalar-prefetched into SMEM
(``PrefetchScalarGridSpec``), elsewhere they are ordinary int32 inputs.

Lengths are padded to the block size (and, for Triton, full-length refs to a power of two)
with segment id 0, so padded keys are masked and padded queries produce zeros that are
sliced away. Matmuls take the input dtype (float32 or bfloat16) and accumulate in float32.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from jaxformers.kernels.attention.config import BlockSizes, default_block_sizes, kernel_backend
from jaxformers.kernels.attention.masks import BlockSparseMask

_NEG = -0.7 * float(np.finfo(np.float32).max)
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)
MIN_HEAD_DIM, MAX_HEAD_DIM = 32, 128
BACKENDS = ("interpret", "interpret_tpu", "triton", "mosaic")
_NT = (((1,), (1,)), ((), ()))  # a @ b.T


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _next_pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class _Cfg:
  """Static settings of one kernel launch (hashable: a ``custom_vjp`` nondiff argument)."""
  scale: float
  block_q: int
  block_k: int
  num_q_blocks: int
  num_kv_blocks: int
  q_any: bool  # only kv segment ids: every query attends every non-padding key
  backend: str  # "interpret" | "triton" | "mosaic"
  block_mask: BlockSparseMask | None = None
  num_warps: int = 4
  num_stages: int = 2


def _tile_mask(cfg: _Cfg, qseg, kseg, q_block, k_block, key_major: bool = False):
  """Boolean tile of which query/key pairs may attend.

  Query-major (``key_major=False``): ``[block_q, block_k]`` from ``qseg [block_q, 1]`` and
  ``kseg [1, block_k]``. Key-major: ``[block_k, block_q]`` from ``qseg [1, block_q]`` and
  ``kseg [block_k, 1]`` (the dk/dv kernel works on transposed tiles).
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


def _loop_bounds(cfg: _Cfg, lists, row, dense_count):
  """(trip count, block index of step t) for the dense or the block-sparse loop."""
  if lists is None:
    return dense_count, lambda t: t
  idx_ref, cnt_ref = lists
  return cnt_ref[row], lambda t: idx_ref[row, t]


# ----------------------------------------------------------------------------- kernels


def _fwd_kernel(*refs, cfg: _Cfg):
  if cfg.block_mask is not None:
    idx_ref, cnt_ref, *refs = refs
    lists = (idx_ref, cnt_ref)
  else:
    lists = None
  q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref = refs
  qi = pl.program_id(2)
  q_QD = q_ref[...]
  qseg_Q1 = qseg_ref[...]
  bq, bk = cfg.block_q, cfg.block_k
  count, block_at = _loop_bounds(cfg, lists, qi, cfg.num_kv_blocks)

  def body(t, carry):
    m_Q1, l_Q1, acc_QD = carry
    kj = block_at(t)
    start = pl.multiple_of(kj * bk, bk)
    k_KD = k_ref[pl.ds(start, bk), :]
    v_KD = v_ref[pl.ds(start, bk), :]
    kseg_1K = kseg_ref[:, pl.ds(start, bk)]
    s_QK = lax.dot_general(q_QD, k_KD, _NT, preferred_element_type=jnp.float32) * cfg.scale
    valid_QK = _tile_mask(cfg, qseg_Q1, kseg_1K, qi, kj)
    s_QK = jnp.where(valid_QK, s_QK, _NEG)
    m_new_Q1 = jnp.maximum(m_Q1, jnp.max(s_QK, axis=1, keepdims=True))
    p_QK = jnp.where(valid_QK, jnp.exp(s_QK - m_new_Q1), 0.0)
    alpha_Q1 = jnp.exp(m_Q1 - m_new_Q1)
    l_Q1 = alpha_Q1 * l_Q1 + jnp.sum(p_QK, axis=1, keepdims=True)
    pv_QD = jnp.dot(p_QK.astype(v_KD.dtype), v_KD, preferred_element_type=jnp.float32)
    return m_new_Q1, l_Q1, alpha_Q1 * acc_QD + pv_QD

  init = (jnp.full((bq, 1), _NEG, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
          jnp.zeros(q_QD.shape, jnp.float32))
  m_Q1, l_Q1, acc_QD = lax.fori_loop(0, count, body, init)
  empty_Q1 = l_Q1 == 0.0
  l_safe_Q1 = jnp.where(empty_Q1, 1.0, l_Q1)
  o_ref[...] = jnp.where(empty_Q1, 0.0, acc_QD / l_safe_Q1).astype(o_ref.dtype)
  # Fully masked rows store lse = 0; the backward masks p explicitly so they get zero grads.
  lse_ref[...] = jnp.where(empty_Q1, 0.0, m_Q1 + jnp.log(l_safe_Q1))


def _dkv_kernel(*refs, cfg: _Cfg):
  """dk, dv for one key block; tiles are key-major ``[block_k, block_q]`` so no matmul needs a transposed lhs
  and the per-query vectors (lse, delta, segment ids) are lane-dense rows ``[1, length]``."""
  if cfg.block_mask is not None:
    idx_ref, cnt_ref, *refs = refs
    lists = (idx_ref, cnt_ref)
  else:
    lists = None
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dk_ref, dv_ref = refs
  kj = pl.program_id(2)
  k_KD = k_ref[...]
  v_KD = v_ref[...]
  kseg_K1 = kseg_ref[...]
  bq = cfg.block_q
  count, block_at = _loop_bounds(cfg, lists, kj, cfg.num_q_blocks)

  def body(t, carry):
    dk_KD, dv_KD = carry
    qi = block_at(t)
    start = pl.multiple_of(qi * bq, bq)
    q_QD = q_ref[pl.ds(start, bq), :]
    do_QD = do_ref[pl.ds(start, bq), :]
    lse_1Q = lse_ref[:, pl.ds(start, bq)]
    delta_1Q = delta_ref[:, pl.ds(start, bq)]
    qseg_1Q = qseg_ref[:, pl.ds(start, bq)]
    s_KQ = lax.dot_general(k_KD, q_QD, _NT, preferred_element_type=jnp.float32) * cfg.scale
    valid_KQ = _tile_mask(cfg, qseg_1Q, kseg_K1, qi, kj, key_major=True)
    p_KQ = jnp.where(valid_KQ, jnp.exp(jnp.where(valid_KQ, s_KQ - lse_1Q, 0.0)), 0.0)
    dv_KD = dv_KD + jnp.dot(p_KQ.astype(do_QD.dtype), do_QD, preferred_element_type=jnp.float32)
    dp_KQ = lax.dot_general(v_KD, do_QD, _NT, preferred_element_type=jnp.float32)
    ds_KQ = p_KQ * (dp_KQ - delta_1Q)
    dk_KD = dk_KD + jnp.dot(ds_KQ.astype(q_QD.dtype), q_QD, preferred_element_type=jnp.float32)
    return dk_KD, dv_KD

  zeros_KD = jnp.zeros(k_KD.shape, jnp.float32)
  dk_KD, dv_KD = lax.fori_loop(0, count, body, (zeros_KD, zeros_KD))
  dk_ref[...] = (dk_KD * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv_KD.astype(dv_ref.dtype)


def _dq_kernel(*refs, cfg: _Cfg):
  if cfg.block_mask is not None:
    idx_ref, cnt_ref, *refs = refs
    lists = (idx_ref, cnt_ref)
  else:
    lists = None
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dq_ref = refs
  qi = pl.program_id(2)
  q_QD = q_ref[...]
  do_QD = do_ref[...]
  lse_Q1 = lse_ref[...]
  delta_Q1 = delta_ref[...]
  qseg_Q1 = qseg_ref[...]
  bk = cfg.block_k
  count, block_at = _loop_bounds(cfg, lists, qi, cfg.num_kv_blocks)

  def body(t, dq_QD):
    kj = block_at(t)
    start = pl.multiple_of(kj * bk, bk)
    k_KD = k_ref[pl.ds(start, bk), :]
    v_KD = v_ref[pl.ds(start, bk), :]
    kseg_1K = kseg_ref[:, pl.ds(start, bk)]
    s_QK = lax.dot_general(q_QD, k_KD, _NT, preferred_element_type=jnp.float32) * cfg.scale
    valid_QK = _tile_mask(cfg, qseg_Q1, kseg_1K, qi, kj)
    p_QK = jnp.where(valid_QK, jnp.exp(jnp.where(valid_QK, s_QK - lse_Q1, 0.0)), 0.0)
    dp_QK = lax.dot_general(do_QD, v_KD, _NT, preferred_element_type=jnp.float32)
    ds_QK = p_QK * (dp_QK - delta_Q1)
    return dq_QD + jnp.dot(ds_QK.astype(k_KD.dtype), k_KD, preferred_element_type=jnp.float32)

  dq_QD = lax.fori_loop(0, count, body, jnp.zeros(q_QD.shape, jnp.float32))
  dq_ref[...] = (dq_QD * cfg.scale).astype(dq_ref.dtype)


# ----------------------------------------------------------------------------- launching


def _compiler_params(cfg: _Cfg):
  if cfg.backend == "triton":
    from jax.experimental.pallas import triton as plgpu
    return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
  if cfg.backend in ("mosaic", "interpret_tpu"):
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"))
  return None


def _interpret_arg(cfg: _Cfg):
  if cfg.backend == "interpret":
    return True
  if cfg.backend == "interpret_tpu":  # TPU semantics (SMEM scalar prefetch, Mosaic grid spec) emulated on CPU
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.InterpretParams()
  return False


def _lists_arrays(cfg: _Cfg, transpose: bool):
  """Index lists as int32 arrays, padded to powers of two for Triton."""
  idx, cnt = cfg.block_mask.q_block_lists() if transpose else cfg.block_mask.kv_block_lists()
  if cfg.backend == "triton":
    rows, cols = _next_pow2(idx.shape[0]), _next_pow2(idx.shape[1])
    idx = np.pad(idx, ((0, rows - idx.shape[0]), (0, cols - idx.shape[1])))
    cnt = np.pad(cnt, (0, rows - cnt.shape[0]))
  return jnp.asarray(idx, jnp.int32), jnp.asarray(cnt, jnp.int32)


def _launch(kernel, cfg: _Cfg, grid, in_specs, out_specs, out_shape, args, *, transpose_lists: bool, name: str):
  kernel = functools.partial(kernel, cfg=cfg)
  params = _compiler_params(cfg)
  interpret = _interpret_arg(cfg)
  if cfg.block_mask is None:
    return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          interpret=interpret, compiler_params=params, name=name)(*args)
  idx, cnt = _lists_arrays(cfg, transpose_lists)
  if cfg.backend in ("mosaic", "interpret_tpu"):
    from jax.experimental.pallas import tpu as pltpu
    grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=2, grid=grid, in_specs=in_specs,
                                             out_specs=out_specs)
    return pl.pallas_call(kernel, out_shape=out_shape, grid_spec=grid_spec, compiler_params=params,
                          interpret=interpret, name=name)(idx, cnt, *args)
  list_specs = [pl.BlockSpec(idx.shape, lambda *_: (0, 0)), pl.BlockSpec(cnt.shape, lambda *_: (0,))]
  return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, in_specs=list_specs + list(in_specs),
                        out_specs=out_specs, interpret=interpret, compiler_params=params,
                        name=name)(idx, cnt, *args)


def _row_spec(block, d):
  """Spec for one block of rows of a ``[B, N, L, d]`` array, indexed by grid axis 2."""
  return pl.BlockSpec((None, None, block, d), lambda b, n, i, *_: (b, n, i, 0))


def _full_spec(cfg: _Cfg, shape):
  """Spec for all of one head of a ``[B, N, *shape]`` array; its block index changes only with (b, n).

  On TPU it is single-buffered: it is fetched once per head, and double buffering would double
  the VMEM these full-length blocks take.
  """
  mode = pl.Buffered(1) if cfg.backend in ("mosaic", "interpret_tpu") else None
  return pl.BlockSpec((None, None) + tuple(shape), lambda b, n, i, *_: (b, n, 0, 0), pipeline_mode=mode)


def _fwd(q_BNQD, k_BNKD, v_BNKD, qseg_BQ1, kseg_B1K, cfg: _Cfg):
  B, N, Lq, D = q_BNQD.shape
  Lk = k_BNKD.shape[2]
  in_specs = [
      _row_spec(cfg.block_q, D), _full_spec(cfg, (Lk, D)), _full_spec(cfg, (Lk, D)),
      pl.BlockSpec((None, cfg.block_q, 1), lambda b, n, i, *_: (b, i, 0)),
      pl.BlockSpec((None, 1, Lk), lambda b, n, i, *_: (b, 0, 0)),
  ]
  out_specs = [_row_spec(cfg.block_q, D), _row_spec(cfg.block_q, 1)]
  out_shape = [jax.ShapeDtypeStruct(q_BNQD.shape, q_BNQD.dtype), jax.ShapeDtypeStruct((B, N, Lq, 1), jnp.float32)]
  o_BNQD, lse_BNQ1 = _launch(_fwd_kernel, cfg, (B, N, cfg.num_q_blocks), in_specs, out_specs, out_shape,
                             (q_BNQD, k_BNKD, v_BNKD, qseg_BQ1, kseg_B1K), transpose_lists=False,
                             name="flash_fwd")
  return o_BNQD, lse_BNQ1


def _bwd(q_BNQD, k_BNKD, v_BNKD, qseg_BQ1, kseg_B1K, o_BNQD, lse_BNQ1, do_BNQD, cfg: _Cfg):
  B, N, Lq, D = q_BNQD.shape
  Lk = k_BNKD.shape[2]
  valid_rows = cfg.num_q_blocks * cfg.block_q
  delta_BNQ1 = jnp.sum(do_BNQD[:, :, :valid_rows].astype(jnp.float32) * o_BNQD[:, :, :valid_rows].astype(jnp.float32),
                       axis=-1, keepdims=True)
  delta_BNQ1 = jnp.pad(delta_BNQ1, ((0, 0), (0, 0), (0, Lq - valid_rows), (0, 0)))
  lse_BNQ1 = jnp.where(jnp.arange(Lq)[:, None] < valid_rows, lse_BNQ1, 0.0)

  # The dk/dv kernel reads per-query vectors as rows [1, Lq] and key segment ids as columns.
  kv_specs = [
      _full_spec(cfg, (Lq, D)), _row_spec(cfg.block_k, D), _row_spec(cfg.block_k, D), _full_spec(cfg, (Lq, D)),
      _full_spec(cfg, (1, Lq)), _full_spec(cfg, (1, Lq)),
      pl.BlockSpec((None, 1, Lq), lambda b, n, j, *_: (b, 0, 0)),
      pl.BlockSpec((None, cfg.block_k, 1), lambda b, n, j, *_: (b, j, 0)),
  ]
  dk_BNKD, dv_BNKD = _launch(
      _dkv_kernel, cfg, (B, N, cfg.num_kv_blocks), kv_specs,
      [_row_spec(cfg.block_k, D), _row_spec(cfg.block_k, D)],
      [jax.ShapeDtypeStruct(k_BNKD.shape, k_BNKD.dtype), jax.ShapeDtypeStruct(v_BNKD.shape, v_BNKD.dtype)],
      (q_BNQD, k_BNKD, v_BNKD, do_BNQD, lse_BNQ1.reshape(B, N, 1, Lq), delta_BNQ1.reshape(B, N, 1, Lq),
       qseg_BQ1.reshape(B, 1, Lq), kseg_B1K.reshape(B, Lk, 1)),
      transpose_lists=True, name="flash_bwd_dkv")

  q_specs = [
      _row_spec(cfg.block_q, D), _full_spec(cfg, (Lk, D)), _full_spec(cfg, (Lk, D)), _row_spec(cfg.block_q, D),
      _row_spec(cfg.block_q, 1), _row_spec(cfg.block_q, 1),
      pl.BlockSpec((None, cfg.block_q, 1), lambda b, n, i, *_: (b, i, 0)),
      pl.BlockSpec((None, 1, Lk), lambda b, n, i, *_: (b, 0, 0)),
  ]
  dq_BNQD = _launch(
      _dq_kernel, cfg, (B, N, cfg.num_q_blocks), q_specs, _row_spec(cfg.block_q, D),
      jax.ShapeDtypeStruct(q_BNQD.shape, q_BNQD.dtype),
      (q_BNQD, k_BNKD, v_BNKD, do_BNQD, lse_BNQ1, delta_BNQ1, qseg_BQ1, kseg_B1K),
      transpose_lists=False, name="flash_bwd_dq")
  return dq_BNQD, dk_BNKD, dv_BNKD


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash_padded(q_BNQD, k_BNKD, v_BNKD, qseg_BQ1, kseg_B1K, cfg: _Cfg):
  return _fwd(q_BNQD, k_BNKD, v_BNKD, qseg_BQ1, kseg_B1K, cfg)[0]


def _flash_padded_fwd(q_BNQD, k_BNKD, v_BNKD, qseg_BQ1, kseg_B1K, cfg: _Cfg):
  o_BNQD, lse_BNQ1 = _fwd(q_BNQD, k_BNKD, v_BNKD, qseg_BQ1, kseg_B1K, cfg)
  return o_BNQD, (q_BNQD, k_BNKD, v_BNKD, qseg_BQ1, kseg_B1K, o_BNQD, lse_BNQ1)


def _flash_padded_bwd(cfg: _Cfg, res, do_BNQD):
  q_BNQD, k_BNKD, v_BNKD, qseg_BQ1, kseg_B1K, o_BNQD, lse_BNQ1 = res
  dq, dk, dv = _bwd(q_BNQD, k_BNKD, v_BNKD, qseg_BQ1, kseg_B1K, o_BNQD, lse_BNQ1, do_BNQD, cfg)
  return dq, dk, dv, None, None


_flash_padded.defvjp(_flash_padded_fwd, _flash_padded_bwd)


# ----------------------------------------------------------------------------- public wrapper


def check_inputs(q, k, v, *, segment_ids=None, kv_segment_ids=None) -> None:
  """Raises ValueError when the kernels cannot take these arguments."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [batch, length, heads, head_dim]; got shapes {q.shape}, {k.shape}, {v.shape}")
  if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: k and v must match, and batch, heads, "
                     "head_dim must agree with q")
  if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
    raise ValueError(f"q, k, v dtypes must be equal and one of float32, bfloat16; got {q.dtype}, {k.dtype}, {v.dtype}")
  D = q.shape[-1]
  if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM or D % 8:
    raise ValueError(f"head_dim must be a multiple of 8 in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}] for the Pallas "
                     f"kernels, got {D}")
  if segment_ids is not None and segment_ids.shape != q.shape[:2]:
    raise ValueError(f"segment_ids must be [batch, q_len] = {q.shape[:2]}, got {segment_ids.shape}")
  if kv_segment_ids is not None and kv_segment_ids.shape != k.shape[:2]:
    raise ValueError(f"kv_segment_ids must be [batch, kv_len] = {k.shape[:2]}, got {kv_segment_ids.shape}")


def flash_attention(q_BLND, k_BLND, v_BLND, *, segment_ids=None, kv_segment_ids=None, scale: float | None = None,
                    block_sizes: BlockSizes | None = None, block_mask: BlockSparseMask | None = None,
                    backend: str | None = None, num_warps: int | None = None, num_stages: int = 2):
  """Flash attention, q/k/v ``[batch, length, heads, head_dim]`` -> ``[batch, q_len, heads, head_dim]``.

  Differentiable in q, k, v through Pallas backward kernels. ``segment_ids`` ``[batch, q_len]``
  and ``kv_segment_ids`` ``[batch, kv_len]`` follow the reference convention (0 = padding).
  ``block_mask`` (its block sizes override ``block_sizes``) selects the block-sparse kernel.
  ``backend`` is ``"interpret"`` (generic Pallas interpreter), ``"interpret_tpu"`` (the Mosaic
  call path, scalar-prefetched lists included, under the TPU interpreter on CPU), ``"triton"``
  or ``"mosaic"``; None picks from the current JAX backend (interpret on CPU or when forced).
  """
  check_inputs(q_BLND, k_BLND, v_BLND, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids)
  B, Lq, N, D = q_BLND.shape
  Lk = k_BLND.shape[1]
  backend = backend or kernel_backend()
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
  if block_mask is not None:
    if (block_mask.q_len, block_mask.kv_len) != (Lq, Lk):
      raise ValueError(f"block_mask is for (q_len, kv_len) = ({block_mask.q_len}, {block_mask.kv_len}), "
                       f"inputs have ({Lq}, {Lk})")
    bs = BlockSizes(block_mask.block_q, block_mask.block_k)
  else:
    platform = {"triton": "gpu", "mosaic": "tpu", "interpret": "cpu", "interpret_tpu": "cpu"}[backend]
    bs = block_sizes or default_block_sizes(platform, D)
  if backend == "triton" and (bs.block_q & (bs.block_q - 1) or bs.block_k & (bs.block_k - 1)):
    raise ValueError(f"block sizes must be powers of two on GPU (Triton), got {bs}")
  scale = D**-0.5 if scale is None else float(scale)

  nq, nk = _cdiv(Lq, bs.block_q), _cdiv(Lk, bs.block_k)
  Lq_pad, Lk_pad = nq * bs.block_q, nk * bs.block_k
  D_pad = D
  if backend == "triton":  # Triton blocks are powers of two; full-length refs and head_dim too
    Lq_pad, Lk_pad, D_pad = _next_pow2(Lq_pad), _next_pow2(Lk_pad), _next_pow2(D)

  q_any = segment_ids is None and kv_segment_ids is not None
  qseg_BQ = jnp.ones((B, Lq), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  if kv_segment_ids is not None:
    kseg_BK = kv_segment_ids.astype(jnp.int32)
  elif segment_ids is not None and Lk == Lq:
    kseg_BK = qseg_BQ
  elif segment_ids is not None:
    raise ValueError("segment_ids with q_len != kv_len needs kv_segment_ids")
  else:
    kseg_BK = jnp.ones((B, Lk), jnp.int32)
  qseg_BQ1 = jnp.pad(qseg_BQ, ((0, 0), (0, Lq_pad - Lq)))[:, :, None]
  kseg_B1K = jnp.pad(kseg_BK, ((0, 0), (0, Lk_pad - Lk)))[:, None, :]

  def prep(x_BLND, L_pad):
    x_BNLD = jnp.transpose(x_BLND, (0, 2, 1, 3))
    return jnp.pad(x_BNLD, ((0, 0), (0, 0), (0, L_pad - x_BNLD.shape[2]), (0, D_pad - D)))

  cfg = _Cfg(scale=scale, block_q=bs.block_q, block_k=bs.block_k, num_q_blocks=nq, num_kv_blocks=nk,
             q_any=q_any, backend=backend, block_mask=block_mask,
             num_warps=num_warps or (4 if D_pad <= 64 else 8), num_stages=num_stages)
  o_BNQD = _flash_padded(prep(q_BLND, Lq_pad), prep(k_BLND, Lk_pad), prep(v_BLND, Lk_pad), qseg_BQ1, kseg_B1K, cfg)
  return jnp.transpose(o_BNQD[:, :, :Lq, :D], (0, 2, 1, 3))
