"""Dropout masks: the rate, independence between elements and keys, reproducibility, and both impls in models."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformers import EncoderConfig, models
from jaxformers.dropout import dropout, keep_mask

SHAPE = (16, 128, 96)   # 196,608 draws: the binomial standard deviation of a fraction is below 0.001


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_hash_masks_keep_the_right_fraction_independently(rate):
  keep = 1.0 - rate
  m = np.asarray(keep_mask(jax.random.key(0), rate, SHAPE))
  tol = 5 * np.sqrt(keep * (1 - keep) / m.size)
  assert abs(m.mean() - keep) < tol
  # neighbours along every axis, and the same element under another key, are independent draws
  for pair in ((m[..., 1:], m[..., :-1]), (m[:, 1:], m[:, :-1]), (m[1:], m[:-1]),
               (m, np.asarray(keep_mask(jax.random.key(1), rate, SHAPE)))):
    assert abs((pair[0] & pair[1]).mean() - keep**2) < 2 * tol
  # no structure along an axis: each position of the last axis keeps about the same fraction
  per_column = m.reshape(-1, SHAPE[-1]).mean(0)
  assert np.abs(per_column - keep).max() < 6 * np.sqrt(keep * (1 - keep) / (m.size / SHAPE[-1]))


def test_hash_masks_are_a_function_of_the_key():
  k = jax.random.key(7)
  np.testing.assert_array_equal(keep_mask(k, 0.3, (5, 9)), keep_mask(k, 0.3, (5, 9)))
  assert not np.array_equal(keep_mask(k, 0.3, (5, 9)), keep_mask(jax.random.fold_in(k, 1), 0.3, (5, 9)))


def test_dropout_scales_kept_values_and_threefry_is_jax_random():
  x = jnp.ones((4, 1000))
  k = jax.random.key(3)
  for impl in ("hash", "threefry"):
    y = np.asarray(dropout(x, 0.2, k, impl))
    assert set(np.unique(y)) <= {0.0, np.float32(1 / 0.8)}
  np.testing.assert_array_equal(np.asarray(dropout(x, 0.2, k, "threefry")) != 0,
                                np.asarray(jax.random.bernoulli(k, 0.8, x.shape)))
  with pytest.raises(ValueError, match="dropout impl 'philox': expected one of hash, threefry"):
    dropout(x, 0.2, k, "philox")


@pytest.mark.parametrize("impl", ["hash", "threefry"])
def test_models_use_the_configured_dropout_in_train_mode_only(impl):
  cfg = EncoderConfig(vocab_size=64, hidden_size=32, num_heads=4, intermediate_size=48, max_position_embeddings=32,
                      layout="serial*2", dropout_impl=impl)
  model = models.SequenceClassifier(cfg, num_labels=3, rngs=nnx.Rngs(0, dropout=1))
  ids = np.ones((2, 6), np.int32)
  assert np.abs(np.asarray(model(ids)) - np.asarray(model(ids))).max() > 0
  model.eval()
  np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(model(ids)))
  with pytest.raises(ValueError, match="dropout_impl='fast': expected one of hash, threefry"):
    EncoderConfig(dropout_impl="fast")
