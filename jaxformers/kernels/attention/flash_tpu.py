"""TPU (Mosaic) driver of the flash kernels: the tile loop is the innermost grid axis.

Grids are ``(batch, heads, own blocks, steps)``. Step ``t`` of a program visits "other-side"
block ``t`` (dense) or ``lists[own, t]`` (block-sparse, the per-block index lists scalar-
prefetched into SMEM and read by the BlockSpec index maps). So only visited blocks are ever
copied from HBM to VMEM, and VMEM holds a few blocks whatever the sequence length. A list
shorter than ``steps`` is padded with its last index (same block index: Pallas skips the copy)
and the padded steps skip the compute. The online-softmax state and the gradient accumulators
live in VMEM scratch across the ``"arbitrary"`` step axis; outputs are written on the last step.
The per-tile math is :mod:`jaxformers.kernels.attention.tiles`, shared with the loop driver.
Layouts: ``[batch, heads, length, head_dim]``; per-query vectors are columns ``[.., L, 1]``
for the forward / dq kernels and lane-dense rows ``[.., 1, L]`` for the dk/dv kernel.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxformers.kernels.attention import tiles
from jaxformers.kernels.attention.tiles import KernelConfig


def _interpret(cfg: KernelConfig):
  return pltpu.InterpretParams() if cfg.backend == "interpret_tpu" else False


def _other(cfg: KernelConfig, own, t, prefetch):
  """Index of the other-side block visited at step ``t`` (usable in index maps and kernels)."""
  return prefetch[0][own, t] if cfg.block_mask is not None else t


def _lists(cfg: KernelConfig, transpose: bool):
  idx, cnt = cfg.block_mask.q_block_lists() if transpose else cfg.block_mask.kv_block_lists()
  return jnp.asarray(idx, jnp.int32), jnp.asarray(cnt, jnp.int32)


def _call(kernel, cfg: KernelConfig, *, own_blocks: int, dense_steps: int, transpose_lists: bool, in_specs,
          out_specs, out_shape, scratch, args, name: str):
  B, N = args[0].shape[:2]
  lists = () if cfg.block_mask is None else _lists(cfg, transpose_lists)
  steps = dense_steps if cfg.block_mask is None else int(lists[0].shape[1])
  grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=len(lists), grid=(B, N, own_blocks, steps),
                                           in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch)
  params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))
  kernel = functools.partial(kernel, cfg=cfg, steps=steps)
  return pl.pallas_call(kernel, out_shape=out_shape, grid_spec=grid_spec, compiler_params=params,
                        interpret=_interpret(cfg), name=name,
                        cost_estimate=tiles.cost_estimate(cfg, name, args, out_shape))(*lists, *args)


def _split_prefetch(cfg: KernelConfig, refs):
  return (refs[:2], refs[2:]) if cfg.block_mask is not None else ((), refs)


def _run_step(cfg: KernelConfig, prefetch, own, t, step_fn):
  """Runs ``step_fn`` unless step ``t`` is past the end of this block's list."""
  if cfg.block_mask is None:
    step_fn()
  else:
    pl.when(t < prefetch[1][own])(step_fn)


def _fwd_kernel(*refs, cfg: KernelConfig, steps: int):
  prefetch, refs = _split_prefetch(cfg, refs)
  q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
  qi, t = pl.program_id(2), pl.program_id(3)

  @pl.when(t == 0)
  def _init():
    m0, l0, acc0 = tiles.fwd_init(*acc_sc.shape)
    m_sc[...], l_sc[...], acc_sc[...] = m0, l0, acc0

  def _step():
    kj = _other(cfg, qi, t, prefetch)
    m, l, acc = tiles.fwd_tile(cfg, q_ref[...], k_ref[...], v_ref[...], qseg_ref[...], kseg_ref[...], qi, kj,
                               m_sc[...], l_sc[...], acc_sc[...])
    m_sc[...], l_sc[...], acc_sc[...] = m, l, acc

  _run_step(cfg, prefetch, qi, t, _step)

  @pl.when(t == steps - 1)
  def _finish():
    o, lse = tiles.fwd_finish(m_sc[...], l_sc[...], acc_sc[...])
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse


