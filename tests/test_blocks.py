"""Every block type: padding never changes a sentence's output, and parameter trees stay as recorded."""
from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformers import EncoderConfig, models
from jaxformers.blocks import BLOCKS
from jaxformers.params import param_shapes
from jaxformers.layout import format_layout, fnet_hybrid_layout, par_layout, parse_layout
from jaxformers.layers import fourier
from jaxformers.layers.common import Sequences

SNAPSHOT = Path(__file__).parent / "snapshots" / "block_params.json"


def tiny(layout: str, **kw) -> EncoderConfig:
  return EncoderConfig(vocab_size=64, hidden_size=32, num_heads=4, intermediate_size=48, max_position_embeddings=32,
                       layout=layout, hidden_dropout=0.0, attention_dropout=0.0, **kw)


PADDING_CASES = [(b, "auto") for b in BLOCKS.names()] + [
    (b, impl) for b in BLOCKS.names() if BLOCKS.get(b).mixer == "fourier" for impl in ("fft", "matmul")]


@pytest.mark.parametrize("block,fourier_impl", PADDING_CASES)
def test_sentence_output_is_independent_of_padding(block, fourier_impl):
  cfg = tiny(f"{block}*2", fourier_impl=fourier_impl)
  model = models.Encoder(cfg, rngs=nnx.Rngs(0))
  model.eval()
  rng = np.random.default_rng(1)
  sentence = rng.integers(1, 64, 7)
  alone = model(sentence[None], np.ones((1, 7), np.int32)).last_hidden_state[0]
  for total, batch_len in ((3, 12), (2, 20)):
    ids = rng.integers(1, 64, (total, batch_len))
    mask = np.ones((total, batch_len), np.int32)
    ids[1, :7], ids[1, 7:], mask[1, 7:] = sentence, 0, 0
    batched = model(ids, mask).last_hidden_state[1, :7]
    np.testing.assert_allclose(np.asarray(batched), np.asarray(alone), atol=2e-5, rtol=0)


@pytest.mark.parametrize("block", BLOCKS.names())
def test_first_tokens_only_equals_the_full_pass(block):
  """A classifier computes its last block only at each sequence's first token; padded and packed
  rows give the full pass's first-token states and pooled outputs, and the last block's work shrinks."""
  cfg = tiny(f"serial,{block}", use_pooler=True)
  model = models.Encoder(cfg, rngs=nnx.Rngs(0))
  model.eval()
  rng = np.random.default_rng(2)
  ids = rng.integers(1, 64, (3, 12))
  mask = np.array([[1] * n + [0] * (12 - n) for n in (12, 7, 3)], np.int32)
  seg = np.array([[1] * 5 + [2] * 4 + [3] * 2 + [0], [1] * 12, [1] * 3 + [0] * 9], np.int32)
  for kw in ({"attention_mask": mask}, {"segment_ids": seg, "max_segments": 3}):
    full = model(ids, **kw)
    part = model(ids, first_tokens_only=True, **kw)
    assert part.last_hidden_state is None
    np.testing.assert_allclose(np.asarray(part.first_token_state), np.asarray(full.first_token_state), atol=2e-5)
    np.testing.assert_allclose(np.asarray(part.pooler_output), np.asarray(full.pooler_output), atol=2e-5)
  flops = [jax.jit(lambda i, m, f=f: model(i, m, first_tokens_only=f).pooler_output).lower(ids, mask).compile()
           .cost_analysis()["flops"] for f in (False, True)]
  # attention mixers compute one query per sequence; other mixers still mix every token
  assert flops[1] < (0.85 if BLOCKS.get(block).mixer == "attention" else 1.0) * flops[0], flops


def test_fnet_padding_mode_mixes_padding_in():
  cfg = tiny("fourier*1", fourier_padding="fnet")
  model = models.Encoder(cfg, rngs=nnx.Rngs(0))
  ids = np.arange(1, 8)[None]
  alone = model(ids, np.ones((1, 7), np.int32)).last_hidden_state[0]
  padded = model(np.pad(ids, ((0, 0), (0, 5))), np.pad(np.ones((1, 7), np.int32), ((0, 0), (0, 5))))
  assert np.abs(np.asarray(padded.last_hidden_state[0, :7]) - np.asarray(alone)).max() > 1e-3


