"""int8 post-training quantization, quantization-aware layers, and int8 models in save/load, encode and train.py."""
from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import pytest

import jaxformers
from jaxformers.errors import CheckpointError
from jaxformers.layers.quant import Int8Dense, quantize_kernel
from jaxformers.quant import quantize, size_report


def numpy_int8_dense(x, w, b):
  """The reference: symmetric int8 weights per output channel, int8 inputs per row, integer matmul."""
  sw = np.maximum(np.abs(w).max(0, keepdims=True), 1e-12) / 127.0
  wq = np.clip(np.round(w / sw), -127, 127).astype(np.int32)
  sx = np.maximum(np.abs(x).max(1, keepdims=True), 1e-12) / 127.0
  xq = np.clip(np.round(x / sx), -127, 127).astype(np.int32)
  return (xq @ wq).astype(np.float64) * sx * sw + b


def test_int8_dense_matches_numpy_reference():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((6, 48)).astype(np.float32) * rng.uniform(0.1, 5.0, (6, 1)).astype(np.float32)
  w = (rng.standard_normal((48, 20)) * 0.1).astype(np.float32)
  b = rng.standard_normal(20).astype(np.float32)
  layer = Int8Dense(48, 20, ("embed", "mlp"), dtype=jnp.float32, param_dtype=jnp.float32)
  q, s = quantize_kernel(w)
  layer.kernel[...], layer.kernel_scale[...], layer.bias[...] = jnp.asarray(q), jnp.asarray(s), jnp.asarray(b)
  ours = np.asarray(layer(jnp.asarray(x).reshape(2, 3, 48))).reshape(6, 20)
  ref = numpy_int8_dense(x.astype(np.float64), w.astype(np.float64), b)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
  # and it is an approximation of the float layer: ~1% of the output scale
  exact = x @ w + b
  assert np.abs(ours - exact).max() < 0.02 * np.abs(exact).max()


def test_fake_quant_forward_is_the_int8_forward_and_passes_gradients():
  from jaxformers import EncoderConfig
  from jaxformers.layers.common import linear
  from flax import nnx
  cfg = EncoderConfig(hidden_size=32, num_heads=4, quant_aware=True)
  dense = linear(cfg, 32, 16, ("embed", "mlp"), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (5, 32))
  q, s = quantize_kernel(dense.kernel[...])
  ref = numpy_int8_dense(np.asarray(x, np.float64), np.asarray(dense.kernel[...], np.float64),
                         np.asarray(dense.bias[...], np.float64))
  np.testing.assert_allclose(np.asarray(dense(x)), ref, rtol=1e-5, atol=1e-5)
  g = jax.grad(lambda k: jnp.sum(jnp.sin(x @ k)))(dense.kernel[...])
  gq = nnx.grad(lambda d: jnp.sum(jnp.sin(d(x) - d.bias[...])))(dense).kernel[...]   # straight-through: ~ float grad
  assert np.all(np.isfinite(np.asarray(gq))) and np.corrcoef(np.ravel(g), np.ravel(gq))[0, 1] > 0.99


def test_quantize_keeps_the_class_names_and_leaves_the_float_model_alone(tmp_path):
  """A twelve-class classifier: the int8 copy has every dense kernel (task head included) int8, the class names in
  id order in memory and after save/load, logits near the float model's; the float model is not touched."""
  from flax import nnx
  from jaxformers import EncoderConfig, build
  from jaxformers.params import get_params
  from conftest import padded_batch
  cfg = EncoderConfig(vocab_size=60, hidden_size=32, num_heads=4, intermediate_size=64, layout="serial*2",
                      max_position_embeddings=16, hidden_dropout=0.0, attention_dropout=0.0)
  m = build("classification", cfg, num_labels=12, rngs=nnx.Rngs(0))
  m.label_names = tuple(str(i) for i in range(12))
  m.eval()
  before = {k: v.copy() for k, v in get_params(m).items()}
  ids, mask = padded_batch(60, lengths=(9, 4))
  want = np.asarray(m(ids, mask))
  q = quantize(m)
  assert all(np.array_equal(v, before[k]) for k, v in get_params(m).items())      # the source is untouched
  kernels = {k: v for k, v in get_params(q).items() if k.endswith(".kernel")}
  assert kernels and all(v.dtype == np.int8 for v in kernels.values()) and "classifier.out.kernel" in str(list(kernels))
  jaxformers.save_pretrained(q, tmp_path / "q")
  for model in (q, jaxformers.from_pretrained(tmp_path / "q")):
    assert model.label_names == tuple(str(i) for i in range(12)) and model.num_labels == 12
    got = np.asarray(model(ids, mask))
    assert np.abs(got - want).max() < 0.025 * np.abs(want).max(), np.abs(got - want).max()   # measured 1.2%


