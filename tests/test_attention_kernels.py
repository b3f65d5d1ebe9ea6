"""Pallas attention kernels against the plain-jnp reference (CPU, interpret mode, tiny shapes).

Tolerances, as max |kernel - truth| / max |truth| over each tensor, where truth is the reference
evaluated in float32 on the same (possibly bf16-rounded) inputs:
  float32:  outputs 1e-5, gradients 1e-5   (observed <= 7e-7)
  bfloat16: outputs 1e-2, gradients 2e-2   (observed <= 6e-3; bf16 has an 8-bit mantissa; the kernel rounds the
            unnormalised probabilities to bf16 before the PV matmul, the reference the normalised ones)
"""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformers.kernels.attention import (BlockSizes, BlockSparseMask, attention, attention_reference,
                                          block_sparse_attention, block_sparse_reference, combined_mask,
                                          default_block_sizes,
                                          flash_attention, force_interpret, local_global_mask, segment_mask,
                                          sliding_window_mask, token_pattern)
from jaxformers.kernels.attention import dispatch

TOL = {jnp.float32: (1e-5, 1e-5), jnp.bfloat16: (1e-2, 2e-2)}
REPO = Path(__file__).resolve().parents[1]


def _qkv(B, Lq, Lk, N, D, dtype, seed=0):
  kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(kq, (B, Lq, N, D), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (B, Lk, N, D), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (B, Lk, N, D), jnp.float32).astype(dtype)
  do = jax.random.normal(kd, (B, Lq, N, D), jnp.float32)
  return q, k, v, do


