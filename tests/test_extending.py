"""The extension points docs/code.md's "Extending jaxformers" names: a new token mixer with a hyper-parameter, its
:class:`~jaxformers.mixers.MixerSpec` and its block types, all registered in this file (nothing inside the
package changes), work in layouts, models and the trainer, as an architecture-search candidate, under pruning and
in the FLOPs model."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxformers
from jaxformers import flops, models, prune, search
from jaxformers.config import EncoderConfig
from jaxformers.layers.common import Sequences, linear
from jaxformers.layout import BLOCKS, BlockSpec
from jaxformers.mixers import MixerSpec, register_mixer, unregister_mixer
from jaxformers.train import ConfigError, run
from jaxformers.train.search import check_search
from tests.conftest import padded_batch
from tests.test_flops import counts
from tests.train_helpers import load_config, records


class MeanMixing(nnx.Module):
  """Each token gets a projection of ``mean_scale`` times the mean of its own sequence's tokens."""

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.proj = linear(cfg, cfg.hidden_size, cfg.hidden_size, ("embed", "mlp"), rngs=rngs)
    self.scale = cfg.mean_scale

  def __call__(self, x_BLD, seq: Sequences):
    if seq.segment_ids is None:
      return self.proj(self.scale * jnp.broadcast_to(x_BLD.mean(axis=1, keepdims=True), x_BLD.shape))
    same_BLL = (seq.segment_ids[:, :, None] == seq.segment_ids[:, None, :]) & (seq.segment_ids[:, None, :] != 0)
    mean_BLD = jnp.einsum("bqk,bkd->bqd", same_BLL.astype(x_BLD.dtype), x_BLD) / jnp.maximum(
        same_BLL.sum(-1, keepdims=True), 1)
    return self.proj(self.scale * mean_BLD)


def mean_flops(cfg: EncoderConfig, length: int, heads) -> float:
  """The projection ``2 d^2`` and, on rows with segment ids (padded or packed), the mean as a ``[L, L] x [L, d]``
  matmul, ``2 L d`` per token."""
  d = cfg.hidden_size
  return 2.0 * d * d + 2.0 * length * d


MEAN = MixerSpec("mean_test", MeanMixing, mean_flops, packing=True, search=True, prune="keep",
                 options={"mean_scale": 1.0}, doc="a projection of the sequence mean")


@pytest.fixture
def mean_block():
  register_mixer(MEAN)
  BLOCKS.register("mean_test")(BlockSpec("mean_test", True, doc="mean over the sequence, then FFN"))
  BLOCKS.register("mean_test_mixer")(BlockSpec("mean_test", False, doc="mean over the sequence alone"))
  yield "mean_test"
  unregister_mixer("mean_test")
  BLOCKS.unregister("mean_test")
  BLOCKS.unregister("mean_test_mixer")


def small_cfg(layout: str, **kw) -> EncoderConfig:
  return EncoderConfig(vocab_size=50, hidden_size=16, num_heads=2, intermediate_size=32, max_position_embeddings=16,
                       layout=layout, hidden_dropout=0.0, attention_dropout=0.0, **kw)


def test_a_registered_block_runs_in_a_layout(mean_block):
  cfg = small_cfg("mean_test,serial")
  model = models.Encoder(cfg, rngs=nnx.Rngs(0))
  assert type(model.blocks[0].mixer) is MeanMixing
  ids, mask = padded_batch(50, (9, 5))
  batch = model(ids, mask).last_hidden_state
  alone = model(ids[1:, :5], mask[1:, :5]).last_hidden_state
  np.testing.assert_allclose(np.asarray(batch[1, :5]), np.asarray(alone[0]), atol=2e-5)