def test_int8_ptq_on_real_minilm(minilm_dir, tmp_path, capsys):
  """`jaxformers quantize` on all-MiniLM-L6-v2: outputs near fp32, one dense layer equal to the numpy reference,
  int8 sizes, native reload bit-equal to quantizing in memory, encode, HF export refused."""
  from jaxformers.cli import main
  assert main(["quantize", str(minilm_dir), str(tmp_path / "q")]) == 0
  assert "MB on disk" in capsys.readouterr().out
  fp = jaxformers.from_pretrained(minilm_dir)
  q = jaxformers.from_pretrained(tmp_path / "q")
  assert q.config.quantization == "int8"
  tok = jaxformers.load_tokenizer(minilm_dir)
  texts = ["A man is playing a guitar on the stage.", "The new movie is awesome and everyone loved it.",
           "Quantization stores weights in eight bits.", "Where is the nearest train station?"]
  tok.no_padding()
  enc = [e.ids for e in tok.encode_batch(texts)]
  n = max(map(len, enc))
  ids = np.zeros((len(enc), n), np.int32)
  mask = np.zeros_like(ids)
  for i, e in enumerate(enc):
    ids[i, :len(e)], mask[i, :len(e)] = e, 1
  a = np.asarray(fp(ids, mask).last_hidden_state)[mask.astype(bool)]
  b = np.asarray(q(ids, mask).last_hidden_state)[mask.astype(bool)]
  # measured on these 44 tokens: mean |diff| 0.025, max 0.27 (hidden-state std 0.44), per-token cosine >= 0.9946
  assert np.abs(a - b).mean() < 0.035 and np.abs(a - b).max() < 0.4
  cos = np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
  assert cos.min() > 0.99, cos.min()
  # one dense layer against the numpy reference, on the real weights and real activations
  h = np.asarray(fp.embeddings(jnp.asarray(ids), jnp.broadcast_to(jnp.arange(n), ids.shape), None))
  w = np.asarray(fp.blocks[0].mixer.query.kernel[...], np.float64)
  bias = np.asarray(fp.blocks[0].mixer.query.bias[...], np.float64)
  ours = np.asarray(q.blocks[0].mixer.query(jnp.asarray(h))).reshape(-1, w.shape[1])
  ref = numpy_int8_dense(h.reshape(-1, h.shape[-1]).astype(np.float64), w, bias)
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
  # sizes: every dense kernel is int8, the embeddings stay float
  sf, sq = size_report(fp), size_report(q)
  assert q.blocks[0].mlp.up.kernel[...].dtype == jnp.int8
  from jaxformers.params import get_params
  dense = {k: v for k, v in get_params(fp).items() if k.endswith(".kernel")}
  assert sq["int8_params"] == sum(v.size for v in dense.values()) and len(dense) == 6 * 6 + 1
  assert sq["bytes"] < 0.7 * sf["bytes"]
  # the saved int8 model is the in-memory quantization, bit for bit; encode runs it (mean pooling of the fp32
  # model's states as the reference); HF export refuses it
  saved, fresh = get_params(q), get_params(quantize(fp))
  assert saved.keys() == fresh.keys() and all(np.array_equal(saved[k], fresh[k]) for k in saved)
  full = np.asarray(fp(ids, mask).last_hidden_state)
  va = (full * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  va /= np.linalg.norm(va, axis=-1, keepdims=True)
  vb = jaxformers.encode(tmp_path / "q", texts, pooling="mean", normalize=True)
  assert np.min(np.sum(va * vb, -1)) > 0.995
  with pytest.raises(CheckpointError, match="int8"):
    jaxformers.export_hf(q, tmp_path / "hf")


def test_quantize_of_a_sentence_transformers_directory_keeps_pooling_normalisation_and_length(minilm_dir, tmp_path):
  """`jaxformers quantize` of all-MiniLM-L6-v2 (mean pooling, L2-normalised, max_seq_length 256), then
  `jaxformers encode` on the int8 model with no options: the float model's sentence-transformers vectors, up to
  the int8 error."""
  from jaxformers.cli import main
  from jaxformers.encode import sentence_transformers_config
  assert main(["quantize", str(minilm_dir), str(tmp_path / "q")]) == 0
  assert sentence_transformers_config(tmp_path / "q") == sentence_transformers_config(minilm_dir) == \
      {"pooling": "mean", "normalize": True, "max_length": 256}
  texts = ["A man is playing a guitar on the stage.", "The new movie is awesome and everyone loved it.",
           "Quantization stores weights in eight bits.", "word " * 400]          # the last one is cut at 256 tokens
  (tmp_path / "t.txt").write_text("\n".join(texts) + "\n")
  assert main(["encode", str(tmp_path / "q"), str(tmp_path / "t.txt"), str(tmp_path / "v.npy")]) == 0
  got, want = np.load(tmp_path / "v.npy"), jaxformers.encode(minilm_dir, texts)
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, rtol=1e-5)
  cos = np.sum(got * want, -1)
  assert cos.min() > 0.993, cos      # measured 0.9956 to 0.9977 (cls pooling, unnormalised, gave 0.51)