def _segments(kind, B, L, seed=0):
  rng = np.random.default_rng(seed)
  if kind == "none":
    return None
  seg = np.zeros((B, L), np.int32)
  for b in range(B):
    n = L if b == 0 else int(rng.integers(L // 3, L))  # row 0 full, others padded (ragged)
    if kind == "ragged":
      seg[b, :n] = 1
    elif kind == "packed":  # several sequences packed in one row, then padding
      cuts = np.sort(rng.choice(np.arange(1, n), size=min(3, n - 1), replace=False))
      seg[b, :n] = np.searchsorted(cuts, np.arange(n), side="right") + 1
  return jnp.asarray(seg)


def _rel_err(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  assert np.all(np.isfinite(a)), "non-finite values in kernel result"
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-6))


def _value_and_grads(fn, q, k, v, do):
  """Output and (dq, dk, dv) of sum(fn(q, k, v) * do), jitted."""
  @jax.jit
  def run(q, k, v):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(do.astype(out.dtype))

  return run(q, k, v)


def _check_against(kernel_fn, ref_fn, q, k, v, do):
  tol_out, tol_grad = TOL[q.dtype.type]
  out, grads = _value_and_grads(kernel_fn, q, k, v, do)
  f32 = lambda x: x.astype(jnp.float32)
  ref_out, ref_grads = _value_and_grads(ref_fn, f32(q), f32(k), f32(v), do)
  assert out.dtype == q.dtype and out.shape == q.shape[:3] + (v.shape[-1],)
  assert _rel_err(out, ref_out) < tol_out
  for name, g, rg, x in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
    assert g.dtype == x.dtype and g.shape == x.shape, name
    assert _rel_err(g, rg) < tol_grad, name
  return out, grads


CASES = [
    # id, batch, q_len, kv_len, heads, head_dim, dtype, segments (lengths not multiples of the 32 block)
    ("f32-d32-none", 1, 40, 40, 2, 32, jnp.float32, "none"),
    ("f32-d64-ragged", 2, 70, 70, 1, 64, jnp.float32, "ragged"),
    ("f32-d128-packed", 1, 33, 33, 1, 128, jnp.float32, "packed"),
    ("bf16-d64-packed", 2, 50, 50, 1, 64, jnp.bfloat16, "packed"),
    ("bf16-d128-none", 1, 96, 96, 1, 128, jnp.bfloat16, "none"),
    ("f32-d48-cross-kvpad", 2, 20, 45, 1, 48, jnp.float32, "kv_only"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_flash_matches_reference(case):
  _, B, Lq, Lk, N, D, dtype, kind = case
  q, k, v, do = _qkv(B, Lq, Lk, N, D, dtype)
  seg = kv_seg = None
  if kind == "kv_only":
    kv_seg = _segments("ragged", B, Lk, seed=1)
  else:
    seg = _segments(kind, B, Lq)
  kernel = lambda q, k, v: attention(q, k, v, segment_ids=seg, kv_segment_ids=kv_seg, impl="pallas")
  ref = lambda q, k, v: attention_reference(q, k, v, segment_ids=seg, kv_segment_ids=kv_seg)
  out, _ = _check_against(kernel, ref, q, k, v, do)
  if seg is not None:  # padded queries (segment 0) give exact zeros
    assert np.all(np.asarray(out, np.float32)[np.asarray(seg) == 0] == 0.0)


def _numpy_attention(q, k, v, seg, scale):
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  logits = np.einsum("bqnd,bknd->bnqk", q, k) * scale
  allowed = (seg[:, None, :, None] == seg[:, None, None, :]) & (seg[:, None, None, :] != 0)
  logits = np.where(allowed, logits, -np.inf)
  top = np.max(logits, -1, keepdims=True)
  p = np.where(allowed, np.exp(logits - np.where(np.isfinite(top), top, 0)), 0.0)
  p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
  return np.einsum("bnqk,bknd->bqnd", p, v)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_explicit_scale_matches_numpy(impl):
  """scale=0.3 (the default would be 32**-0.5 = 0.177): numpy forward, and the kernel's gradients against the
  reference's at the same scale."""
  q, k, v, do = _qkv(2, 40, 40, 2, 32, jnp.float32, seed=3)
  seg = _segments("packed", 2, 40)
  fn = lambda q, k, v: attention(q, k, v, segment_ids=seg, scale=0.3, impl=impl)
  out = np.asarray(fn(q, k, v))
  want = _numpy_attention(q, k, v, np.asarray(seg), 0.3)
  assert _rel_err(out, want) < 1e-5
  assert _rel_err(_numpy_attention(q, k, v, np.asarray(seg), 32**-0.5), want) > 1e-2   # the scale matters here
  if impl == "pallas":
    _check_against(fn, lambda q, k, v: attention_reference(q, k, v, segment_ids=seg, scale=0.3), q, k, v, do)


def test_fully_masked_rows_give_zeros_and_zero_grads():
  B, L, N, D = 2, 40, 1, 32
  q, k, v, do = _qkv(B, L, L, N, D, jnp.float32, seed=3)
  seg = jnp.asarray([[1] * 10 + [3] * 10 + [2] * 20] * B, jnp.int32)  # segment 3 has no keys
  kv_seg = jnp.asarray([[1] * 20 + [2] * 20, [0] * 40], jnp.int32)  # batch row 1: every key is padding
  kernel = lambda q, k, v: flash_attention(q, k, v, segment_ids=seg, kv_segment_ids=kv_seg,
                                           block_sizes=BlockSizes(16, 16))
  ref = lambda q, k, v: attention_reference(q, k, v, segment_ids=seg, kv_segment_ids=kv_seg)
  out, (dq, dk, dv) = _check_against(kernel, ref, q, k, v, do)
  out, dq, dk, dv = (np.asarray(x) for x in (out, dq, dk, dv))
  assert np.all(out[0, 10:20] == 0.0) and np.all(out[1] == 0.0)
  assert np.all(dq[0, 10:20] == 0.0) and np.all(dq[1] == 0.0)
  assert np.all(dk[1] == 0.0) and np.all(dv[1] == 0.0)
  assert np.abs(out[0, :10]).max() > 0.0  # the other rows are not trivially zero


def test_block_sparse_local_global_matches_dense_reference():
  B, L, N, D = 2, 80, 2, 32
  q, k, v, do = _qkv(B, L, L, N, D, jnp.float32, seed=5)
  seg = _segments("packed", B, L, seed=2)
  bm = local_global_mask(L, window=12, num_global=4, block_q=16, block_k=16)
  assert 0.0 < bm.density() < 1.0  # some blocks are skipped
  kernel = lambda q, k, v: attention(q, k, v, segment_ids=seg, block_mask=bm, impl="pallas")
  ref = lambda q, k, v: block_sparse_reference(q, k, v, bm, segment_ids=seg)
  _check_against(kernel, ref, q, k, v, do)
  # the xla path of the public function applies the same mask
  np.testing.assert_allclose(attention(q, k, v, segment_ids=seg, block_mask=bm, impl="xla"),
                             ref(q, k, v), atol=1e-6)


def test_block_sparse_block_pattern_bf16_skips_unlisted_blocks():
  """A bare block pattern (no token pattern): unlisted blocks contribute nothing, empty rows are zeros."""
  B, L, N, D = 1, 64, 1, 64
  q, k, v, do = _qkv(B, L, L, N, D, jnp.bfloat16, seed=7)
  blocks = np.array([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1]], bool)
  bm = BlockSparseMask.from_blocks(blocks, q_len=L, kv_len=L, block_q=16, block_k=16)
  kernel = lambda q, k, v: block_sparse_attention(q, k, v, bm)
  ref = lambda q, k, v: block_sparse_reference(q, k, v, bm)
  out, (dq, _, _) = _check_against(kernel, ref, q, k, v, do)
  assert np.all(np.asarray(out[:, 16:32], np.float32) == 0.0)  # query block 1 visits nothing
  assert np.all(np.asarray(dq[:, 16:32], np.float32) == 0.0)
  dense = lambda q, k, v: attention_reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
  assert _rel_err(out, dense(q, k, v)) > 0.1  # the sparsity actually changed the result


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "block_sparse"])
def test_tpu_grid_driver_in_tpu_interpreter(sparse):
  """The TPU driver (tile loop on the grid, VMEM scratch, scalar-prefetched lists) under the TPU interpreter."""
  B, L, N, D = 1, 40, 1, 32
  q, k, v, do = _qkv(B, L, L, N, D, jnp.float32, seed=11)
  seg = jnp.asarray([[1] * 12 + [2] * 18 + [0] * 10], jnp.int32)
  if sparse:
    bm = sliding_window_mask(L, window=8, block_q=16, block_k=16)
    kernel = lambda q, k, v: block_sparse_attention(q, k, v, bm, segment_ids=seg, backend="interpret_tpu")
    ref = lambda q, k, v: block_sparse_reference(q, k, v, bm, segment_ids=seg)
  else:
    kernel = lambda q, k, v: flash_attention(q, k, v, segment_ids=seg, block_sizes=BlockSizes(16, 16),
                                             backend="interpret_tpu")
    ref = lambda q, k, v: attention_reference(q, k, v, segment_ids=seg)
  _check_against(kernel, ref, q, k, v, do)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "block_sparse"])
