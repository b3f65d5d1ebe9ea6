"""dtype="bfloat16": bfloat16 matmuls, float32 parameters, float32 softmax and LayerNorm statistics."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
from flax import nnx

from jaxformers import models
from jaxformers.config import EncoderConfig
from jaxformers.kernels.attention import attention
from jaxformers.layers.common import layer_norm

CFG = EncoderConfig(vocab_size=200, hidden_size=64, num_heads=2, intermediate_size=128, max_position_embeddings=64,
                    layout="serial*2", hidden_dropout=0.0, attention_dropout=0.0)


def bf16(x):
  return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16)


def equations(jaxpr):
  """Every equation of ``jaxpr`` and of the jaxprs nested in it (jit, custom_vjp, ...)."""
  for e in jaxpr.eqns:
    yield e
    for v in e.params.values():
      for sub in (v if isinstance(v, (list, tuple)) else [v]):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from equations(inner)


def test_layer_norm_statistics_are_float32():
  # Inputs far from zero: statistics taken in bfloat16 (spacing 0.25 at 40, 8 at 1600) would be off by ~0.1 sigma.
  x = bf16(40.0 + np.random.default_rng(0).normal(size=(8, 64)))
  ln = layer_norm(CFG.replace(dtype="bfloat16"), 64, rngs=nnx.Rngs(0))
  assert ln.scale.dtype == jnp.float32
  y = ln(jnp.asarray(x))
  assert y.dtype == jnp.bfloat16
  x64 = x.astype(np.float64)
  want = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + CFG.layer_norm_eps)
  err = np.abs(np.asarray(y, np.float64) - want).max()
  assert err < 0.02, err        # measured 0.0075 (outputs rounded to bfloat16); bfloat16 statistics: 0.12


def test_softmax_is_float32():
  # Logits of std ~10: rounded to bfloat16 (spacing 0.06 at 10) they would move the probabilities by several %.
  rng = np.random.default_rng(1)
  q, k, v = (bf16(rng.normal(size=(2, 24, 2, 32)) * s) for s in (3.3, 3.3, 1.0))
  out = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), impl="xla")
  assert out.dtype == jnp.bfloat16
  logits = np.einsum("bqnh,bknh->bnqk", q.astype(np.float64), k.astype(np.float64)) / np.sqrt(32)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = np.einsum("bnqk,bknh->bqnh", p, v.astype(np.float64))
  err = np.abs(np.asarray(out, np.float64) - want).max()
  assert err < 0.03, err        # measured 0.012 (bfloat16 probabilities and outputs); bfloat16 logits: 0.12


def test_bfloat16_model_multiplies_in_bfloat16_with_float32_parameters():
  model = models.Encoder(CFG.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
  model.eval()
  assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
  ids = jnp.asarray(np.random.default_rng(2).integers(5, 200, (2, 16)), jnp.int32)
  jaxpr = jax.make_jaxpr(lambda i: model(i, jnp.ones_like(i)).last_hidden_state)(ids)
  dots = [e for e in equations(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
  assert len(dots) >= 2 * 8       # q, k, v, out, up, down, logits, probs x values per block
  assert {str(v.aval.dtype) for e in dots for v in e.invars} == {"bfloat16"}

  f32 = models.Encoder(CFG, rngs=nnx.Rngs(0))
  f32.eval()
  a, b = (np.asarray(nnx.jit(lambda m, i: m(i, jnp.ones_like(i)).last_hidden_state)(m, ids), np.float32)
          for m in (model, f32))
  assert np.abs(a - b).max() < 0.08, np.abs(a - b).max()    # measured 0.031 on LayerNorm outputs of scale ~1
  assert np.abs(a - b).max() > 1e-3                          # and it did compute in bfloat16


def test_bfloat16_training_step_keeps_float32_parameters():
  from jaxformers.train import steps
  from jaxformers.train.defaults import base_config
  from jaxformers.train.tasks import make_task

  rng = np.random.default_rng(3)
  batch = {"input_ids": jnp.asarray(rng.integers(5, 200, (4, 16)), jnp.int32),
           "token_type_ids": jnp.zeros((4, 16), jnp.int32), "attention_mask": jnp.ones((4, 16), jnp.int32),
           "labels": jnp.asarray([0, 1, 1, 0], jnp.int32), "weights": jnp.ones((4,), jnp.float32)}
  model = models.SequenceClassifier(CFG.replace(dtype="bfloat16", layout="serial"), num_labels=2,
                                    rngs=nnx.Rngs(params=0, dropout=1))
  model.train()
  gd, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.sgd(0.1)
  state = {"params": params, "opt_state": tx.init(params), "rngs": rest, "step": jnp.zeros((), jnp.int32)}
  new, metrics = jax.jit(steps.make_train_step(gd, tx, lambda s: 0.1, make_task(base_config())))(state, batch, {})
  assert {p.dtype for p in jax.tree.leaves(new["params"])} == {jnp.dtype(jnp.float32)}
  moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(jax.tree.leaves(new["params"]),
                                                                         jax.tree.leaves(params))]
  assert 0 < max(moved) < 1 and np.isfinite(moved).all()
  # The loss is the float32 model's up to bfloat16 rounding (the same parameters, no dropout in CFG).
  f32 = nnx.merge(nnx.graphdef(models.SequenceClassifier(CFG.replace(layout="serial"), num_labels=2,
                                                         rngs=nnx.Rngs(params=0, dropout=1))), params, rest)
  logits = np.asarray(nnx.jit(lambda m, i, a: m(i, a))(f32, batch["input_ids"], batch["attention_mask"]), np.float64)
  want = np.mean(np.log(np.exp(logits).sum(-1)) - logits[np.arange(4), np.asarray(batch["labels"])])
  # measured 2e-6 (a fresh model's logits are small); the loss rounded to bfloat16 would be ~2e-3 off
  assert abs(float(metrics["loss"]) - want) < 1e-4, (float(metrics["loss"]), want)