def test_the_mixers_option_is_a_config_value(mean_block):
  """``mean_scale`` defaults to the spec's 1.0, is set like a field, survives ``to_dict`` / ``from_dict`` and reaches
  the module; a wrong type or an unknown option is refused naming the value and what is accepted."""
  cfg = small_cfg("mean_test")
  assert cfg.mean_scale == 1.0 and cfg.to_dict()["mean_scale"] == 1.0
  half = cfg.replace(mean_scale=0.5)
  assert EncoderConfig.from_dict(half.to_dict()) == half and half.mean_scale == 0.5
  assert models.Encoder(half, rngs=nnx.Rngs(0)).blocks[0].mixer.scale == 0.5
  with pytest.raises(ValueError, match=r"^EncoderConfig.mean_scale='x': expected a float \(option of token mixer "
                                       r"'mean_test'\)$"):
    cfg.replace(mean_scale="x")
  with pytest.raises(ValueError, match=r"unknown EncoderConfig keys 'mean_scal' \(did you mean mean_scale\?\)"):
    EncoderConfig.from_dict({**cfg.to_dict(), "mean_scal": 2.0})


def test_a_registered_block_trains_with_its_option_on_packed_rows(mean_block, tmp_path):
  """The real trainer, packed batches (the spec says the mixer honours segment ids), ``config.model.mean_scale``."""
  out = run(load_config("tiny", "steps=3,layout=mean_test*1,serial*1", model__mean_scale=0.5, data__packing=True),
            tmp_path / "run")
  assert out["steps"] == 3 and np.isfinite(out["eval"]["validation/loss"])
  assert all(np.isfinite(r["loss"]) for r in records(tmp_path / "run"))
  saved = jaxformers.from_pretrained(tmp_path / "run").config
  assert saved.mean_scale == 0.5 and saved.blocks == ("mean_test", "serial")


def test_the_mixer_is_a_search_candidate(mean_block, tmp_path):
  """Named in ``search.candidates`` it is in the supernet's every position, costs its spec's FLOPs, and a position
  that picks it followed by ``ffn`` reads off as its serial block; a 3-step search runs with it."""
  cfg = small_cfg("serial*2")
  cands = ("attention", "mean_test", "ffn", "identity")
  assert "mean_test" in search.candidate_names()
  costs = search.cost_table(cfg, cands, 16)
  np.testing.assert_array_equal(costs, [flops.mixer_flops(cfg, "attention", 16), 2 * 16 * 16 + 2 * 16 * 16,
                                        4 * 16 * 32, 0.0])
  model = models.build("classification", cfg, num_labels=2, rngs=nnx.Rngs(0))
  sup = search.to_supernet(model, cands, rngs=nnx.Rngs(0))
  assert all(type(ch.options["mean_test"].mixer) is MeanMixing for ch in search.choices_of(sup))
  logits = np.eye(4)[[1, 2, 0, 3]] * 5.0      # mean_test, ffn, attention, identity
  assert search.read_off(logits, cands) == "mean_test,attention"
  for ch, row in zip(search.choices_of(sup), logits):
    ch.logits[...] = jnp.asarray(row, jnp.float32)
  derived, layout = search.derive(sup)
  assert layout == "mean_test,attention"
  np.testing.assert_array_equal(np.asarray(models.encoder_of(derived).blocks[0].mixer.proj.kernel[...]),
                                np.asarray(search.choices_of(sup)[0].options["mean_test"].mixer.proj.kernel[...]))
  out = run(load_config("tiny", "steps=3", search__enabled=True, search__warmup_steps=1,
                        search__heldout_batch_size=8, search__candidates=",".join(cands)), tmp_path / "search")
  s = out["search"]
  assert s["candidates"] == list(cands) and np.asarray(s["probabilities"]).shape == (4, 4)
  assert "arch/p0/mean_test" in records(tmp_path / "search")[-1]
  found = jaxformers.from_pretrained(tmp_path / "search" / "derived").config
  assert s["flops_per_token"] == flops.model_flops(found, 32)


def test_a_mixer_that_is_no_candidate_is_refused_by_the_search(mean_block):
  register_mixer(MixerSpec("mean_fixed", MeanMixing, mean_flops, search=False))
  try:
    c = load_config("tiny", search__enabled=True, search__candidates="attention,mean_fixed,ffn")
    with pytest.raises(ConfigError, match=r"^config.search.candidates: token mixer 'mean_fixed' is not an "
                                          r"architecture-search candidate \(its MixerSpec has search=False\); "
                                          r"accepted: attention, fourier, mean_test, sparse, ffn, identity$"):
      check_search(c)
  finally:
    unregister_mixer("mean_fixed")