def test_gpu_padding_rules_in_interpreter(sparse):
  """Triton's power-of-two padding (lengths 40 -> 64, head_dim 48 -> 64, index lists) under the interpreter."""
  B, L, N, D = 2, 40, 1, 48
  q, k, v, do = _qkv(B, L, L, N, D, jnp.float32, seed=13)
  seg = _segments("packed", B, L, seed=4)
  bm = local_global_mask(L, window=5, num_global=2, block_q=16, block_k=16) if sparse else None
  kernel = lambda q, k, v: flash_attention(q, k, v, segment_ids=seg, block_sizes=BlockSizes(16, 16), block_mask=bm,
                                           backend="interpret_gpu")
  if sparse:
    ref = lambda q, k, v: block_sparse_reference(q, k, v, bm, segment_ids=seg)
  else:
    ref = lambda q, k, v: attention_reference(q, k, v, segment_ids=seg)
  _check_against(kernel, ref, q, k, v, do)


def test_mask_helpers_cover_the_token_pattern_with_linear_cost():
  L, w, g, blk = 300, 20, 3, 32
  bm = local_global_mask(L, window=w, num_global=g, block_q=blk, block_k=blk)
  tok = token_pattern(L, L, window=w, num_global=g)
  assert np.array_equal(bm.token_mask(), tok)  # visited blocks contain every allowed pair
  blocks = bm.block_array()
  expanded = np.repeat(np.repeat(blocks, blk, 0), blk, 1)[:L, :L]
  for i in range(blocks.shape[0]):  # and every visited block holds at least one allowed pair
    for j in range(blocks.shape[1]):
      if blocks[i, j]:
        assert tok[i * blk:(i + 1) * blk, j * blk:(j + 1) * blk].any()
  assert np.all(expanded | ~tok)
  # O(length * window): per query block, key blocks visited is bounded independently of the length
  long = sliding_window_mask(8192, window=128, block_q=128, block_k=128)
  idx, cnt = long.kv_block_lists()
  assert cnt.max() == 3 and idx.shape == (64, 3)
  qidx, qcnt = long.q_block_lists()
  assert qcnt.max() == 3 and np.all(qidx[np.arange(64), 0] <= np.arange(64))


