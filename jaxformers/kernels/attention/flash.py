"""Flash attention in Pallas: forward, and a backward made of two Pallas kernels (dk/dv and dq).

Layout inside the kernels is ``[batch, heads, length, head_dim]`` (``*_BNLD``); the public
wrapper :func:`flash_attention` takes ``[batch, length, heads, head_dim]`` like the reference.

Masking convention (same as the reference): query ``i`` attends key ``j`` when their segment
ids are equal and non-zero (0 = padding). When only ``kv_segment_ids`` is given, every query
attends every non-zero key. A :class:`~jaxformers.kernels.attention.masks.BlockSparseMask`
restricts the visited (query block, key block) pairs and applies its token pattern exactly.
Rows with no key to attend return zeros and get zero gradients.

The per-tile math (:mod:`~jaxformers.kernels.attention.tiles`) is one source for all backends;
two drivers walk the tiles:

* loop driver (this module; GPU via Triton, and the generic interpreter): grid
  ``(batch, heads, own blocks)``; each program keeps its query (or key) block and runs a
  ``lax.fori_loop`` over the other side, slicing it with ``pl.ds`` out of a full-length ref that
  lives in global memory, so only visited blocks are loaded. The online-softmax state and the
  accumulators are loop carries. Block-sparse: the loop runs over a per-block index list
  (int32 inputs) instead of ``range(num_blocks)``. Triton needs power-of-two shapes, so the
  full-length refs are padded to a power of two and head_dim to the next power of two.
* grid driver (:mod:`~jaxformers.kernels.attention.flash_tpu`; TPU via Mosaic, and the TPU
  interpreter): the tile loop is an ``"arbitrary"`` grid axis, block-sparse lists are
  scalar-prefetched, accumulators live in VMEM scratch.

Lengths are padded to the block size with segment id 0, so padded keys are masked and padded
queries produce zeros that are sliced away. Matmuls take the input dtype (float32 or
bfloat16) and accumulate in float32.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxformers.kernels.attention import flash_tpu, tiles
from jaxformers.kernels.attention.config import BlockSizes, default_block_sizes
from jaxformers.kernels.attention.masks import BlockSparseMask
from jaxformers.kernels.attention.tiles import KernelConfig
from jaxformers.targets import Target, as_target, current_target

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)
MIN_HEAD_DIM, MAX_HEAD_DIM = 32, 128
BACKENDS = ("interpret", "interpret_gpu", "interpret_tpu", "triton", "mosaic")
TPU_BACKENDS = ("mosaic", "interpret_tpu")
POW2_BACKENDS = ("triton", "interpret_gpu")  # Triton's power-of-two shapes (interpret_gpu: same padding, interpreted)


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _next_pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


# ----------------------------------------------------------------------------- loop-driver kernels


def _split_lists(cfg: KernelConfig, refs):
  """(index-list refs or None, remaining refs)."""
  if cfg.block_mask is None:
    return None, refs
  return refs[:2], refs[2:]


def _loop_bounds(lists, own, dense_count):
  """(trip count, block index of step t) for the dense or the block-sparse loop."""
  if lists is None:
    return dense_count, lambda t: t
  idx_ref, cnt_ref = lists
  return cnt_ref[own], lambda t: idx_ref[own, t]


def _fwd_kernel(*refs, cfg: KernelConfig):
  lists, refs = _split_lists(cfg, refs)
  q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref = refs
  qi = pl.program_id(2)
  q_QH, qseg_Q1 = q_ref[...], qseg_ref[...]
  bk = cfg.block_k
  count, block_at = _loop_bounds(lists, qi, cfg.num_kv_blocks)

  def body(t, carry):
    kj = block_at(t)
    start = pl.multiple_of(kj * bk, bk)
    return tiles.fwd_tile(cfg, q_QH, k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :], qseg_Q1,
                          kseg_ref[:, pl.ds(start, bk)], qi, kj, *carry)

  m_Q1, l_Q1, acc_QH = lax.fori_loop(0, count, body, tiles.fwd_init(*q_QH.shape))
  o_QH, lse_Q1 = tiles.fwd_finish(m_Q1, l_Q1, acc_QH)
  o_ref[...] = o_QH.astype(o_ref.dtype)
  lse_ref[...] = lse_Q1


def _dkv_kernel(*refs, cfg: KernelConfig):
  lists, refs = _split_lists(cfg, refs)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dk_ref, dv_ref = refs
  kj = pl.program_id(2)
  k_KH, v_KH, kseg_K1 = k_ref[...], v_ref[...], kseg_ref[...]
  bq = cfg.block_q
  count, block_at = _loop_bounds(lists, kj, cfg.num_q_blocks)

  def body(t, carry):
    qi = block_at(t)
    start = pl.multiple_of(qi * bq, bq)
    rows = pl.ds(start, bq)
    return tiles.dkv_tile(cfg, q_ref[rows, :], k_KH, v_KH, do_ref[rows, :], lse_ref[:, rows], delta_ref[:, rows],
                          qseg_ref[:, rows], kseg_K1, qi, kj, *carry)

  zeros_KH = jnp.zeros(k_KH.shape, jnp.float32)
  dk_KH, dv_KH = lax.fori_loop(0, count, body, (zeros_KH, zeros_KH))
  dk_ref[...] = (dk_KH * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv_KH.astype(dv_ref.dtype)


def _dq_kernel(*refs, cfg: KernelConfig):
  lists, refs = _split_lists(cfg, refs)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dq_ref = refs
  qi = pl.program_id(2)
  q_QH, do_QH, lse_Q1, delta_Q1, qseg_Q1 = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...], qseg_ref[...]
  bk = cfg.block_k
  count, block_at = _loop_bounds(lists, qi, cfg.num_kv_blocks)

  def body(t, dq_QH):
    kj = block_at(t)
    start = pl.multiple_of(kj * bk, bk)
    cols = pl.ds(start, bk)
    return tiles.dq_tile(cfg, q_QH, k_ref[cols, :], v_ref[cols, :], do_QH, lse_Q1, delta_Q1, qseg_Q1,
                         kseg_ref[:, cols], qi, kj, dq_QH)

  dq_QH = lax.fori_loop(0, count, body, jnp.zeros(q_QH.shape, jnp.float32))
  dq_ref[...] = (dq_QH * cfg.scale).astype(dq_ref.dtype)


# ----------------------------------------------------------------------------- loop-driver launching


def _compiler_params(cfg: KernelConfig):
  if cfg.backend == "triton":
    return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
  return None


def _lists_arrays(cfg: KernelConfig, transpose: bool):
  """Index lists as int32 arrays, padded to powers of two for Triton."""
  idx, cnt = cfg.block_mask.q_block_lists() if transpose else cfg.block_mask.kv_block_lists()
  if cfg.backend in POW2_BACKENDS:
    rows, cols = _next_pow2(idx.shape[0]), _next_pow2(idx.shape[1])
    idx = np.pad(idx, ((0, rows - idx.shape[0]), (0, cols - idx.shape[1])))
    cnt = np.pad(cnt, (0, rows - cnt.shape[0]))
  return jnp.asarray(idx, jnp.int32), jnp.asarray(cnt, jnp.int32)


def _launch(kernel, cfg: KernelConfig, grid, in_specs, out_specs, out_shape, args, *, transpose_lists: bool,
            name: str):
  kernel = functools.partial(kernel, cfg=cfg)
  call = functools.partial(pl.pallas_call, kernel, out_shape=out_shape, grid=grid, out_specs=out_specs,
                           interpret=cfg.backend in ("interpret", "interpret_gpu"), compiler_params=_compiler_params(cfg),
                           name=name, cost_estimate=tiles.cost_estimate(cfg, name, args, out_shape))
  if cfg.block_mask is None:
    return call(in_specs=in_specs)(*args)
  idx, cnt = _lists_arrays(cfg, transpose_lists)
  list_specs = [pl.BlockSpec(idx.shape, lambda *_: (0, 0)), pl.BlockSpec(cnt.shape, lambda *_: (0,))]
  return call(in_specs=list_specs + list(in_specs))(idx, cnt, *args)


def _own_spec(block, d):
  """One block of rows of a ``[B, N, L, d]`` array, indexed by grid axis 2."""
  return pl.BlockSpec((None, None, block, d), lambda b, n, i: (b, n, i, 0))


def _head_spec(shape):
  """All of one head of a ``[B, N, *shape]`` array (left in global memory by Triton, sliced in the loop)."""
  return pl.BlockSpec((None, None) + tuple(shape), lambda b, n, i: (b, n, 0, 0))


def _fwd(q_BNQH, k_BNKH, v_BNKH, qseg_BQ1, kseg_B1K, cfg: KernelConfig):
  """Output ``[B, N, Lq, H]`` and logsumexp ``[B, N, Lq, 1]`` (rows past the last query block unset)."""
  if cfg.backend in TPU_BACKENDS:
    return flash_tpu.fwd(q_BNQH, k_BNKH, v_BNKH, qseg_BQ1, kseg_B1K, cfg)
  B, N, Lq, H = q_BNQH.shape
  Lk = k_BNKH.shape[2]
  in_specs = [
      _own_spec(cfg.block_q, H), _head_spec((Lk, H)), _head_spec((Lk, H)),
      pl.BlockSpec((None, cfg.block_q, 1), lambda b, n, i: (b, i, 0)),
      pl.BlockSpec((None, 1, Lk), lambda b, n, i: (b, 0, 0)),
  ]
  out_specs = [_own_spec(cfg.block_q, H), _own_spec(cfg.block_q, 1)]
  out_shape = [jax.ShapeDtypeStruct(q_BNQH.shape, q_BNQH.dtype), jax.ShapeDtypeStruct((B, N, Lq, 1), jnp.float32)]
  return _launch(_fwd_kernel, cfg, (B, N, cfg.num_q_blocks), in_specs, out_specs, out_shape,
                 (q_BNQH, k_BNKH, v_BNKH, qseg_BQ1, kseg_B1K), transpose_lists=False, name="flash_fwd")


def _bwd(q_BNQH, k_BNKH, v_BNKH, qseg_BQ1, kseg_B1K, o_BNQH, lse_BNQ1, do_BNQH, cfg: KernelConfig):
  B, N, Lq, H = q_BNQH.shape
  Lk = k_BNKH.shape[2]
  # delta = rowsum(dO * O); rows past the last query block (Triton's power-of-two padding) are unset: zero them.
  rows_Q1 = jnp.arange(Lq)[:, None] < cfg.num_q_blocks * cfg.block_q
  delta_BNQ1 = jnp.sum(do_BNQH.astype(jnp.float32) * o_BNQH.astype(jnp.float32), axis=-1, keepdims=True)
  delta_BNQ1 = jnp.where(rows_Q1, delta_BNQ1, 0.0)
  lse_BNQ1 = jnp.where(rows_Q1, lse_BNQ1, 0.0)
  if cfg.backend in TPU_BACKENDS:
    return flash_tpu.bwd(q_BNQH, k_BNKH, v_BNKH, qseg_BQ1, kseg_B1K, lse_BNQ1, delta_BNQ1, do_BNQH, cfg)

  # The dk/dv kernel reads per-query vectors as rows [1, Lq] and key segment ids as columns.
  kv_specs = [
      _head_spec((Lq, H)), _own_spec(cfg.block_k, H), _own_spec(cfg.block_k, H), _head_spec((Lq, H)),
      _head_spec((1, Lq)), _head_spec((1, Lq)),
      pl.BlockSpec((None, 1, Lq), lambda b, n, j: (b, 0, 0)),
      pl.BlockSpec((None, cfg.block_k, 1), lambda b, n, j: (b, j, 0)),
  ]
  dk_BNKH, dv_BNKH = _launch(
      _dkv_kernel, cfg, (B, N, cfg.num_kv_blocks), kv_specs, [_own_spec(cfg.block_k, H)] * 2,
      [jax.ShapeDtypeStruct(k_BNKH.shape, k_BNKH.dtype), jax.ShapeDtypeStruct(v_BNKH.shape, v_BNKH.dtype)],
      (q_BNQH, k_BNKH, v_BNKH, do_BNQH, lse_BNQ1.reshape(B, N, 1, Lq), delta_BNQ1.reshape(B, N, 1, Lq),
       qseg_BQ1.reshape(B, 1, Lq), kseg_B1K.reshape(B, Lk, 1)),
      transpose_lists=True, name="flash_bwd_dkv")

  q_specs = [
      _own_spec(cfg.block_q, H), _head_spec((Lk, H)), _head_spec((Lk, H)), _own_spec(cfg.block_q, H),
      _own_spec(cfg.block_q, 1), _own_spec(cfg.block_q, 1),
      pl.BlockSpec((None, cfg.block_q, 1), lambda b, n, i: (b, i, 0)),
      pl.BlockSpec((None, 1, Lk), lambda b, n, i: (b, 0, 0)),
  ]
  dq_BNQH = _launch(
      _dq_kernel, cfg, (B, N, cfg.num_q_blocks), q_specs, _own_spec(cfg.block_q, H),
      jax.ShapeDtypeStruct(q_BNQH.shape, q_BNQH.dtype),
      (q_BNQH, k_BNKH, v_BNKH, do_BNQH, lse_BNQ1, delta_BNQ1, qseg_BQ1, kseg_B1K),
      transpose_lists=False, name="flash_bwd_dq")
  return dq_BNQH, dk_BNKH, dv_BNKH


# ----------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash_padded(q_BNQH, k_BNKH, v_BNKH, qseg_BQ1, kseg_B1K, cfg: KernelConfig):
  return _fwd(q_BNQH, k_BNKH, v_BNKH, qseg_BQ1, kseg_B1K, cfg)[0]


def _flash_padded_fwd(q_BNQH, k_BNKH, v_BNKH, qseg_BQ1, kseg_B1K, cfg: KernelConfig):
  o_BNQH, lse_BNQ1 = _fwd(q_BNQH, k_BNKH, v_BNKH, qseg_BQ1, kseg_B1K, cfg)
  return o_BNQH, (q_BNQH, k_BNKH, v_BNKH, qseg_BQ1, kseg_B1K, o_BNQH, lse_BNQ1)


def _flash_padded_bwd(cfg: KernelConfig, res, do_BNQH):
  q_BNQH, k_BNKH, v_BNKH, qseg_BQ1, kseg_B1K, o_BNQH, lse_BNQ1 = res
  dq, dk, dv = _bwd(q_BNQH, k_BNKH, v_BNKH, qseg_BQ1, kseg_B1K, o_BNQH, lse_BNQ1, do_BNQH, cfg)
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
  H = q.shape[-1]
  if not MIN_HEAD_DIM <= H <= MAX_HEAD_DIM or H % 8:
    raise ValueError(f"head_dim must be a multiple of 8 in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}] for the Pallas "
                     f"kernels, got {H}")
  if segment_ids is not None and segment_ids.shape != q.shape[:2]:
    raise ValueError(f"segment_ids must be [batch, q_len] = {q.shape[:2]}, got {segment_ids.shape}")
  if kv_segment_ids is not None and kv_segment_ids.shape != k.shape[:2]:
    raise ValueError(f"kv_segment_ids must be [batch, kv_len] = {k.shape[:2]}, got {kv_segment_ids.shape}")


def flash_attention(q_BLNH, k_BLNH, v_BLNH, *, segment_ids=None, kv_segment_ids=None, scale: float | None = None,
                    block_sizes: BlockSizes | None = None, block_mask: BlockSparseMask | None = None,
                    backend: str | None = None, num_warps: int | None = None, num_stages: int = 2,
                    target: Target | str | None = None):
  """Flash attention, q/k/v ``[batch, length, heads, head_dim]`` -> ``[batch, q_len, heads, head_dim]``.

  Differentiable in q, k, v through Pallas backward kernels. ``segment_ids`` ``[batch, q_len]``
  and ``kv_segment_ids`` ``[batch, kv_len]`` follow the reference convention (0 = padding).
  ``block_mask`` (its block sizes override ``block_sizes``) selects the block-sparse kernel.
  ``backend`` is ``"interpret"`` (loop driver, generic Pallas interpreter), ``"interpret_gpu"``
  (the same with Triton's power-of-two padding), ``"interpret_tpu"`` (grid driver with
  scalar-prefetched lists, under the TPU interpreter on CPU), ``"triton"``
  (loop driver, GPU) or ``"mosaic"`` (grid driver, TPU); None takes ``target``'s lowering (a
  :class:`~jaxformers.targets.Target` or name; default the current target). Default block sizes are the
  target chip's for this head_dim and length (see :func:`default_block_sizes`).
  """
  check_inputs(q_BLNH, k_BLNH, v_BLNH, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids)
  B, Lq, N, H = q_BLNH.shape
  Lk = k_BLNH.shape[1]
  target = current_target() if target is None else as_target(target)
  backend = backend or target.kernel_backend
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
  if block_mask is not None:
    if (block_mask.q_len, block_mask.kv_len) != (Lq, Lk):
      raise ValueError(f"block_mask is for (q_len, kv_len) = ({block_mask.q_len}, {block_mask.kv_len}), "
                       f"inputs have ({Lq}, {Lk})")
    bs = BlockSizes(block_mask.block_q, block_mask.block_k)
  else:
    platform = {"triton": "gpu", "mosaic": "tpu", "interpret": "cpu", "interpret_gpu": "cpu",
                "interpret_tpu": "cpu"}[backend]
    for_target = target if target.kernel_backend == backend else Target(platform)
    bs = block_sizes or default_block_sizes(for_target, H, max(Lq, Lk))
  nq, nk = _cdiv(Lq, bs.block_q), _cdiv(Lk, bs.block_k)
  if backend in POW2_BACKENDS and (bs.block_q & (bs.block_q - 1) or bs.block_k & (bs.block_k - 1)):
    raise ValueError(f"block sizes must be powers of two on GPU (Triton), got {bs}")
  if backend == "mosaic" and ((bs.block_q % 128 and nq > 1) or (bs.block_k % 128 and nk > 1)):
    raise ValueError(f"block sizes must be multiples of 128 on TPU (Mosaic) unless one block covers the length, "
                     f"got {bs}")
  scale = H**-0.5 if scale is None else float(scale)

  Lq_pad, Lk_pad = nq * bs.block_q, nk * bs.block_k
  H_pad = H
  if backend in POW2_BACKENDS:  # Triton blocks are powers of two; full-length refs and head_dim too
    Lq_pad, Lk_pad, H_pad = _next_pow2(Lq_pad), _next_pow2(Lk_pad), _next_pow2(H)

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

  def prep(x_BLNH, L_pad):
    x_BNLH = jnp.transpose(x_BLNH, (0, 2, 1, 3))
    return jnp.pad(x_BNLH, ((0, 0), (0, 0), (0, L_pad - x_BNLH.shape[2]), (0, H_pad - H)))

  cfg = KernelConfig(scale=scale, block_q=bs.block_q, block_k=bs.block_k, num_q_blocks=nq, num_kv_blocks=nk,
                     q_any=q_any, backend=backend, block_mask=block_mask,
                     num_warps=num_warps or (4 if H_pad <= 64 else 8), num_stages=num_stages)
  o_BNQH = _flash_padded(prep(q_BLNH, Lq_pad), prep(k_BLNH, Lk_pad), prep(v_BLNH, Lk_pad), qseg_BQ1, kseg_B1K, cfg)
  return jnp.transpose(o_BNQH[:, :, :Lq, :H], (0, 2, 1, 3))
