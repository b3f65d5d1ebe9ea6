"""The extension points docs/code.md's "Extending jaxformers" names: a new token mixer and block type, registered
from outside the package, work in layouts, models and the trainer without any other change."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformers import models
from jaxformers.config import EncoderConfig
from jaxformers.layers.common import MIXERS, Sequences, linear
from jaxformers.layout import BLOCKS, BlockSpec
from jaxformers.train import run
from tests.conftest import padded_batch
from tests.train_helpers import load_config


class MeanMixing(nnx.Module):
  """Each token gets a projection of the mean of its own sequence's tokens."""

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.proj = linear(cfg, cfg.hidden_size, cfg.hidden_size, ("embed", "mlp"), rngs=rngs)

  def __call__(self, x_BLD, seq: Sequences):
    if seq.segment_ids is None:
      return self.proj(jnp.broadcast_to(x_BLD.mean(axis=1, keepdims=True), x_BLD.shape))
    same_BLL = (seq.segment_ids[:, :, None] == seq.segment_ids[:, None, :]) & (seq.segment_ids[:, None, :] != 0)
    mean_BLD = jnp.einsum("bqk,bkd->bqd", same_BLL.astype(x_BLD.dtype), x_BLD) / jnp.maximum(
        same_BLL.sum(-1, keepdims=True), 1)
    return self.proj(mean_BLD)


@pytest.fixture
def mean_block():
  MIXERS.register("mean_test")(MeanMixing)
  BLOCKS.register("mean_test")(BlockSpec("mean_test", True, doc="mean over the sequence, then FFN"))
  yield "mean_test"
  MIXERS._items.pop("mean_test")
  BLOCKS._items.pop("mean_test")


def test_a_registered_block_runs_in_a_layout(mean_block):
  cfg = EncoderConfig(vocab_size=50, hidden_size=16, num_heads=2, intermediate_size=32, max_position_embeddings=16,
                      layout="mean_test,serial", hidden_dropout=0.0, attention_dropout=0.0)
  model = models.Encoder(cfg, rngs=nnx.Rngs(0))
  assert type(model.blocks[0].mixer) is MeanMixing
  ids, mask = padded_batch(50, (9, 5))
  batch = model(ids, mask).last_hidden_state
  alone = model(ids[1:, :5], mask[1:, :5]).last_hidden_state
  np.testing.assert_allclose(np.asarray(batch[1, :5]), np.asarray(alone[0]), atol=2e-5)


def test_a_registered_block_trains(mean_block, tmp_path):
  out = run(load_config("tiny", "steps=2,layout=mean_test*1,serial*1"), tmp_path / "run")
  assert out["steps"] == 2 and np.isfinite(out["eval"]["validation/loss"])


def test_an_unregistered_mixer_is_named():
  BLOCKS.register("orphan_test")(BlockSpec("no_such_mixer", True))
  try:
    cfg = EncoderConfig(vocab_size=50, hidden_size=16, num_heads=2, intermediate_size=32,
                        max_position_embeddings=16, layout="orphan_test")
    with pytest.raises(KeyError, match=r"unknown token mixer 'no_such_mixer'; known: attention, fourier, sparse"):
      models.Encoder(cfg, rngs=nnx.Rngs(0))
  finally:
    BLOCKS._items.pop("orphan_test")