def test_block_mask_validation_errors():
  with pytest.raises(ValueError, match="blocks must be"):
    BlockSparseMask.from_blocks(np.ones((2, 2), bool), q_len=64, kv_len=64, block_q=16, block_k=16)
  with pytest.raises(ValueError, match="window"):
    local_global_mask(64, window=-1, block_q=16, block_k=16)
  bm = sliding_window_mask(64, window=4, block_q=16, block_k=16)
  q, k, v, _ = _qkv(1, 48, 48, 1, 32, jnp.float32)
  with pytest.raises(ValueError, match="block_mask is for"):
    block_sparse_attention(q, k, v, bm)


def test_argument_errors():
  q, k, v, _ = _qkv(1, 16, 16, 1, 32, jnp.float32)
  with pytest.raises(ValueError, match="unknown attention impl"):
    attention(q, k, v, impl="flash")
  with pytest.raises(ValueError, match="head_dim"):
    attention(q[..., :16], k[..., :16], v[..., :16], impl="pallas")
  with pytest.raises(ValueError, match="dtypes"):
    attention(q.astype(jnp.float16), k.astype(jnp.float16), v.astype(jnp.float16), impl="pallas")
  with pytest.raises(ValueError, match="dropout"):
    attention(q, k, v, impl="pallas", dropout_rate=0.1, dropout_rng=jax.random.key(0))
  with pytest.raises(ValueError, match="mask"):
    attention(q, k, v, impl="pallas", mask=jnp.ones((1, 1, 16, 16), bool))
  with pytest.raises(ValueError, match="cudnn"):
    attention(q, k, v, impl="cudnn")
  with pytest.raises(ValueError, match="segment_ids must be"):
    attention(q, k, v, impl="pallas", segment_ids=jnp.ones((1, 15), jnp.int32))
  with pytest.raises(ValueError, match="powers of two"):
    flash_attention(q, k, v, block_sizes=BlockSizes(24, 32), backend="triton")
  with pytest.raises(ValueError, match="multiples of 128"):
    flash_attention(jnp.ones((1, 300, 1, 32)), jnp.ones((1, 300, 1, 32)), jnp.ones((1, 300, 1, 32)),
                    block_sizes=BlockSizes(64, 128), backend="mosaic")
  with pytest.raises(ValueError, match="backend must be"):
    flash_attention(q, k, v, backend="cuda")
  with pytest.raises(ValueError, match="multiple of 8"):
    BlockSizes(12, 32)


def test_default_block_sizes_per_backend():
  for d in (32, 64, 128):
    gpu, tpu = default_block_sizes("gpu", d), default_block_sizes("tpu", d)
    assert all(b & (b - 1) == 0 for b in (gpu.block_q, gpu.block_k))  # Triton: powers of two
    assert tpu.block_q % 128 == 0 and tpu.block_k % 128 == 0  # Mosaic: lane-aligned key blocks
  assert default_block_sizes("cpu", 64).block_q <= 32  # interpret mode: small blocks


def _has_interpreted_pallas_call(fn, *args):
  text = str(jax.make_jaxpr(fn)(*args))
  return "pallas_call" in text and "interpret=True" in text


def test_auto_on_cpu_uses_reference_and_logs_reason_once(caplog):
  dispatch.reset_logged_reasons()
  q, k, v, _ = _qkv(1, 24, 24, 2, 32, jnp.float32)
  seg = _segments("ragged", 1, 24)
  with caplog.at_level(logging.INFO, logger="jaxformers.kernels.attention"):
    out1 = attention(q, k, v, segment_ids=seg)
    out2 = attention(q, k, v, segment_ids=seg)
  assert dispatch.choose_impl(q, k, v, segment_ids=seg) == "xla"
  reasons = [r.getMessage() for r in caplog.records if r.name == "jaxformers.kernels.attention"]
  assert len(reasons) == 1 and "cpu backend" in reasons[0] and "XLA reference" in reasons[0]
  assert "pallas_call" not in str(jax.make_jaxpr(lambda q: attention(q, k, v, segment_ids=seg))(q))
  ref = attention_reference(q, k, v, segment_ids=seg)
  np.testing.assert_array_equal(out1, ref)
  np.testing.assert_array_equal(out2, ref)


