"""Distillation: each loss against numpy, a student equal to its teacher learns nothing, bad maps are named,
packed == padded, resume and devices change nothing."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxformers
from jaxformers import distill
from jaxformers.data import batching
from jaxformers.train import ConfigError, run
from jaxformers.train.loop import Run
from tests.train_helpers import ROOT, load_config, train_losses


def np_log_softmax(x, axis=-1):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def test_soft_label_kl_matches_numpy():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, 5, 7)), rng.normal(size=(2, 5, 7))
  T = 2.0
  lt, ls = np_log_softmax(t / T), np_log_softmax(s / T)
  want = T * T * (np.exp(lt) * (lt - ls)).sum(-1)
  np.testing.assert_allclose(distill.soft_label_kl(jnp.asarray(s), jnp.asarray(t), T), want, rtol=2e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(distill.soft_label_kl(jnp.asarray(t), jnp.asarray(t), T)))) < 1e-6


def test_hidden_mse_matches_numpy():
  rng = np.random.default_rng(1)
  s, t = rng.normal(size=(2, 4, 6)), rng.normal(size=(2, 4, 6))
  valid = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
  want = (((s - t) ** 2).mean(-1) * valid).sum()
  np.testing.assert_allclose(distill.hidden_mse(jnp.asarray(s), jnp.asarray(t), jnp.asarray(valid)), want, rtol=1e-5)


def test_relation_kl_matches_numpy_with_padding_and_packing():
  rng = np.random.default_rng(2)
  seg = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
  same, valid = distill.token_relations(jnp.asarray(seg))
  heads = 2
  sa, sb = rng.normal(size=(2, 6, 8)), rng.normal(size=(2, 6, 8))
  ta, tb = rng.normal(size=(2, 6, 12)), rng.normal(size=(2, 6, 12))   # another width: relation heads bridge it

  def rel(a, b):
    bsz, l, d = a.shape
    dr = d // heads
    a, b = a.reshape(bsz, l, heads, dr), b.reshape(bsz, l, heads, dr)
    out = np.zeros((bsz, heads, l, l))
    for i in range(bsz):
      for r in range(heads):
        sc = a[i, :, r] @ b[i, :, r].T / np.sqrt(dr)
        for q in range(l):
          if seg[i, q] == 0:
            continue
          keys = seg[i] == seg[i, q]
          row = np.full(l, -np.inf)
          row[keys] = sc[q, keys]
          out[i, r, q] = row - np.log(np.exp(row[keys] - row[keys].max()).sum()) - row[keys].max()
    return out
  lt, ls = rel(ta, tb), rel(sa, sb)
  want = 0.0
  for i in range(2):
    for q in range(6):
      if seg[i, q] == 0:
        continue
      keys = (seg[i] == seg[i, q])
      want += np.mean([(np.exp(lt[i, r, q, keys]) * (lt[i, r, q, keys] - ls[i, r, q, keys])).sum()
                       for r in range(heads)])
  got = distill.relation_kl((jnp.asarray(sa), jnp.asarray(sb)), (jnp.asarray(ta), jnp.asarray(tb)), heads, same, valid)
  np.testing.assert_allclose(float(got), want, rtol=2e-5)
  with pytest.raises(ValueError, match=r"relation heads 3 must divide the student's width 8"):
    distill.relation_kl((jnp.asarray(sa), jnp.asarray(sb)), (jnp.asarray(ta), jnp.asarray(tb)), 3, same, valid)


def test_layer_maps():
  assert distill.default_layer_map(3, 6) == ((1, 2), (2, 4), (3, 6))
  assert distill.default_layer_map(6, 6) == tuple((i, i) for i in range(1, 7))
  assert distill.parse_layer_map("0:0, 2:5", 2, 6) == ((0, 0), (2, 5))
  with pytest.raises(ValueError, match=r"item '3:1': the student has layers 0..2 and the teacher 0..6"):
    distill.parse_layer_map("3:1", 2, 6)
  with pytest.raises(ValueError, match=r"item 'a-b': expected student:teacher"):
    distill.parse_layer_map("a-b", 2, 6)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  """A small trained classifier (serial*2 on the embedded data), the teacher of every test below."""
  wd = tmp_path_factory.mktemp("teacher") / "run"
  run(load_config("tiny", "steps=4", model__hidden_dropout=0.0, model__attention_dropout=0.0), wd)
  return str(wd)


def heal_config(teacher, layout="", **kw):
  kw = dict(dict(task="heal", init_from=teacher, model__layout=layout, distill__teacher=teacher,
                 distill__hidden=1.0, distill__attention=1.0, distill__value=1.0), **kw)
  return load_config("tiny", "steps=4", **kw)


def loss_and_grad(r, batch):
  params, rest = r.init_params()
  from flax import nnx

  def f(p):
    model = nnx.merge(r.gd_eval, p, rest, copy=True)
    s, w, _, _ = r.task.loss(model, batch, r.inputs, r.max_segments)
    return s / w
  return jax.value_and_grad(f)(params)


def a_batch(r, n=6, packing=None):
  data = r.tokenized("validation")
  data.ids, data.type_ids = data.ids[:n], data.type_ids[:n]
  if data.label is not None:
    data.label = data.label[:n]
  return next(iter(batching.eval_batches(data, n, r.max_length, r.special["pad"], None, seed=0, packing=packing)))[1]


@pytest.mark.parametrize("extra", [{}, {"task": "classification", "distill__logits": 1.0},
                                   {"distill__first_token": 1.0, "distill__hidden": 0.0}])
def test_a_student_equal_to_its_teacher_has_zero_loss_and_gradient(teacher, tmp_path, extra):
  r = Run(heal_config(teacher, **extra), tmp_path / "run")
  batch = a_batch(r)
  if extra:   # the task's own loss is not zero: weigh it out
    r.task.task_weight = 0.0
  loss, grads = loss_and_grad(r, batch)
  assert abs(float(loss)) < 1e-6
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) < 1e-5


def test_relation_losses_use_the_deepest_mapped_pair_with_attention_on_both_sides(teacher, tmp_path):
  """Layer map 1:2,2:1 (student layer 1 <- teacher layer 2, student layer 2 <- teacher layer 1): the attention and
  value relations compare the queries, keys and values that student block 2 and teacher block 1 compute from their
  inputs (hidden_states[1] and hidden_states[0]). Against numpy (projections, softmax, KL) at that pair; every other
  pair gives another value."""
  from flax import nnx
  from jaxformers.params import get_params
  r = Run(heal_config(teacher, "serial*2", init_from="", data__tokenizer=teacher, distill__hidden=0.0,
                      distill__layer_map="1:2,2:1"), tmp_path / "run")      # a student of its own (new weights)
  assert r.task.distillation.relation == (2, 1)
  batch = a_batch(r)
  loss, _ = loss_and_grad(r, batch)
  params, rest = r.init_params()
  student = nnx.merge(r.gd_eval, params, rest, copy=True)
  t_model = jaxformers.from_pretrained(teacher)
  mask = np.asarray(batch["attention_mask"])
  heads = r.cfg.num_heads

  def hidden(model):
    from jaxformers import models
    out = models.encoder_of(model)(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                                   output_hidden_states=True)
    return [np.asarray(h, np.float64) for h in out.hidden_states]

  def qkv(model, block, x):
    p = {k: np.asarray(v, np.float64) for k, v in get_params(model).items()}
    pre = ("encoder." if any(k.startswith("encoder.") for k in p) else "") + f"blocks.{block}.mixer."
    return [x @ p[pre + n + ".kernel"] + p[pre + n + ".bias"] for n in ("query", "key", "value")]

  def logrel(a, b):
    bsz, l, d = a.shape
    dr = d // heads
    sc = np.einsum("bqrd,bkrd->brqk", a.reshape(bsz, l, heads, dr), b.reshape(bsz, l, heads, dr)) / np.sqrt(dr)
    sc = np.where(mask[:, None, None, :] > 0, sc, -np.inf)
    m = sc.max(-1, keepdims=True)
    return sc - m - np.log(np.exp(sc - m).sum(-1, keepdims=True))

  def kl(s_pair, t_pair):
    ls, lt = logrel(*s_pair), logrel(*t_pair)
    keys = mask[:, None, None, :] > 0
    ls, lt = np.where(keys, ls, 0.0), np.where(keys, lt, 0.0)     # padded keys: -inf, outside the sum
    per = np.where(keys, np.exp(lt) * (lt - ls), 0.0).sum(-1).mean(1)   # [B, L]
    return (per * mask).sum()

  hs, ht = hidden(student), hidden(t_model)
  n_tok = mask.sum()

  def reference(i, j):
    sq, sk, sv = qkv(student, i - 1, hs[i - 1])
    tq, tk, tv = qkv(t_model, j - 1, ht[j - 1])
    return (kl((sq, sk), (tq, tk)) + kl((sv, sv), (tv, tv))) / n_tok
  want = reference(2, 1)
  assert float(loss) == pytest.approx(want, rel=1e-4), (float(loss), want)   # measured rel 2e-5
  for pair in ((1, 2), (2, 2), (1, 1)):
    assert abs(reference(*pair) - want) > 1e-2 * want, pair


def test_packed_and_padded_batches_give_the_same_distillation_loss(teacher, tmp_path):
  r = Run(heal_config(teacher, "parallel*2", model__fourier_impl="matmul"), tmp_path / "run")
  padded = a_batch(r)
  packed = a_batch(r, packing=batching.Packing(rows=6, max_segments=4))
  assert packed["segment_ids"].max(axis=1).sum() == 6          # the same six examples, some sharing a row
  assert (packed["segment_ids"].max(axis=1) > 1).any()
  lp, _ = loss_and_grad(r, padded)
  lk, _ = loss_and_grad(r, packed)
  assert float(lp) > 1e-5
  np.testing.assert_allclose(float(lk), float(lp), rtol=2e-5)


def test_bad_distillation_configs_are_named(teacher, tmp_path):
  with pytest.raises(ConfigError, match=r"need a layer-map pair where both models have attention; the student has "
                                        r"none at layers \[1, 2\]"):
    Run(heal_config(teacher, "fourier*2"), tmp_path / "a")
  with pytest.raises(ConfigError, match=r"distill.logits needs a teacher with the student's head \(masked_lm\); the "
                                        r"teacher is a classification model"):
    Run(heal_config(teacher, distill__logits=1.0), tmp_path / "b")
  with pytest.raises(ConfigError, match=r"task=heal needs at least one distillation loss"):
    Run(heal_config(teacher, distill__hidden=0.0, distill__attention=0.0, distill__value=0.0), tmp_path / "c")
  with pytest.raises(ConfigError, match=r"config.task='heal' needs config.distill.teacher"):
    Run(heal_config(teacher, distill__teacher=""), tmp_path / "d")
  with pytest.raises(ConfigError, match=r"relation_heads=3 must divide the student's hidden size 32"):
    Run(heal_config(teacher, distill__relation_heads=3), tmp_path / "e")
  assert not any((tmp_path / x).exists() for x in "abcde")


def test_healing_resumes_bit_identically(teacher, tmp_path):
  kw = dict(model__hidden_dropout=0.1, model__attention_dropout=0.1)
  full, part = tmp_path / "full", tmp_path / "part"
  out = run(heal_config(teacher, "parallel*2", **kw), full)
  run(heal_config(teacher, "parallel*2", train__stop_after=2, **kw), part)
  run(heal_config(teacher, "parallel*2", **kw), part)
  lf, lp = train_losses(full), train_losses(part)
  assert [lf[k] for k in sorted(lf)] == [lp[k] for k in sorted(lp)] and len(lf) == 4
  assert out["eval"]["validation/loss"] > 0
  healed = jaxformers.from_pretrained(full)     # the healed encoder loads as a model
  assert type(healed).__name__ == "Encoder" and healed.config.layout == "parallel*2"


def test_healing_moves_a_student_toward_its_teacher(teacher, tmp_path):
  # a student from scratch (the teacher's tokenizer and sizes, another layout): the distillation loss falls
  out = run(heal_config(teacher, "parallel*2", init_from="", data__tokenizer=teacher, train__num_steps=8),
            tmp_path / "run")
  losses = train_losses(tmp_path / "run")
  assert losses[8] < 0.25 * losses[1] and out["eval"]["validation/loss"] < 0.25 * losses[1]


SCRIPT = r"""
import json, sys
import jax
assert jax.device_count() == 4, jax.devices()
sys.path.insert(0, {root!r})
from tests.train_helpers import load_config, train_losses
from tests.test_distill import heal_config
from jaxformers.train import run
out = {{}}
for name, fsdp in (("dp", 1), ("fsdp", 4)):
  wd = {tmp!r} + "/" + name
  run(heal_config({teacher!r}, "parallel*2", mesh__fsdp=fsdp), wd)
  out[name] = train_losses(wd)
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_healing_on_four_devices_equals_one(teacher, tmp_path):
  run(heal_config(teacher, "parallel*2"), tmp_path / "one")
  ref = train_losses(tmp_path / "one")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-c", SCRIPT.format(root=str(ROOT), tmp=str(tmp_path), teacher=teacher)],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  res = json.loads(p.stdout.split("RESULT", 1)[1])
  for name in ("dp", "fsdp"):
    got = {int(k): v for k, v in res[name].items()}
    np.testing.assert_allclose([got[k] for k in sorted(ref)], [ref[k] for k in sorted(ref)], rtol=2e-5, err_msg=name)