def test_prune_keeps_the_mixer_and_cuts_its_feed_forward(mean_block):
  """``prune="keep"``: heads of the attention block and neurons of both blocks go; the mean mixer stays whole, and
  ``flops=`` counts it as FLOPs pruning cannot remove."""
  cfg = small_cfg("mean_test,serial")
  model = models.build("classification", cfg, num_labels=2, rngs=nnx.Rngs(0))
  ids, mask = padded_batch(50, (9, 5))
  batches = [{"input_ids": ids, "attention_mask": mask}]
  small, scores = prune.prune_to(model, batches, heads=0.5, ffn=0.5)
  assert sorted(scores.heads) == [1] and sorted(scores.ffn) == [0, 1]
  assert small.config.layout == "mean_test,serial" and small.config.intermediate_sizes == (16, 16)
  np.testing.assert_array_equal(np.asarray(models.encoder_of(small).blocks[0].mixer.proj.kernel[...]),
                                np.asarray(models.encoder_of(model).blocks[0].mixer.proj.kernel[...]))
  length = ids.shape[1]
  fixed = mean_flops(cfg, length, None)
  total = flops.model_flops(cfg, length)
  assert prune.flops_fractions(0.8, model, length) == pytest.approx((0.2 * total / (total - fixed),) * 2)


def test_prune_refuses_a_mixer_whose_spec_says_so(mean_block):
  register_mixer(MixerSpec("mean_frozen", MeanMixing, mean_flops, prune="refuse",
                           prune_refusal="its projection mixes every feature; prune the other blocks' by hand"))
  BLOCKS.register("mean_frozen")(BlockSpec("mean_frozen", True))
  try:
    model = models.build("classification", small_cfg("mean_frozen,serial"), num_labels=2, rngs=nnx.Rngs(0))
    msg = (r"^block 0 \(mean_frozen\): token mixer 'mean_frozen' cannot be pruned: its projection mixes every "
           r"feature; prune the other blocks' by hand$")
    for call in (lambda: prune.prune_to(model, [], ffn=0.5), lambda: prune.prune(model, {}, {1: np.arange(8)}),
                 lambda: prune.flops_fractions(0.5, model, 16)):
      with pytest.raises(prune.PruneError, match=msg):
        call()
  finally:
    unregister_mixer("mean_frozen")
    BLOCKS.unregister("mean_frozen")


def test_the_flops_model_counts_the_mixer(mean_block):
  """The encoder's FLOPs per token from the spec's formula equal the matmuls of its compiled forward."""
  cfg = small_cfg("mean_test,serial", use_pooler=False)
  model = models.Encoder(cfg, rngs=nnx.Rngs(0))
  graph, state = nnx.split(model)
  ids = jnp.ones((2, 16), jnp.int32)
  mm, xla = counts(lambda s: nnx.merge(graph, s)(ids, jnp.ones_like(ids)).last_hidden_state, state)
  d, f, L = 16, 32, 16
  hand = (2 * d * d + 2 * L * d + 4 * d * f) + ((8 * d + 4 * L) * d + 4 * d * f)
  assert flops.model_flops(cfg, L) == hand == mm / (2 * L)
  assert hand < xla / (2 * L)


def test_hf_export_refuses_the_mixer_by_its_spec(mean_block, tmp_path):
  model = models.build("classification", small_cfg("mean_test*2"), num_labels=2, rngs=nnx.Rngs(0))
  with pytest.raises(jaxformers.CheckpointError, match=r"this layout has mean_test blocks"):
    jaxformers.export_hf(model, tmp_path / "hf")


def test_an_unregistered_mixer_is_named():
  BLOCKS.register("orphan_test")(BlockSpec("no_such_mixer", True))
  try:
    cfg = EncoderConfig(vocab_size=50, hidden_size=16, num_heads=2, intermediate_size=32,
                        max_position_embeddings=16, layout="orphan_test")
    with pytest.raises(KeyError, match=r"unknown token mixer 'no_such_mixer'; known: attention, fourier, sparse"):
      models.Encoder(cfg, rngs=nnx.Rngs(0))
  finally:
    BLOCKS.unregister("orphan_test")