def test_auto_logs_dropout_and_head_dim_fallbacks(caplog):
  dispatch.reset_logged_reasons()
  q, k, v, _ = _qkv(1, 16, 16, 1, 32, jnp.float32)
  with force_interpret(), caplog.at_level(logging.INFO, logger="jaxformers.kernels.attention"):
    assert dispatch.choose_impl(q, k, v) == "pallas"
    assert dispatch.choose_impl(q, k, v, dropout_rate=0.1) == "xla"
    assert dispatch.choose_impl(q, k, v, mask=jnp.ones((1, 1, 16, 16), bool)) == "xla"
    big = jnp.zeros((1, 16, 1, 256))
    assert dispatch.choose_impl(big, big, big) == "xla"
    assert dispatch.choose_impl(big, big, big) == "xla"
  text = [r.getMessage() for r in caplog.records]
  assert len(text) == 3
  assert "dropout" in text[0] and "mask" in text[1] and "head_dim" in text[2]


def test_explicit_pallas_on_cpu_runs_interpret_mode(caplog):
  dispatch.reset_logged_reasons()
  q, k, v, _ = _qkv(1, 24, 24, 1, 32, jnp.float32)
  with caplog.at_level(logging.INFO, logger="jaxformers.kernels.attention"):
    fn = lambda q: attention(q, k, v, impl="pallas")
    assert _has_interpreted_pallas_call(fn, q)
    np.testing.assert_allclose(fn(q), attention_reference(q, k, v), atol=1e-5)
  assert any("interpret mode" in r.getMessage() for r in caplog.records)


def test_force_interpret_makes_auto_use_the_kernel():
  q, k, v, _ = _qkv(1, 24, 24, 1, 32, jnp.float32)
  # The choice is made at trace time: a function traced before the switch keeps its choice (jit caches).
  with force_interpret():
    assert _has_interpreted_pallas_call(lambda q: attention(q, k, v), q)
  assert "pallas_call" not in str(jax.make_jaxpr(lambda q: attention(q, k, v))(q))


def test_padding_lengths_detects_pure_padding():
  assert dispatch.padding_lengths(np.array([[1, 1, 0], [2, 0, 0]])).tolist() == [2, 1]
  assert dispatch.padding_lengths(np.array([[1, 2, 0]])) is None  # packed
  assert dispatch.padding_lengths(np.array([[1, 0, 1]])) is None  # hole


def test_reference_helpers_still_exported():
  seg = jnp.asarray([[1, 1, 2, 0]])
  m = segment_mask(seg)
  assert m.shape == (1, 1, 4, 4) and bool(m[0, 0, 0, 1]) and not bool(m[0, 0, 0, 2]) and not bool(m[0, 0, 3, 3])
  assert combined_mask(None, None, None) is None


@pytest.mark.parametrize("platform,backend,target", [("cuda", "triton", "__gpu$xla.gpu.triton"),
                                                     ("tpu", "mosaic", "tpu_custom_call")])
def test_kernels_lower_for_gpu_and_tpu(platform, backend, target):
  """Lowering (not compiling) the forward and both backward kernels for Triton and Mosaic succeeds."""
  B, L, N, D = 1, 200, 2, 64
  bs = (64, 64) if backend == "triton" else (128, 128)
  q = jnp.ones((B, L, N, D), jnp.bfloat16)
  seg = jnp.ones((B, L), jnp.int32)
  bm = local_global_mask(L, window=32, num_global=8, block_q=bs[0], block_k=bs[1])

  def loss(q, k, v):
    dense = flash_attention(q, k, v, segment_ids=seg, backend=backend)
    sparse = flash_attention(q, k, v, segment_ids=seg, block_mask=bm, backend=backend)
    return jnp.sum(dense.astype(jnp.float32)) + jnp.sum(sparse.astype(jnp.float32))

  text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, q, q).lower(lowering_platforms=(platform,)).as_text()
  assert text.count(target) >= 6  # 3 dense + 3 block-sparse kernels


def test_benchmark_script_runs_on_cpu():
  script = str(REPO / "benchmarks" / "attention.py")
  res = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120, cwd=REPO)
  assert res.returncode == 0, res.stderr
  assert "times nothing" in res.stdout
  res = subprocess.run([sys.executable, script, "--allow-cpu", "--impls", "xla", "--lengths", "64", "--head-dims",
                        "32", "--reps", "1", "--warmup", "1", "--tokens", "128", "--width", "64"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
  assert res.returncode == 0, res.stderr
  assert "| 32 | 64 | 2 | 2 | xla |" in res.stdout