def _numpy_fourier(x, lengths):
  out = np.zeros_like(x)
  for b, n in enumerate(lengths):
    out[b, :n] = np.real(np.fft.fftn(x[b, :n].astype(np.float64)))
  return out


@pytest.mark.parametrize("impl", ["fft", "matmul"])
def test_fourier_per_sequence_equals_numpy_dft(impl):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 13, 16)).astype(np.float32)
  lengths = (13, 8, 1)
  mask = np.array([[1] * n + [0] * (13 - n) for n in lengths])
  seq = Sequences.build(3, 13, attention_mask=jnp.asarray(mask))
  fn = fourier.fourier_per_sequence_fft if impl == "fft" else fourier.fourier_per_sequence_matmul
  np.testing.assert_allclose(np.asarray(fn(jnp.asarray(x), seq)), _numpy_fourier(x, lengths), atol=2e-5)


def test_fourier_packed_rows_mix_each_sequence_alone():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 12, 8)).astype(np.float32)
  seg = np.array([[1] * 5 + [2] * 4 + [0] * 3])
  out = np.asarray(fourier.fourier_per_sequence_matmul(jnp.asarray(x), Sequences.build(1, 12, segment_ids=seg)))
  np.testing.assert_allclose(out[0, :5], _numpy_fourier(x[:, :5], [5])[0], atol=1e-5)
  np.testing.assert_allclose(out[0, 5:9], _numpy_fourier(x[:, 5:9], [4])[0], atol=1e-5)
  assert not out[0, 9:].any()


def test_fourier_auto_choice():
  assert fourier.choose_fourier_impl("auto", packed=False, length=512, backend="cpu") == "fft"
  assert fourier.choose_fourier_impl("auto", packed=True, length=512, backend="cpu") == "matmul"
  assert fourier.choose_fourier_impl("auto", packed=False, length=512, backend="tpu") == "matmul"
  assert fourier.choose_fourier_impl("auto", packed=False, length=8192, backend="tpu") == "fft"


def _block_snapshot() -> dict:
  snap = {}
  for name in BLOCKS.names():
    model = nnx.eval_shape(lambda: models.Encoder(tiny(name), rngs=nnx.Rngs(0)))
    snap[name] = {k[len("blocks.0."):]: list(v) for k, v in sorted(param_shapes(model).items())
                  if k.startswith("blocks.0.")}
  return snap


def check_snapshot(snap: dict, path: Path) -> None:
  """Compare with the recorded snapshot. ``JAXFORMERS_UPDATE_SNAPSHOTS=1`` (exactly, and never under ``CI=true``)
  rewrites it and then fails, so that an update is always checked by a deliberate second run."""
  if os.environ.get("JAXFORMERS_UPDATE_SNAPSHOTS") == "1" and os.environ.get("CI", "").lower() != "true":
    path.write_text(json.dumps(snap, indent=1, sort_keys=True) + "\n")
    pytest.fail(f"wrote {path}; review the change and run again without JAXFORMERS_UPDATE_SNAPSHOTS")
  assert snap == json.loads(path.read_text())


def test_block_parameter_trees_match_snapshot():
  """Catches accidental renames: run with JAXFORMERS_UPDATE_SNAPSHOTS=1 to record an intended change."""
  check_snapshot(_block_snapshot(), SNAPSHOT)


@pytest.mark.parametrize("env,ci,writes", [("0", "", False), ("true", "", False), ("1", "true", False),
                                            ("1", "", True)])
