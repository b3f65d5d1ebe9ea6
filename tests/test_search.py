"""Architecture search: supernet, Gumbel-softmax, costs, read-off, derivation, and the search as a trainer task."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformers import models, search
from jaxformers.config import EncoderConfig
from jaxformers.train import run
from jaxformers.errors import ConfigError
from tests.test_train_resume import assert_same_runs
from tests.train_helpers import ROOT, checkpoint_params, load_config, records

CANDS = ("attention", "ffn", "identity")
SEARCH = dict(search__enabled=True, search__warmup_steps=2, search__heldout_batch_size=8,
              model__hidden_dropout=0.1, optim__schedule="linear", optim__warmup_steps=2)


def tiny_cfg(**kw):
  base = dict(layout="serial*2", hidden_size=16, num_heads=2, intermediate_size=24, vocab_size=40,
              max_position_embeddings=16, hidden_dropout=0.0, attention_dropout=0.0)
  return EncoderConfig(**{**base, **kw})


def supernet(cands=CANDS, hard=False, seed=0):
  m = models.build("classification", tiny_cfg(), num_labels=3, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
  return search.to_supernet(m, cands, hard=hard, rngs=nnx.Rngs(params=seed, dropout=seed + 1))


def set_logits(model, rows):
  for ch, row in zip(search.choices_of(model), rows):
    ch.logits[...] = jnp.asarray(row, jnp.float32)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
  """One 8-step search of the tiny config (dropout on, arch frozen for 2 steps), shared by the trainer tests."""
  wd = tmp_path_factory.mktemp("search") / "full"
  out = run(load_config("tiny", "steps=8", search__then_train=True, search__then_train_steps=2, **SEARCH), wd)
  return wd, out


# --- model-level ------------------------------------------------------------------------------------------------

def test_arch_logits_are_their_own_variable_type():
  m = supernet()
  arch, weights = nnx.state(m, search.ArchParam), nnx.state(m, nnx.Param)
  assert len(jax.tree.leaves(arch)) == 4                      # serial*2: 4 sublayer positions
  assert all(x.shape == (3,) for x in jax.tree.leaves(arch))
  assert all(k.endswith(".logits") for k in dotted_state(arch))
  assert not any("logits" in k for k in dotted_state(weights)) and len(dotted_state(weights)) > 20


@pytest.mark.parametrize("hard", [False, True])
def test_extreme_logits_give_finite_loss_and_gradients(hard):
  m = supernet(hard=hard)
  set_logits(m, [[1e4, -1e4, 0.0], [-1e4, 1e4, -1e4], [0.0, -1e4, 1e4], [-1e4, -1e4, 1e4]])
  gd, params, rest = nnx.split(m, (nnx.Param, search.ArchParam), ...)
  ids = jnp.asarray(np.random.default_rng(0).integers(1, 40, (2, 8)), jnp.int32)

  def loss(p):
    logits = nnx.merge(gd, p, rest, copy=True)(ids, jnp.ones((2, 8)))
    return jnp.mean(jax.nn.log_softmax(logits)[:, 0])
  for tau in (1.0, 0.01):
    rest = jax.tree.map(lambda v: v.replace(jnp.float32(tau)) if isinstance(v, search.Temperature) else v, rest,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
    val, g = jax.jit(jax.value_and_grad(loss))(params)
    assert np.isfinite(float(val))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(g))
  # the softmax of extreme logits is the one-hot of the largest, without NaN
  probs = np.asarray(search.probabilities(search.arch_logits(m)))
  np.testing.assert_array_equal(probs.argmax(-1), [0, 1, 2, 2])
  assert np.all(np.isfinite(probs))


def test_gumbel_softmax_hard_is_one_hot_with_soft_gradient():
  logits = jnp.asarray([0.3, -0.2, 0.1])
  key = jax.random.key(3)
  soft = search.gumbel_softmax(logits, key, 0.5)
  hard = search.gumbel_softmax(logits, key, 0.5, hard=True)
  np.testing.assert_array_equal(np.asarray(hard), np.eye(3)[int(np.argmax(soft))])
  g_soft = jax.grad(lambda l: search.gumbel_softmax(l, key, 0.5)[1])(logits)
  g_hard = jax.grad(lambda l: search.gumbel_softmax(l, key, 0.5, hard=True)[1])(logits)
  np.testing.assert_allclose(np.asarray(g_hard), np.asarray(g_soft), rtol=1e-6)
  # reference: softmax((l + g) / tau) with numpy and the same noise
  g = np.asarray(jax.random.gumbel(key, (3,), jnp.float32))
  z = (np.asarray(logits) + g) / 0.5
  np.testing.assert_allclose(np.asarray(soft), np.exp(z - z.max()) / np.exp(z - z.max()).sum(), rtol=1e-6)


def test_temperature_schedule():
  t = lambda s: float(search.temperature(s, 2.0, 0.02, 10, 110))  # noqa: E731
  assert t(0) == pytest.approx(2.0) and t(10) == pytest.approx(2.0)
  assert t(60) == pytest.approx(np.sqrt(2.0 * 0.02), rel=1e-5)       # geometric midpoint
  assert t(35) == pytest.approx(2.0 * 0.01 ** 0.25, rel=1e-5)
  assert t(110) == pytest.approx(0.02, rel=1e-5) and t(500) == pytest.approx(0.02, rel=1e-5)
  assert all(t(a) > t(a + 1) for a in range(10, 110))


@pytest.mark.parametrize("steps,xlim", [([2, 4, 6], (1.0, 7.0)), ([10], (9.5, 10.5))])
def test_heatmap_columns_are_centred_on_their_steps(tmp_path, steps, xlim):
  """A record of one step (a search stopped early) draws one column of width 1, without matplotlib's warning about
  a singular x range."""
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    fig = search.heatmap(steps, np.full((len(steps), 4, 3), 1 / 3), CANDS, tmp_path / "h.png")
  assert [ax.get_xlim() for ax in fig.axes[:3]] == [xlim] * 3


def test_heatmap_writes_the_png_and_leaves_the_matplotlib_backend_alone(tmp_path):
  import matplotlib
  import matplotlib.image
  before = matplotlib.get_backend()
  matplotlib.use("svg")                    # stands in for a notebook's inline backend
  try:
    probs = np.full((5, 4, 3), 1 / 3)
    search.heatmap(list(range(1, 6)), probs, CANDS, tmp_path / "h.png", title="t")
    assert matplotlib.get_backend() == "svg"
  finally:
    matplotlib.use(before)
  img = matplotlib.image.imread(tmp_path / "h.png")
  assert img.shape[:2] == (round(110 * (0.35 * 4 + 2)), round(110 * (3.2 * 3 + 1)))


def test_read_off_hand_set_logits():
  # attention, ffn | attention, identity | identity, ffn  ->  serial, attention, ffn
  logits = [[5, 0, 0], [0, 5, 0], [5, 0, 1], [0, 0, 5], [0, 1, 4], [0, 5, 0]]
  assert search.read_off(logits, CANDS) == "serial,attention,ffn"
  # identity capped at half the positions: the identity with the smallest lead (position 3: 4 vs 1) gives way
  logits = [[0, 0, 5], [0, 0, 5], [0, 1, 4], [3, 0, 4]]
  assert search.choose(logits, CANDS, max_identity=0.5) == ["identity", "identity", "ffn", "attention"]
  assert search.read_off(logits, CANDS, max_identity=0.5) == "ffn,attention"
  # ties go to the earlier candidate; all-identity is never read off
  assert search.choose([[1, 1, 1]], CANDS) == ["attention"]
  assert search.read_off([[0, 0, 9], [0, 0, 9]], CANDS) in ("attention", "ffn")
  assert search.read_off([[0, 0, 0, 5, 0], [0, 5, 0, 0, 0]], CANDS + ("fourier", "sparse")) == "fourier"


def brute_force_choice(logits, costs, budget, cap, ident):
  """The most probable choice within the budget and the identity cap, by enumerating every one (ties: the
  lexicographically first)."""
  import itertools
  logp = np.asarray(logits, np.float64)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  best = None
  for picks in itertools.product(range(logp.shape[1]), repeat=logp.shape[0]):
    if sum(k == ident for k in picks) > cap or sum(costs[k] for k in picks) > budget * (1 + 1e-9):
      continue
    score = sum(logp[p, k] for p, k in enumerate(picks))
    if best is None or score > best[0] + 1e-12:
      best = (score, picks)
  return None if best is None else list(best[1])


def test_read_off_held_to_the_flops_budget_is_the_most_probable_layout_that_fits():
  cfg = tiny_cfg(layout="serial*3")
  costs = search.cost_table(cfg, CANDS, 16)
  source = search.source_flops(cfg, 16)
  rng = np.random.default_rng(0)
  changed = 0
  for trial in range(40):
    logits = rng.normal(size=(6, 3)) * 2.0
    for ratio in (0.3, 0.5, 0.65, 0.9):
      budget = ratio * source
      argmax = search.choose(logits, CANDS, 0.5)
      got = search.choose(logits, CANDS, 0.5, costs, budget)
      cost = lambda ch: sum(costs[CANDS.index(c)] for c in ch)  # noqa: E731
      want = brute_force_choice(logits, costs, budget, cap=3, ident=2)
      if cost(argmax) <= budget:
        assert got == argmax                  # the plain read-off when it fits
      elif want is not None:
        assert [CANDS.index(c) for c in got] == want, (trial, ratio)
        changed += 1
      assert search.read_off(logits, CANDS, 0.5, costs, budget) == search.format_chosen(got)
      # the layout it reads off costs what the FLOPs model gives the derived blocks
      np.testing.assert_allclose(search.layout_flops(cfg, [b for b, _ in search.chosen_blocks(got)], 16), cost(got),
                                 rtol=1e-9)
  assert changed > 20
  # nothing fits (an identity cap of 0 and a budget below one ffn per position): the cheapest allowed choice
  logits = np.zeros((4, 3))
  assert search.choose(logits, CANDS, 0.0, costs, 0.01 * source) == ["attention"] * 4 if costs[0] < costs[1] \
      else ["ffn"] * 4


def test_arrange_as_searched_takes_the_sublayers_each_position_started_from():
  from jaxformers.convert.native import rearrange
  src = models.build("classification", tiny_cfg(), num_labels=3, rngs=nnx.Rngs(params=3, dropout=4))
  want = dotted(src)
  chosen = ["identity", "identity", "attention", "ffn"]      # layer 1's attention and feed-forward only
  src_copy = models.build("classification", tiny_cfg(), num_labels=3, rngs=nnx.Rngs(params=3, dropout=4))
  arranged, layout = search.arrange_as_searched(src_copy, CANDS, chosen)
  assert layout == "serial"
  got = dotted(arranged)
  compared = 0
  for k in got:
    if k.startswith("encoder.blocks.0."):
      np.testing.assert_array_equal(got[k], want[k.replace("blocks.0.", "blocks.1.")], err_msg=k)
    else:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)     # embeddings, pooler, head
    compared += 1
  assert compared > 10
  # a re-arrangement by depth gives the one block layer 0's sublayers instead
  by_depth, _ = rearrange(src, layout="serial")
  for q in ("encoder.blocks.0.mixer.query.kernel", "encoder.blocks.0.mlp.up.kernel"):
    np.testing.assert_array_equal(dotted(by_depth)[q], want[q])
    assert not np.array_equal(got[q], want[q])
  with pytest.raises(ValueError, match="expected one of attention, ffn, identity for each of the 4 positions"):
    search.arrange_as_searched(models.build("classification", tiny_cfg(), num_labels=3, rngs=nnx.Rngs(0)), CANDS,
                               ["ffn"] * 3)


def test_the_search_reads_off_within_the_flops_target(tmp_path):
  """Two warm-up steps leave the logits at zero, so each position's most probable candidate is attention (ties go
  to the first): attention*4, 120% of the source's FLOPs (attention 8d^2 + 4Ld = 12288, ffn 4dF = 8192). Held to a 45% target, the read-off is two feed-forwards and
  two identities (40%), the only choice within the target and the identity cap."""
  out = run(load_config("tiny", "steps=2", search__target_flops_ratio=0.45, **SEARCH), tmp_path / "s")
  s = out["search"]
  assert s["argmax_layout"] == "attention*4" and s["argmax_flops_ratio"] == pytest.approx(4 * 12288 / 40960)
  assert s["layout"] == "ffn*2" and s["flops_ratio"] == pytest.approx(0.4) and s["within_target"]
  assert sorted(s["chosen"]) == ["ffn", "ffn", "identity", "identity"]
  from jaxformers.checkpoints.pretrained import from_pretrained
  assert from_pretrained(str(tmp_path / "s" / "derived")).config.layout == "ffn*2"


def test_a_search_with_a_teacher_distils_weights_and_architecture(tmp_path):
  """The run's distillation reaches both updates of the search: at the first step (before any update) the loss and
  the held-out architecture loss grow by exactly distill.logits x the soft-label KL, so doubling the weight
  doubles the increase."""
  teacher = tmp_path / "teacher"
  run(load_config("tiny", "steps=60", optim__lr=3e-3), teacher)   # confident enough to disagree
  base = dict(search__enabled=True, search__warmup_steps=0, search__heldout_batch_size=8, optim__warmup_steps=1,
              init_from=str(teacher), data__tokenizer=str(teacher))
  first = {}
  for w in (0.0, 1.0, 2.0):
    kd = dict(distill__teacher=str(teacher), distill__logits=w, distill__temperature=2.0) if w else {}
    wd = tmp_path / f"kd{w}"
    run(load_config("tiny", "steps=1", **base, **kd), wd)
    r = records(wd)[0]
    first[w] = (r["loss"], r["arch_loss"])
  for i in range(2):
    gain = first[1.0][i] - first[0.0][i]
    assert gain > 1e-3
    assert first[2.0][i] - first[0.0][i] == pytest.approx(2 * gain, rel=2e-4)
  c = load_config("tiny", None, **base, distill__teacher=str(teacher), distill__attention=1.0)
  with pytest.raises(ConfigError, match="distil a search with distill.logits and distill.hidden"):
    run(c, tmp_path / "bad")


def test_derived_model_has_exactly_the_chosen_candidates_weights():
  m = supernet(cands=CANDS + ("fourier",))
  # make every candidate distinct: random weights everywhere
  params = nnx.state(m, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(5), len(jax.tree.leaves(params))))
  nnx.update(m, jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), params))
  set_logits(m, [[0, 0, 0, 9], [0, 9, 0, 0], [9, 0, 0, 0], [0, 0, 9, 0]])   # fourier, ffn, attention, identity
  d, layout = search.derive(m)
  assert layout == "fourier,attention"
  ch = search.choices_of(m)
  db = models.encoder_of(d).blocks
  pairs = [(db[0].mixer_norm, ch[0].options["fourier"].mixer_norm), (db[0].mlp, ch[1].options["ffn"].mlp),
           (db[0].mlp_norm, ch[1].options["ffn"].mlp_norm), (db[1].mixer, ch[2].options["attention"].mixer),
           (db[1].mixer_norm, ch[2].options["attention"].mixer_norm),
           (models.encoder_of(d).embeddings, models.encoder_of(m).embeddings), (d.classifier, m.classifier)]
  for got, want in pairs:
    a, b = jax.tree.leaves(nnx.state(got, nnx.Param)), jax.tree.leaves(nnx.state(want, nnx.Param))
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # so the derived model computes what the supernet computes when its choices are one-hot
  set_logits(m, [[0, 0, 0, 1e4], [0, 1e4, 0, 0], [1e4, 0, 0, 0], [0, 0, 1e4, 0]])
  m.eval()
  d.eval()
  ids = jnp.asarray(np.random.default_rng(1).integers(1, 40, (2, 8)), jnp.int32)
  fwd = nnx.jit(lambda model, ids: model(ids, jnp.ones((2, 8))))
  np.testing.assert_allclose(np.asarray(fwd(m, ids)), np.asarray(fwd(d, ids)), atol=1e-6)


def test_candidates_start_from_the_source_sublayers():
  src = models.build("classification", tiny_cfg(layout="serial,fourier"), num_labels=3, rngs=nnx.Rngs(0))
  s_blocks = list(models.encoder_of(src).blocks)
  m = search.to_supernet(src, CANDS, rngs=nnx.Rngs(1))
  ch = search.choices_of(m)
  assert len(ch) == 4                       # serial: 2 positions, fourier: 2 positions

  def same(a, b):
    for x, y in zip(jax.tree.leaves(nnx.state(a, nnx.Param)), jax.tree.leaves(nnx.state(b, nnx.Param))):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  for p in (0, 1):      # both positions of the serial block take its attention and its feed-forward
    same(ch[p].options["attention"].mixer, s_blocks[0].mixer)
    same(ch[p].options["ffn"].mlp, s_blocks[0].mlp)
  for p in (2, 3):      # the fourier block's positions: its feed-forward; attention from the nearest (layer 0)
    same(ch[p].options["ffn"].mlp, s_blocks[1].mlp)
    same(ch[p].options["ffn"].mlp_norm, s_blocks[1].mlp_norm)
    same(ch[p].options["attention"].mixer, s_blocks[0].mixer)


@pytest.mark.parametrize("name", ["attention", "ffn", "fourier", "sparse"])
def test_candidate_flops_match_xla_cost_analysis(name):
  """The cost model's FLOPs/token against XLA's count of the candidate block's forward (which adds the softmax,
  LayerNorm and residual elementwise work: 2-7% here, measured) and a hand count. Fourier: the DFT matmuls
  (``fourier_impl='matmul'``); sparse: a query's keys are those of the layer's own mask (its band and the global
  token), and XLA's banded path computes 3 half-windows of keys, a few percent more than they (measured 5-8%)."""
  cfg = tiny_cfg(hidden_size=64, intermediate_size=256, max_position_embeddings=64, sparse_window=16,
                 fourier_impl="matmul")
  from jaxformers.blocks import Block
  from jaxformers.layers import Sequences
  from jaxformers.layers.sparse import sparse_mask_dense
  from jaxformers.layout import BLOCKS
  kind = {"fourier": "fourier_mixer", "sparse": "sparse_attention"}.get(name, name)
  block = Block(cfg, BLOCKS.get(kind), rngs=nnx.Rngs(0))
  block.eval()
  L = 64
  x = jnp.ones((1, L, 64))
  seq = Sequences.build(1, L, attention_mask=jnp.ones((1, L)))
  xla = jax.jit(lambda x: block(x, seq)).lower(x).compile().cost_analysis()["flops"] / L
  # hand count: matmul [1, d] x [d, e] is 2*d*e FLOPs; scores and weighted sum 2 * (2 * keys * d)
  d, f = 64, 256
  band = np.asarray(sparse_mask_dense(None, jnp.arange(L)[None], 16, (0,)))[0, 0]
  keys = int(band[L // 2].sum())             # an interior query: 17 band keys and the global token
  assert keys == 18
  hand = {"attention": 4 * 2 * d * d + 2 * (2 * L * d), "ffn": 2 * (2 * d * f),
          "fourier": 2 * d * (2 * d) + 2 * (2 * L * d),      # X [C_D S_D], then C_n (X C_D) - S_n (X S_D)
          "sparse": 4 * 2 * d * d + 2 * (2 * keys * d)}[name]
  assert search.candidate_flops(cfg, L, name) == hand
  assert hand <= xla <= 1.1 * hand, (hand, xla)


def test_expected_cost_and_source_cost_by_hand():
  cfg = tiny_cfg(hidden_size=32, intermediate_size=128, layout="serial*2,ffn")
  L, d, f = 20, 32, 128
  att, ffn = 8 * d * d + 4 * L * d, 4 * d * f
  assert search.source_flops(cfg, L) == 2 * (att + ffn) + ffn
  costs = search.cost_table(cfg, CANDS, L)
  logits = np.random.default_rng(0).normal(size=(5, 3))
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  want = float((p @ np.asarray([att, ffn, 0.0])).sum())
  got = float(jnp.sum(search.probabilities(logits) * costs))
  assert got == pytest.approx(want, rel=1e-6)


def test_heldout_split_is_disjoint_covers_the_training_set_and_has_the_configured_size(tmp_path):
  """The examples the logits learn on and those the weights learn on: together the training split, none in both,
  round(heldout_fraction * n) held out; the batches the search step gets come from each."""
  from collections import Counter
  from jaxformers.data.batching import TrainBatches
  from jaxformers.train.loop import Run
  c = load_config("tiny", "steps=8", search__enabled=True, search__heldout_fraction=0.3, search__heldout_batch_size=8)
  r = Run(c, tmp_path / "probe")
  full = r.task.inner.examples("train")
  train, held = r.task.examples("train"), r.task.examples("search_heldout")
  n = len(full)
  assert len(held) == round(0.3 * n) and len(train) == n - len(held) and n > 50
  rows = lambda ex: [(a, None if ex.text_b is None else ex.text_b[i], int(ex.label[i]))  # noqa: E731
                     for i, a in enumerate(ex.text_a)]
  assert Counter(rows(train)) + Counter(rows(held)) == Counter(rows(full))
  t_idx, h_idx = r.task._indices(n)
  assert not set(t_idx) & set(h_idx) and sorted(set(t_idx) | set(h_idx)) == list(range(n))
  assert rows(train) == rows(full.subset(t_idx)) and rows(held) == rows(full.subset(h_idx))
  # the batches: training rows from the training split, held-out rows from the held-out split
  tok = lambda split: {tuple(x) for x in r.tokenized(split).ids}  # noqa: E731
  t_ids, h_ids = tok("train"), tok("search_heldout")
  batches = r.task.train_batches(r.context,
                                 TrainBatches(r.tokenized("train"), 16, 0, r.max_length, r.special["pad"]))
  for _ in range(3):
    b = next(batches)
    for key, want in (("", t_ids), ("heldout/", h_ids)):
      for ids, mask in zip(b[key + "input_ids"], b[key + "attention_mask"]):
        if mask.sum():
          assert tuple(ids[mask > 0]) in want, key


def test_flops_penalty_value_and_direction_above_and_below_target():
  """The architecture's penalty against numpy: cost_weight * max(0, E[FLOPs] / source - target); above the target
  a gradient step on it lowers the expected cost (mass moves to cheaper candidates), below it is 0 with a zero
  gradient. The identity penalty likewise above and below max_identity."""
  from types import SimpleNamespace
  from jaxformers.train.search import search_penalties
  cfg = tiny_cfg(hidden_size=32, intermediate_size=128, layout="serial*2")
  L = 16
  costs = search.cost_table(cfg, CANDS, L)
  source = search.source_flops(cfg, L)
  s = SimpleNamespace(cost_weight=2.0, target_flops_ratio=0.5, identity_weight=3.0, max_identity=0.4)

  def numpy_pen(logits):
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ratio = float((p * costs).sum() / source)
    return 2.0 * max(0.0, ratio - 0.5) + 3.0 * max(0.0, p[:, 2].mean() - 0.4), ratio
  rng = np.random.default_rng(0)
  high = np.asarray([[2.0, 0.0, -2.0], [0.0, 2.0, -2.0]] * 2) + 0.1 * rng.normal(size=(4, 3))   # ~attention, ffn
  low = np.asarray([[-2.0, 0.5, 1.0]] * 4) + 0.1 * rng.normal(size=(4, 3))                     # mostly identity
  for logits in (high, low):
    pen, ratio, _ = search_penalties(jnp.asarray(logits, jnp.float32), jnp.asarray(costs, jnp.float32), source, s, 2)
    want, want_ratio = numpy_pen(logits)
    assert float(ratio) == pytest.approx(want_ratio, rel=1e-5)
    assert float(pen) == pytest.approx(want, rel=1e-5, abs=1e-7)
  f = lambda l: search_penalties(l, jnp.asarray(costs, jnp.float32), source, s, None)  # noqa: E731
  hi = jnp.asarray(high, jnp.float32)
  assert float(f(hi)[1]) > 0.8 and float(f(hi)[0]) == pytest.approx(2.0 * (float(f(hi)[1]) - 0.5), rel=1e-5)
  g = jax.grad(lambda l: f(l)[0])(hi)
  assert float(f(hi - 0.1 * g)[1]) < float(f(hi)[1])            # descending the penalty lowers the expected cost
  # numpy: d/dlogit_c of w * sum_p p_c cost_c / source is w * p_c (cost_c - E_p[cost]) / source
  p = np.exp(high - high.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = 2.0 * p * (costs[None] - (p * costs).sum(-1, keepdims=True)) / source
  np.testing.assert_allclose(np.asarray(g), want, rtol=1e-4, atol=1e-7)
  assert np.all(np.asarray(g)[:, 2] < 0)                         # identity, the free candidate, goes up
  lo = jnp.asarray(low, jnp.float32)
  assert float(f(lo)[1]) < 0.5 and float(f(lo)[0]) == 0.0
  assert np.all(np.asarray(jax.grad(lambda l: f(l)[0])(lo)) == 0)
  # the identity term alone: above max_identity it pushes P(identity) down
  only_id = SimpleNamespace(cost_weight=0.0, target_flops_ratio=0.5, identity_weight=3.0, max_identity=0.4)
  g = jax.grad(lambda l: search_penalties(l, jnp.asarray(costs), source, only_id, 2)[0])(lo)
  assert np.all(np.asarray(g)[:, 2] > 0)
  assert float(search_penalties(hi, jnp.asarray(costs), source, only_id, 2)[0]) == 0.0


@pytest.mark.parametrize("hard", [False, True])
def test_supernet_in_eval_mode_is_deterministic_and_the_softmax_weighted_candidates(hard):
  """Eval mode: no Gumbel noise, no temperature, no hard sample: each position's output is
  sum_c softmax(logits)_c * candidate_c(input), computed here candidate by candidate with a numpy softmax."""
  src = models.build("classification", tiny_cfg(hidden_dropout=0.1, attention_dropout=0.1), num_labels=3,
                     rngs=nnx.Rngs(params=0, dropout=1))
  m = search.to_supernet(src, CANDS + ("fourier",), hard=hard, rngs=nnx.Rngs(params=0, dropout=1))
  rng = np.random.default_rng(4)
  set_logits(m, rng.normal(size=(4, 4)))
  for ch in search.choices_of(m):
    ch.tau[...] = jnp.float32(0.3)          # a training temperature left in the state changes nothing in eval
  m.eval()
  ids = jnp.asarray(rng.integers(1, 40, (2, 8)), jnp.int32)
  mask = jnp.asarray([[1] * 8, [1] * 5 + [0] * 3])
  fwd = nnx.jit(lambda model, ids: model.encoder(ids, mask, output_hidden_states=True).hidden_states)
  h = fwd(m, ids)
  again = fwd(m, ids)
  for a, b in zip(h, again):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  from jaxformers.layers import Sequences
  seq = Sequences.build(2, 8, attention_mask=mask)
  for p, ch in enumerate(search.choices_of(m)):
    z = np.asarray(ch.logits[...], np.float64)
    w = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    x = h[p]
    want = sum(w[k] * np.asarray(x if c == "identity" else ch.options[c](x, seq), np.float64)
               for k, c in enumerate(ch.candidates))
    np.testing.assert_allclose(np.asarray(h[p + 1]), want, atol=2e-6, rtol=1e-5, err_msg=f"position {p}")


# --- config errors ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key,value,needle", [
    ("candidates", "attention,ffn,convolution", "unknown candidate 'convolution'; accepted: attention, fourier, sparse, ffn, identity"),
    ("candidates", "", "search space is empty"),
    ("candidates", " , ", "search space is empty"),
    ("candidates", "ffn", "at least two candidates"),
    ("target_flops_ratio", 0.0, "target_flops_ratio=0.0: must be in (0, 1]"),
    ("target_flops_ratio", 1.5, "target_flops_ratio=1.5: must be in (0, 1]"),
    ("max_identity", 1.0, "max_identity=1.0"),
    ("read_off", "best", "read_off='best': expected one of target, argmax"),
])
def test_bad_search_config_errors_clearly(tmp_path, key, value, needle):
  c = load_config("tiny", None, search__enabled=True, **{f"search__{key}": value})
  with pytest.raises(ConfigError) as e:
    run(c, tmp_path / "bad")
  assert "config.search." in str(e.value) and needle in str(e.value), str(e.value)
  assert not (tmp_path / "bad").exists()


def test_pre_ln_source_layout_is_refused(tmp_path):
  c = load_config("tiny", "layout=serial_preln*2", search__enabled=True)
  with pytest.raises(ConfigError, match=r"config.model.layout='serial_preln\*2'.*pre-LN"):
    run(c, tmp_path / "bad")


# --- the search as a trainer task --------------------------------------------------------------------------------

def test_search_run_writes_layout_probabilities_heatmap_and_derived_model(searched):
  wd, out = searched
  s = out["search"]
  probs = np.asarray(s["probabilities"])
  assert probs.shape == (4, 3)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  recs = records(wd)
  assert [r["step"] for r in recs] == list(range(1, 9))
  first = np.asarray([[recs[0][f"arch/p{p}/{c}"] for c in CANDS] for p in range(4)])
  np.testing.assert_allclose(first, 1 / 3, rtol=1e-6)          # warm-up: the logits have not moved (zeros)
  assert recs[1]["arch/p0/attention"] == recs[0]["arch/p0/attention"]
  last = np.asarray([[recs[-1][f"arch/p{p}/{c}"] for c in CANDS] for p in range(4)])
  np.testing.assert_allclose(last, probs, rtol=1e-5)
  assert np.abs(last - 1 / 3).max() > 1e-3                     # after the warm-up they have
  # the step's expected-cost metric equals the numpy expectation of the final probabilities
  assert recs[-1]["expected_flops_ratio"] == pytest.approx(s["expected_flops_ratio"], rel=1e-5)
  cfg = tiny_cfg(hidden_size=32, num_heads=2, intermediate_size=64)
  budget = 0.65 * search.source_flops(cfg, 32)
  assert s["chosen"] == search.choose(np.log(probs), CANDS, 0.5, search.cost_table(cfg, CANDS, 32), budget)
  assert s["layout"] == search.format_chosen(s["chosen"])
  assert s["argmax_layout"] == search.read_off(np.log(probs), CANDS, 0.5)
  assert s["read_off"] == "target" and s["target_flops_ratio"] == 0.65 and s["source"] == ""
  assert s["within_target"] == (s["flops_ratio"] <= 0.65 + 1e-9)
  assert (wd / "search_heatmap.png").stat().st_size > 1000
  assert json.loads((wd / "summary.json").read_text())["search"]["layout"] == s["layout"]
  # the derived checkpoint holds the read-off layout with the final supernet's chosen candidates' weights
  from jaxformers.checkpoints.pretrained import from_pretrained
  d = from_pretrained(str(wd / "derived"))
  assert d.config.layout == s["layout"]
  sup = checkpoint_params(wd, 8)
  plan = search.chosen_blocks(s["chosen"])
  compared = 0
  for j, (_, ps) in enumerate(plan):
    got = dotted(models.encoder_of(d).blocks[j])
    for p in ps:
      prefix = f"encoder.blocks.{p}.options.{s['chosen'][p]}."
      for key, want in sup.items():
        if key.startswith(prefix):
          np.testing.assert_array_equal(got[key[len(prefix):]], want, err_msg=key)
          compared += 1
  assert compared >= 4 * len(plan)
  # then_train trained the derived model (its layout, no search) for then_train_steps
  t = s["derived_train"]
  assert t["workdir"] == str(wd / "derived_train") and "validation/accuracy" in t["eval"]
  trained = json.loads((wd / "derived_train" / "summary.json").read_text())
  assert trained["steps"] == 2 and "search" not in trained
  assert sorted(checkpoint_params(wd / "derived_train", 2)) == sorted(dotted(d))
  # the printed "train it" command is complete: its config file holds what then_train ran
  assert s["train_command"] == (f"python train.py --config {wd / 'derived_config.py'} "
                                f"--workdir {wd / 'derived_train'}") and "CONFIG" not in s["train_command"]
  from jaxformers.train.cli import _load_config_file
  from jaxformers.train.search import derived_config
  c = _load_config_file(str(wd / "derived_config.py"))
  assert c.init_from == str(wd / "derived") and not c.search.enabled and c.model.layout == ""
  assert c.train.num_steps == 2 and c.train.num_epochs == 0.0
  want = derived_config(load_config("tiny", "steps=8", search__then_train=True, search__then_train_steps=2, **SEARCH),
                        wd)
  assert c.to_dict() == want.to_dict()


def dotted(module) -> dict:
  return dotted_state(nnx.state(module, nnx.Param))


def dotted_state(state) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  return {".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path if getattr(k, "name", None) != "value"):
          np.asarray(v) for path, v in flat}


def test_only_the_arch_optimizer_moves_the_logits_and_only_on_heldout_data(tmp_path):
  """One jitted search step, fed the same training batch with two held-out batches and vice versa: the new
  weights depend only on the training batch, the new logits only on the held-out batch; gradients reach the
  logits (they move), and during the warm-up they stay exactly where they are."""
  from jaxformers.data.batching import TrainBatches
  from jaxformers.train.loop import Run
  c = load_config("tiny", "steps=8", search__enabled=True, search__warmup_steps=1, search__heldout_batch_size=8)
  r = Run(c, tmp_path / "probe")
  tx, lr = r.task.optimizer(c, 8)
  params, rest = r.init_params()
  state = {"params": params, "opt_state": tx.init(params), "rngs": rest, "step": jnp.asarray(0, jnp.int32)}
  step = jax.jit(r.task.make_train_step(r.gd_train, tx, lr, 1, r.max_segments))
  batches = r.task.train_batches(r.context,
                                 TrainBatches(r.tokenized("train"), 16, 0, r.max_length, r.special["pad"]))
  b1, b2 = next(batches), next(batches)
  mixed = {k: (b2[k] if k.startswith("heldout/") else v) for k, v in b1.items()}   # b1's train, b2's held-out
  other = {k: (v if k.startswith("heldout/") else b2[k]) for k, v in b1.items()}   # b2's train, b1's held-out
  split = lambda st: nnx.split_state(st["params"], search.ArchParam, ...)  # noqa: E731
  flat = lambda t: [np.asarray(x) for x in jax.tree.leaves(t)]  # noqa: E731
  # warm-up step: weights move, logits exactly unchanged
  s0, _ = step(jax.tree.map(jnp.copy, state), b1, {})
  a0, w0 = split(s0)
  assert all(np.array_equal(x, 0 * x) for x in flat(a0))
  assert any(not np.array_equal(x, y) for x, y in zip(flat(w0), flat(split(state)[1])))
  after = dict(state, step=jnp.asarray(1, jnp.int32))
  n1, m1 = step(jax.tree.map(jnp.copy, after), b1, {})
  n2, _ = step(jax.tree.map(jnp.copy, after), mixed, {})
  n3, _ = step(jax.tree.map(jnp.copy, after), other, {})
  (a1, w1), (a2, w2), (a3, w3) = split(n1), split(n2), split(n3)
  assert all(np.array_equal(x, y) for x, y in zip(flat(w1), flat(w2)))          # held-out batch: weights untouched
  assert any(not np.array_equal(x, y) for x, y in zip(flat(a1), flat(a2)))      # ... but logits differ
  assert all(np.array_equal(x, y) for x, y in zip(flat(a1), flat(a3)))          # training batch: logits untouched
  assert any(not np.array_equal(x, y) for x, y in zip(flat(w1), flat(w3)))
  assert any(np.abs(x).max() > 0 for x in flat(a1))                              # gradients reached the logits
  assert np.isfinite(float(m1["arch_loss"])) and float(m1["arch_loss"]) > 0


def test_resume_mid_search_is_bit_identical(searched, tmp_path):
  full, out = searched
  part = tmp_path / "part"
  o = run(load_config("tiny", "steps=8", train__stop_after=3, **SEARCH), part)
  assert o["steps"] == 3 and "search" not in o
  o = run(load_config("tiny", "steps=8", **SEARCH), part)
  assert o["steps_this_run"] == 5
  assert_same_runs(full, part, 8)
  # so the read-off is the same too (a fixed seed gives the same layout twice)
  assert o["search"]["layout"] == out["search"]["layout"]
  assert o["search"]["probabilities"] == out["search"]["probabilities"]
  ra, rb = records(full), records(part)
  for k in ra[-1]:
    if k.startswith("arch/"):
      assert ra[-1][k] == rb[-1][k], k


SCRIPT = r"""
import sys
import jax
assert jax.device_count() == 4, jax.devices()
sys.path.insert(0, {root!r})
import numpy as np
from tests.train_helpers import checkpoint_params, load_config
from jaxformers.train import run
s = run(load_config("tiny", "steps=8", **{kw!r}), {wd!r})
assert s["mesh"] == {{"data": 4, "fsdp": 1}}, s["mesh"]
np.savez({wd!r} + "/params.npz", **checkpoint_params({wd!r}, 8))
"""


@pytest.mark.slow
def test_one_device_vs_four_devices(searched, tmp_path):
  one, out = searched
  wd = str(tmp_path / "four")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-c", SCRIPT.format(root=str(ROOT), kw=SEARCH, wd=wd)], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  ra, rb = records(one), records(wd)
  for a, b in zip(ra, rb):
    assert ("arch_loss" in a) == ("arch_loss" in b) == (a["step"] > 2)    # warm-up: no architecture steps
    keys = ("loss", "expected_flops_ratio", "arch/p0/attention", "arch/p3/identity")
    for k in keys + (("arch_loss",) if "arch_loss" in a else ()):
      assert b[k] == pytest.approx(a[k], rel=2e-5, abs=1e-6), (a["step"], k)
  four = np.load(wd + "/params.npz")
  ref = checkpoint_params(one, 8)
  assert set(four.files) == set(ref)
  for k in ref:
    np.testing.assert_allclose(four[k], ref[k], atol=2e-6, rtol=1e-5, err_msg=k)
  assert json.loads((tmp_path / "four" / "summary.json").read_text())["search"]["layout"] == out["search"]["layout"]


def test_search_from_a_converted_bert_starts_each_candidate_from_its_source_sublayer(tmp_path):
  """init_from an HF BERT: at both positions of layer i the attention candidate is layer i's attention and the
  ffn candidate layer i's feed-forward, as from_pretrained converts them."""
  import jaxformers
  from jaxformers.train.loop import Run
  from tests.conftest import make_hf
  from tests.test_train_glue import glue_tiny, write_rte
  from tests.test_train_pretrained import _tokenizer_for
  data = write_rte(tmp_path / "RTE")
  hf = tmp_path / "bert"
  make_hf(hf, "BertForSequenceClassification", num_labels=2)
  _tokenizer_for(data, hf)
  c = glue_tiny("rte", data, init_from=str(hf), model__layout="", model__hidden_size=None, model__num_heads=None,
                model__intermediate_size=None, model__max_position_embeddings=None, search__enabled=True)
  r = Run(c, tmp_path / "run")
  params, _ = r.init_params()
  got = dotted_state(params)
  src = jaxformers.from_pretrained(str(hf), task="classification", num_labels=2)
  want = dotted(src)
  assert r.cfg.layout == "serial*3" and len(search.positions_of(r.cfg.blocks)) == 6
  n = 0
  for p in range(6):
    i = p // 2
    for cand, subs in (("attention", ("mixer", "mixer_norm")), ("ffn", ("mlp", "mlp_norm"))):
      for k, v in want.items():
        for sub in subs:
          if k.startswith(f"encoder.blocks.{i}.{sub}."):
            rest = k[len(f"encoder.blocks.{i}."):]
            np.testing.assert_array_equal(got[f"encoder.blocks.{p}.options.{cand}.{rest}"], v, err_msg=k)
            n += 1
  assert n == 6 * 16     # q, k, v, out kernels and biases, 2 norms x 2; up, down x 2, norm x 2
  # both positions of a layer start from its weights, in buffers of their own (the train step donates them)
  leaves = jax.tree.leaves(params)
  assert len({x.unsafe_buffer_pointer() for x in leaves}) == len(leaves)
  np.testing.assert_array_equal(got["encoder.embeddings.word.embedding"], want["encoder.embeddings.word.embedding"])


def test_a_finished_search_rerun_with_then_train_says_summary_json_gains_the_derived_training(tmp_path, capsys):
  """Such a rerun trains the derived model and adds search.derived_train to summary.json; it used to say the file
  'is kept as it was'. A further rerun has nothing to add and keeps the file byte for byte."""
  from jaxformers.train.cli import main
  wd = tmp_path / "search"
  kw = dict(SEARCH, search__then_train_steps=1)
  run(load_config("tiny", "steps=4", **kw), wd)
  before = json.loads((wd / "summary.json").read_text())
  assert "derived_train" not in before["search"]
  capsys.readouterr()
  assert main(load_config("tiny", "steps=4", search__then_train=True, **kw), str(wd)) == 0
  err = capsys.readouterr().err
  assert f"the run in {wd} is already finished; summary.json gains search.derived_train (what this run added), the " \
         f"rest is kept as it was." in err and "its summary.json is kept as it was" not in err
  after = json.loads((wd / "summary.json").read_text())
  assert after["search"].pop("derived_train")["workdir"] == str(wd / "derived_train")
  assert after == before and (wd / "derived_train" / "summary.json").is_file()
  text = (wd / "summary.json").read_text()
  assert main(load_config("tiny", "steps=4", search__then_train=True, **kw), str(wd)) == 0
  assert "its summary.json is kept as it was" in capsys.readouterr().err
  assert (wd / "summary.json").read_text() == text


def test_a_search_workdir_given_as_a_model_points_to_its_derived_model(tmp_path, capsys):
  """export / quantize / prune / from_pretrained of a search's workdir used to report parameters that 'do not fit'
  (the states hold the supernet): they now name DIR/derived."""
  import jaxformers
  from jaxformers.cli import main
  from jaxformers.errors import CheckpointError
  wd = tmp_path / "search"
  run(load_config("tiny", "steps=2", train__stop_after=1, **SEARCH), wd)      # unfinished: no derived model yet
  msg = f"{wd}: an architecture search's run, whose states hold the supernet, not a model: use its derived model, " \
        f"{wd / 'derived'}"
  with pytest.raises(CheckpointError, match=f"^{msg} \\(written when the search finishes\\)$".replace(".", r"\.")):
    jaxformers.from_pretrained(wd)
  run(load_config("tiny", "steps=2", **SEARCH), wd)
  for where in (wd, wd / "checkpoints", wd / "checkpoints" / "2"):
    with pytest.raises(CheckpointError, match=f"^{msg}$".replace(".", r"\.")):
      jaxformers.from_pretrained(where)
  for cmd in (["export", str(wd), str(tmp_path / "hf")], ["quantize", str(wd), str(tmp_path / "q")],
              ["prune", str(wd), str(tmp_path / "p"), "--heads", "0.5"]):
    assert main(cmd) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"jaxformers {cmd[0]}: error: {msg}"], err
  assert jaxformers.from_pretrained(wd / "derived").config.layout == json.loads(
      (wd / "summary.json").read_text())["search"]["layout"]