def _dkv_kernel(*refs, cfg: KernelConfig, steps: int):
  prefetch, refs = _split_prefetch(cfg, refs)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dk_ref, dv_ref, dk_sc, dv_sc = refs
  kj, t = pl.program_id(2), pl.program_id(3)

  @pl.when(t == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  def _step():
    qi = _other(cfg, kj, t, prefetch)
    dk, dv = tiles.dkv_tile(cfg, q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[...], delta_ref[...],
                            qseg_ref[...], kseg_ref[...], qi, kj, dk_sc[...], dv_sc[...])
    dk_sc[...], dv_sc[...] = dk, dv

  _run_step(cfg, prefetch, kj, t, _step)

  @pl.when(t == steps - 1)
  def _finish():
    dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(*refs, cfg: KernelConfig, steps: int):
  prefetch, refs = _split_prefetch(cfg, refs)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dq_ref, dq_sc = refs
  qi, t = pl.program_id(2), pl.program_id(3)

  @pl.when(t == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  def _step():
    kj = _other(cfg, qi, t, prefetch)
    dq_sc[...] = tiles.dq_tile(cfg, q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[...], delta_ref[...],
                               qseg_ref[...], kseg_ref[...], qi, kj, dq_sc[...])

  _run_step(cfg, prefetch, qi, t, _step)

  @pl.when(t == steps - 1)
  def _finish():
    dq_ref[...] = (dq_sc[...] * cfg.scale).astype(dq_ref.dtype)


def fwd(q_BNQH, k_BNKH, v_BNKH, qseg_BQ1, kseg_B1K, cfg: KernelConfig):
  """Output ``[B, N, Lq, D]`` and logsumexp ``[B, N, Lq, 1]``."""
  B, N, Lq, D = q_BNQH.shape
  bq, bk = cfg.block_q, cfg.block_k
  own = lambda b, n, i, t, *p: (b, n, i, 0)
  other = lambda b, n, i, t, *p: (b, n, _other(cfg, i, t, p), 0)
  in_specs = [
      pl.BlockSpec((None, None, bq, D), own), pl.BlockSpec((None, None, bk, D), other),
      pl.BlockSpec((None, None, bk, D), other),
      pl.BlockSpec((None, bq, 1), lambda b, n, i, t, *p: (b, i, 0)),
      pl.BlockSpec((None, 1, bk), lambda b, n, i, t, *p: (b, 0, _other(cfg, i, t, p))),
  ]
  out_specs = [pl.BlockSpec((None, None, bq, D), own), pl.BlockSpec((None, None, bq, 1), own)]
  out_shape = [jax.ShapeDtypeStruct(q_BNQH.shape, q_BNQH.dtype), jax.ShapeDtypeStruct((B, N, Lq, 1), jnp.float32)]
  scratch = [pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, D), jnp.float32)]
  return _call(_fwd_kernel, cfg, own_blocks=cfg.num_q_blocks, dense_steps=cfg.num_kv_blocks, transpose_lists=False,
               in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, scratch=scratch,
               args=(q_BNQH, k_BNKH, v_BNKH, qseg_BQ1, kseg_B1K), name="flash_fwd_tpu")


def bwd(q_BNQH, k_BNKH, v_BNKH, qseg_BQ1, kseg_B1K, lse_BNQ1, delta_BNQ1, do_BNQH, cfg: KernelConfig):
  """(dq, dk, dv) from two kernels: dk/dv over key blocks, dq over query blocks."""
  B, N, Lq, D = q_BNQH.shape
  Lk = k_BNKH.shape[2]
  bq, bk = cfg.block_q, cfg.block_k
  own = lambda b, n, j, t, *p: (b, n, j, 0)
  other = lambda b, n, j, t, *p: (b, n, _other(cfg, j, t, p), 0)
  kv_specs = [
      pl.BlockSpec((None, None, bq, D), other), pl.BlockSpec((None, None, bk, D), own),
      pl.BlockSpec((None, None, bk, D), own), pl.BlockSpec((None, None, bq, D), other),
      pl.BlockSpec((None, None, 1, bq), lambda b, n, j, t, *p: (b, n, 0, _other(cfg, j, t, p))),
      pl.BlockSpec((None, None, 1, bq), lambda b, n, j, t, *p: (b, n, 0, _other(cfg, j, t, p))),
      pl.BlockSpec((None, 1, bq), lambda b, n, j, t, *p: (b, 0, _other(cfg, j, t, p))),
      pl.BlockSpec((None, bk, 1), lambda b, n, j, t, *p: (b, j, 0)),
  ]
  dk_BNKH, dv_BNKH = _call(
      _dkv_kernel, cfg, own_blocks=cfg.num_kv_blocks, dense_steps=cfg.num_q_blocks, transpose_lists=True,
      in_specs=kv_specs, out_specs=[pl.BlockSpec((None, None, bk, D), own)] * 2,
      out_shape=[jax.ShapeDtypeStruct(k_BNKH.shape, k_BNKH.dtype), jax.ShapeDtypeStruct(v_BNKH.shape, v_BNKH.dtype)],
      scratch=[pltpu.VMEM((bk, D), jnp.float32), pltpu.VMEM((bk, D), jnp.float32)],
      args=(q_BNQH, k_BNKH, v_BNKH, do_BNQH, lse_BNQ1.reshape(B, N, 1, Lq), delta_BNQ1.reshape(B, N, 1, Lq),
            qseg_BQ1.reshape(B, 1, Lq), kseg_B1K.reshape(B, Lk, 1)),
      name="flash_bwd_dkv_tpu")

  q_specs = [
      pl.BlockSpec((None, None, bq, D), own), pl.BlockSpec((None, None, bk, D), other),
      pl.BlockSpec((None, None, bk, D), other), pl.BlockSpec((None, None, bq, D), own),
      pl.BlockSpec((None, None, bq, 1), own), pl.BlockSpec((None, None, bq, 1), own),
      pl.BlockSpec((None, bq, 1), lambda b, n, i, t, *p: (b, i, 0)),
      pl.BlockSpec((None, 1, bk), lambda b, n, i, t, *p: (b, 0, _other(cfg, i, t, p))),
  ]
  dq_BNQH = _call(
      _dq_kernel, cfg, own_blocks=cfg.num_q_blocks, dense_steps=cfg.num_kv_blocks, transpose_lists=False,
      in_specs=q_specs, out_specs=pl.BlockSpec((None, None, bq, D), own),
      out_shape=jax.ShapeDtypeStruct(q_BNQH.shape, q_BNQH.dtype), scratch=[pltpu.VMEM((bq, D), jnp.float32)],
      args=(q_BNQH, k_BNKH, v_BNKH, do_BNQH, lse_BNQ1, delta_BNQ1, qseg_BQ1, kseg_B1K), name="flash_bwd_dq_tpu")
  return dq_BNQH, dk_BNKH, dv_BNKH