def test_snapshot_is_rewritten_only_on_request(tmp_path, monkeypatch, env, ci, writes):
  path = tmp_path / "snap.json"
  path.write_text(json.dumps({"a": [1]}) + "\n")
  monkeypatch.setenv("JAXFORMERS_UPDATE_SNAPSHOTS", env)
  monkeypatch.setenv("CI", ci)
  with pytest.raises(pytest.fail.Exception if writes else AssertionError):
    check_snapshot({"a": [2]}, path)
  assert json.loads(path.read_text()) == ({"a": [2]} if writes else {"a": [1]})
  monkeypatch.delenv("JAXFORMERS_UPDATE_SNAPSHOTS")
  check_snapshot(json.loads(path.read_text()), path)


@pytest.mark.parametrize("block", [b for b in BLOCKS.names() if b.startswith("sparse")])
def test_sparse_blocks_attend_only_inside_the_window(block):
  """Window 4 on 20 tokens: one block's output at token i changes when token j changes iff |i - j| <= 2 or j is
  the global first token; a padded batch gives the same outputs (the window is much smaller than the row)."""
  model = models.Encoder(tiny(f"{block}*1", sparse_window=4), rngs=nnx.Rngs(0))
  model.eval()
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 64, (1, 20))
  base = np.asarray(model(ids).last_hidden_state[0])
  for j in (0, 5, 7, 8, 9, 11, 12, 13, 15):
    changed = ids.copy()
    changed[0, j] = 1 + (ids[0, j] % 63)
    out = np.asarray(model(changed).last_hidden_state[0])
    diff = np.abs(out - base).max(-1)
    expect = (np.abs(np.arange(20) - j) <= 2) | (j == 0)
    expect[0] = True                                        # the global query sees everything
    assert (diff > 1e-4).tolist() == expect.tolist(), (j, np.round(diff, 6).tolist())
    assert diff[~expect].max(initial=0) <= 1e-6
  padded = np.zeros((2, 26), ids.dtype)
  padded[1, :20], padded[0] = ids[0], rng.integers(1, 64, 26)
  mask = np.ones_like(padded)
  mask[1, 20:] = 0
  np.testing.assert_allclose(np.asarray(model(padded, mask).last_hidden_state[1, :20]), base, atol=2e-5, rtol=0)


def test_parallel_fused_projections_compute_the_same():
  ids = np.random.default_rng(0).integers(1, 64, (2, 9))
  mask = np.ones((2, 9), np.int32)
  mask[1, 5:] = 0
  plain = models.Encoder(tiny("parallel*2"), rngs=nnx.Rngs(3))
  fused = models.Encoder(tiny("parallel*2", fuse_projections=True), rngs=nnx.Rngs(3))
  a, b = plain(ids, mask).last_hidden_state, fused(ids, mask).last_hidden_state
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize("text,expected", [
    ("serial*3", ("serial",) * 3),
    ("fourier*2, serial", ("fourier", "fourier", "serial")),
    ("(attention,ffn)*2,ffn", ("attention", "ffn", "attention", "ffn", "ffn")),
    ("((serial)*2,ffn)*2", ("serial", "serial", "ffn") * 2),
])
def test_layout_grammar(text, expected):
  assert parse_layout(text, BLOCKS.names()) == expected


def test_layout_helpers():
  assert par_layout(12) == "serial*8,ffn*4"
  assert fnet_hybrid_layout(12) == "fourier*10,serial*2"
  assert format_layout(parse_layout("(serial,ffn)*2")) == "serial,ffn,serial,ffn"
  assert tiny("serial*8,ffn*4").num_layers == 12


def test_prenorm_stack_has_final_norm_and_bf16_runs():
  model = models.MaskedLM(tiny("parallel_preln*2", dtype="bfloat16"), rngs=nnx.Rngs(0))
  assert model.encoder.final_norm is not None
  logits = model(np.ones((1, 5), np.int32))
  assert logits.dtype == jnp.bfloat16 and np.isfinite(np.asarray(logits, np.float32)).all()
  assert model.encoder.embeddings.word.embedding[...].dtype == jnp.float32


