"""Trainer pieces against independent references: the learning-rate schedule, AdamW with clipping and the
weight-decay mask (numpy), gradient accumulation (the full-batch gradient), MLM masking rates, GLUE metrics
(numpy formulas) and best-checkpoint selection."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from jaxformers import EncoderConfig, models
from jaxformers.data import batching
from jaxformers.train import checkpoint as ckpt_lib
from jaxformers.train import metrics, optim, run, steps
from jaxformers.train.defaults import base_config
from jaxformers.train.tasks import make_task
from tests.train_helpers import load_config, records


def _optim(**kw):
  o = base_config().optim
  for k, v in kw.items():
    o[k] = v
  return o


def _numpy_schedule(s, lr, end, warmup, total, kind):
  if s < warmup:
    return lr * s / warmup
  frac = min((s - warmup) / max(1, total - warmup), 1.0)
  if kind == "linear":
    return lr + (end - lr) * frac
  if kind == "cosine":
    return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * frac))
  return lr


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup_steps,warmup_ratio,expected_warmup", [(4, 0.0, 4), (-1, 0.25, 5), (0, 0.5, 0)])
def test_schedule_values_match_the_formula(kind, warmup_steps, warmup_ratio, expected_warmup):
  total, lr, end = 20, 1e-3, 1e-5
  fn = optim.schedule(_optim(lr=lr, end_lr=end, schedule=kind, warmup_steps=warmup_steps,
                             warmup_ratio=warmup_ratio), total)
  got = np.array([float(fn(s)) for s in range(total + 3)])
  want = np.array([_numpy_schedule(s, lr, end, expected_warmup, total, kind) for s in range(total + 3)])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
  if expected_warmup:
    assert got[0] == 0.0 and got[expected_warmup] == pytest.approx(lr)


def _tiny_cfg(**kw):
  return EncoderConfig(vocab_size=50, hidden_size=16, num_heads=2, intermediate_size=24, max_position_embeddings=16,
                       layout="serial,parallel", hidden_dropout=0.0, attention_dropout=0.0, **kw)


def test_weight_decay_mask_decays_matrices_only():
  model = models.SequenceClassifier(_tiny_cfg(), num_labels=3, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  flat = {".".join(map(str, p)): bool(m.get_value()) for p, m in nnx.to_flat_state(optim.decay_mask(params))}
  decayed = {k for k, m in flat.items() if m}
  kept = {k for k, m in flat.items() if not m}
  assert decayed and kept
  assert all(k.endswith(("kernel", "embedding")) for k in decayed), decayed
  assert all(k.endswith(("bias", "scale")) for k in kept), kept
  assert {"encoder.embeddings.norm.scale", "encoder.blocks.0.mixer.query.bias", "classifier.out.bias"} <= kept
  assert {"encoder.embeddings.word.embedding", "encoder.blocks.1.mlp.up.kernel"} <= decayed


def _numpy_adamw(params, grads_seq, o, lr_fn, decay):
  """AdamW written out (optax's conventions: eps outside the square root, bias correction, decoupled decay
  scaled by the learning rate), with global-norm clipping first."""
  p = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v2 = {k: np.zeros_like(v) for k, v in p.items()}
  for t, g in enumerate(grads_seq):
    norm = math.sqrt(sum(float(np.sum(x.astype(np.float64) ** 2)) for x in g.values()))
    c = min(1.0, o.clip_norm / norm) if o.clip_norm else 1.0
    for k in p:
      gk = g[k] * c
      m[k] = o.b1 * m[k] + (1 - o.b1) * gk
      v2[k] = o.b2 * v2[k] + (1 - o.b2) * gk ** 2
      u = (m[k] / (1 - o.b1 ** (t + 1))) / (np.sqrt(v2[k] / (1 - o.b2 ** (t + 1))) + o.eps)
      if decay[k]:
        u = u + o.weight_decay * p[k]
      p[k] = p[k] - lr_fn(t) * u
  return p


@pytest.mark.parametrize("clip_norm", [1.0, 0.0])
def test_adamw_with_clipping_and_decay_mask_matches_numpy(clip_norm):
  """Three updates, the first with a gradient far above the clip norm and the next two small: Adam's moments see
  the clipped sizes, so skipping clipping (or decaying a bias) changes every later update."""
  o = _optim(lr=0.1, end_lr=0.0, schedule="linear", warmup_steps=1, weight_decay=0.3, clip_norm=clip_norm, eps=1e-6)
  rng = np.random.default_rng(0)
  params = {"kernel": rng.normal(size=(3, 4)).astype(np.float32), "bias": rng.normal(size=(4,)).astype(np.float32),
            "scale": (1 + rng.normal(size=(4,))).astype(np.float32)}
  grads_seq = [{k: (s * rng.normal(size=v.shape)).astype(np.float32) for k, v in params.items()}
               for s in (50.0, 0.05, 0.2)]
  tx, lr_fn = optim.adamw(o, total_steps=4)
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  for g in grads_seq:
    updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
    p = optax.apply_updates(p, updates)
  want = _numpy_adamw(params, grads_seq, o, lambda t: float(lr_fn(t)), {"kernel": True, "bias": False,
                                                                        "scale": False})
  for k in params:
    np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=0, atol=2e-6, err_msg=k)


def _tiny_batch(rng, n=4, length=10, weights=(1, 1, 1, 0)):
  ids = rng.integers(3, 50, (n, length)).astype(np.int32)
  mask = np.ones((n, length), np.int32)
  for i, k in enumerate((10, 6, 8, 3)[:n]):
    mask[i, k:] = 0
    ids[i, k:] = 0
  return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
          "labels": rng.integers(0, 3, n).astype(np.int32), "weights": np.asarray(weights, np.float32)}


def test_gradient_accumulation_equals_the_full_batch_gradient():
  """One SGD(1.0) step returns params - g: with 2 micro-batches of unequal weight (a padding row in the second),
  g must equal the gradient of the weighted mean loss over the whole batch, computed here directly."""
  model = models.SequenceClassifier(_tiny_cfg(), num_labels=3, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  batch = _tiny_batch(np.random.default_rng(0))

  def mean_loss(p):
    logits = nnx.merge(graphdef, p, rest, copy=True)(batch["input_ids"], batch["attention_mask"],
                                                     batch["token_type_ids"])
    per = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    return jnp.sum(per * batch["weights"]) / jnp.sum(batch["weights"])
  want = jax.grad(mean_loss)(params)
  tx = optax.sgd(1.0)
  out = {}
  for accum in (1, 2):
    task = make_task(base_config())
    step = jax.jit(steps.make_train_step(graphdef, tx, lambda s: 0.0, task, accum_steps=accum))
    state = {"params": params, "opt_state": tx.init(params), "rngs": rest, "step": jnp.zeros((), jnp.int32)}
    new, m = step(state, batch, {})
    out[accum] = jax.tree.map(lambda a, b: a - b, params, new["params"])
    assert float(m["weight"]) == 3.0
    assert float(m["loss"]) == pytest.approx(float(mean_loss(params)), rel=1e-6)
  for accum in (1, 2):
    for (path, a), (_, b) in zip(nnx.to_flat_state(out[accum]), nnx.to_flat_state(want)):
      np.testing.assert_allclose(np.asarray(a[...]), np.asarray(b[...]), rtol=0, atol=2e-7, err_msg=f"{accum} {path}")


def test_mlm_masking_rates_and_specials():
  """15% of real, non-special tokens chosen; of those 80% -> [MASK], 10% random, 10% unchanged; padding and
  special tokens never chosen; labels are the original ids. Bounds are 5 binomial standard deviations."""
  rng = np.random.default_rng(0)
  n, length, vocab, mask_id, cls, sep = 64, 512, 30000, 3, 1, 2
  lengths = rng.integers(200, length + 1, n)
  ids = np.zeros((n, length), np.int32)
  att = np.zeros((n, length), np.int32)
  for i, k in enumerate(lengths):
    ids[i, :k] = rng.integers(5, vocab, k)
    ids[i, 0], ids[i, k - 1] = cls, sep
    att[i, :k] = 1
  batch = {"input_ids": ids, "attention_mask": att, "token_type_ids": np.zeros_like(ids),
           "weights": np.ones(n, np.float32), "labels": np.zeros(n, np.int32)}
  out = batching.mask_tokens(batch, np.random.default_rng(1), mask_id=mask_id, vocab_size=vocab,
                             special_ids=(0, cls, sep))
  chosen = out["weights"] > 0
  candidates = (att == 1) & (ids != cls) & (ids != sep)
  assert not (chosen & ~candidates).any()                      # padding and specials never chosen
  np.testing.assert_array_equal(out["labels"], ids)
  np.testing.assert_array_equal(out["input_ids"][~chosen], ids[~chosen])
  n_cand, n_chosen = int(candidates.sum()), int(chosen.sum())
  assert abs(n_chosen / n_cand - 0.15) < 5 * math.sqrt(0.15 * 0.85 / n_cand), n_chosen / n_cand
  new, old = out["input_ids"][chosen], ids[chosen]
  masked = new == mask_id
  unchanged = (new == old) & ~masked
  random = ~masked & ~unchanged
  for frac, p in ((masked.mean(), 0.8), (random.mean(), 0.1), (unchanged.mean(), 0.1)):
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n_chosen), (frac, p)
  assert new[random].min() >= 0 and new[random].max() < vocab


# --- GLUE metrics on written predictions, against the textbook formulas ----------------------------------------

LABELS = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0, 1])
PREDS = np.array([1, 0, 0, 1, 1, 0, 1, 1, 1, 0, 0, 1])


def test_f1_is_the_positive_class_f1():
  tp = int(((PREDS == 1) & (LABELS == 1)).sum())
  fp = int(((PREDS == 1) & (LABELS == 0)).sum())
  fn = int(((PREDS == 0) & (LABELS == 1)).sum())
  assert (tp, fp, fn) == (5, 2, 2)
  out = metrics.classification_metrics(LABELS, PREDS, "f1")
  assert out["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12)   # 10/14; macro would be 0.6571
  assert out["accuracy"] == pytest.approx(8 / 12, abs=1e-12)
  skewed = metrics.classification_metrics(np.array([0, 0, 0, 1]), np.array([0, 0, 1, 1]), "f1")
  assert skewed["f1"] == pytest.approx(2 / 3, abs=1e-12)                     # micro would be 0.75


def test_matthews_correlation_formula():
  tp, tn, fp, fn = 5, 3, 2, 2
  want = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
  out = metrics.classification_metrics(LABELS, PREDS, "matthews_corr")
  assert out["matthews_corr"] == pytest.approx(want, abs=1e-12)
  assert "f1" not in out


def test_stsb_pearson_and_spearman():
  rng = np.random.default_rng(0)
  labels = rng.uniform(0, 5, 40)
  preds = labels + rng.normal(0, 1.0, 40)
  preds[3] = 30.0                                                        # an outlier: Pearson and Spearman differ
  out = metrics.regression_metrics(labels, preds)

  def ranks(x):
    r = np.empty(len(x))
    r[np.argsort(x)] = np.arange(len(x))
    return r
  assert out["pearson"] == pytest.approx(np.corrcoef(preds, labels)[0, 1], abs=1e-12)
  assert out["spearman"] == pytest.approx(np.corrcoef(ranks(preds), ranks(labels))[0, 1], abs=1e-12)
  assert out["mse"] == pytest.approx(np.mean((preds - labels) ** 2), abs=1e-12)
  assert abs(out["pearson"] - out["spearman"]) > 0.1


# --- best checkpoint ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,values,best", [("max", [0.5, 0.9, 0.7, 0.8], 2), ("min", [0.5, 0.9, 0.3, 0.4], 3)])
def test_best_checkpoint_keeps_the_best_step(tmp_path, mode, values, best):
  c = ckpt_lib.Checkpoints(tmp_path, keep=1, best_metric="validation/m", best_mode=mode, async_save=False)
  for step, v in enumerate(values, 1):
    c.save_best(step, {"w": jnp.full((2,), float(step))}, {"step": step}, {"validation/m": v, "other": -v})
  c.wait()
  c.close()
  m = ocp.CheckpointManager(tmp_path / "best", options=ocp.CheckpointManagerOptions(read_only=True))
  assert m.all_steps() == [best]
  state = m.restore(best, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  np.testing.assert_array_equal(np.asarray(state["w"]), float(best))


def test_trainer_keeps_the_checkpoint_with_the_best_accuracy(tmp_path):
  """The task's official metric (accuracy, higher is better) picks DIR/best among the periodic evaluations."""
  run(load_config("tiny", "steps=8", train__eval_every=2, optim__lr=1e-2), tmp_path)
  acc = {r["step"]: r["validation/accuracy"] for r in records(tmp_path, "eval")}
  assert sorted(acc) == [2, 4, 6, 8]
  assert max(acc.values()) > min(acc.values()), acc              # else min and max would pick alike
  kept = [int(d.name) for d in (tmp_path / "best").iterdir() if d.name.isdigit()]
  assert len(kept) == 1 and acc[kept[0]] == max(acc.values()), (kept, acc)
  loss_best = tmp_path / "by_loss"
  run(load_config("tiny", "steps=8", train__eval_every=2, optim__lr=1e-2, train__best_metric="validation/loss"),
      loss_best)
  loss = {r["step"]: r["validation/loss"] for r in records(loss_best, "eval")}
  kept = [int(d.name) for d in (loss_best / "best").iterdir() if d.name.isdigit()]
  assert len(kept) == 1 and loss[kept[0]] == min(loss.values()), (kept, loss)