def test_a_teacher_with_another_vocabulary_is_refused_up_front(teacher, tmp_path):
  """A teacher whose tokenizer is not the student's used to be checked only for masked-LM logits: the run read the
  student's ids as the teacher's tokens (ids past its table: NaN, with advice to lower the learning rate)."""
  other = tmp_path / "other"           # the same data and model, a 300-token WordPiece instead of 400
  run(load_config("tiny", "steps=1", data__vocab_size=300), other)
  student = dict(distill__hidden=1.0)
  with pytest.raises(ConfigError, match=rf"^config.distill.teacher={other}: its tokenizer \(300 tokens, embeddings "
                                        rf"for 300\) is not the student's \(400 tokens, from the training texts\), so "
                                        rf"it would read the student's token ids as other tokens; train the student "
                                        rf"with the teacher's tokenizer \(config.data.tokenizer={other}\)$"):
    Run(load_config("tiny", "steps=1", distill__teacher=str(other), **student), tmp_path / "a")
  bare = tmp_path / "bare"             # no tokenizer beside the teacher: its embedding rows must cover the ids
  jaxformers.save_pretrained(jaxformers.from_pretrained(other), bare)
  with pytest.raises(ConfigError, match=rf"^config.distill.teacher={bare}: its embeddings have 300 tokens, fewer "
                                        rf"than the student's tokenizer \(400 tokens, from the training texts\)"):
    Run(load_config("tiny", "steps=1", distill__teacher=str(bare), **student), tmp_path / "b")
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
  Run(load_config("tiny", "steps=1", distill__teacher=teacher, **student), tmp_path / "c")   # the same tokenizer