def test_dropout_is_active_in_train_mode_only():
  model = models.Encoder(EncoderConfig(vocab_size=64, hidden_size=32, num_heads=4, intermediate_size=48,
                                       max_position_embeddings=32, layout="serial*1"), rngs=nnx.Rngs(0, dropout=1))
  ids = np.ones((1, 6), np.int32)
  a, b = model(ids).last_hidden_state, model(ids).last_hidden_state
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 0
  model.eval()
  np.testing.assert_array_equal(np.asarray(model(ids).last_hidden_state), np.asarray(model(ids).last_hidden_state))


def test_logical_axes_on_every_parameter():
  model = models.SequenceClassifier(tiny("serial,fourier,parallel"), num_labels=2, rngs=nnx.Rngs(0))
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == var[...].ndim, path


def test_config_json_round_trip(tmp_path):
  cfg = tiny("fourier*2,serial", fourier_padding="fnet", sparse_global_tokens=(0, 3))
  cfg.save(tmp_path / "c.json")
  assert EncoderConfig.load(tmp_path / "c.json") == cfg
  with pytest.raises(ValueError, match=r"unknown EncoderConfig keys 'hiden_size' \(did you mean hidden_size"):
    EncoderConfig.from_dict({"hiden_size": 3})


def test_jit_forward_matches_eager():
  model = models.MaskedLM(tiny("serial,fourier"), rngs=nnx.Rngs(0))
  model.eval()
  ids, mask = np.ones((2, 6), np.int32), np.array([[1] * 6, [1] * 3 + [0] * 3])
  jitted = nnx.jit(lambda m, i, k: m(i, k))(model, ids, mask)
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(model(ids, mask)), atol=1e-5)


def test_model_attention_impl_switch_runs_pallas_kernel():
  cfg = tiny("serial*1").replace(num_heads=1)  # head_dim 32
  ids = np.random.default_rng(0).integers(1, 64, (2, 20))
  mask = np.ones_like(ids)
  mask[0, 13:] = 0
  ref = models.Encoder(cfg.replace(attention_impl="xla"), rngs=nnx.Rngs(0))
  ker = models.Encoder(cfg.replace(attention_impl="pallas"), rngs=nnx.Rngs(0))
  a, b = ref(ids, mask).last_hidden_state, ker(ids, mask).last_hidden_state
  np.testing.assert_allclose(np.asarray(b)[mask == 1], np.asarray(a)[mask == 1], atol=1e-5)


def test_gelu_is_the_exact_gelu():
  from jaxformers.layers.mlp import gelu_erf

  def exact(t):
    return jax.nn.gelu(t, approximate=False)
  x = jnp.linspace(-12.0, 12.0, 20001)
  np.testing.assert_allclose(np.asarray(gelu_erf(x)), np.asarray(exact(x)), atol=2e-6)
  np.testing.assert_allclose(np.asarray(jax.vmap(jax.grad(gelu_erf))(x)), np.asarray(jax.vmap(jax.grad(exact))(x)),
                             atol=1e-6)


@pytest.mark.parametrize("padding", ["per_sequence", "fnet"])
def test_fourier_ortho_norm_is_the_unitary_dft(padding):
  """``fourier_norm='ortho'`` == numpy's DFT over each sequence's own length (padded length for fnet) / sqrt(n D)."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 13, 16)).astype(np.float32)
  lengths = (13, 8, 1)
  mask = np.array([[1] * n + [0] * (13 - n) for n in lengths])
  seq = Sequences.build(3, 13, attention_mask=jnp.asarray(mask))
  mixer = fourier.FourierMixing(tiny("fourier*1", fourier_norm="ortho", fourier_padding=padding))
  got = np.asarray(mixer(jnp.asarray(x), seq))
  if padding == "fnet":
    want = np.real(np.fft.fftn(x.astype(np.float64), axes=(1, 2), norm="ortho"))
  else:
    want = np.zeros_like(x)
    for b, n in enumerate(lengths):
      want[b, :n] = np.real(np.fft.fftn(x[b, :n].astype(np.float64), norm="ortho"))
  np.testing.assert_allclose(got, want, atol=3e-6)
