"""Token, position and (unless ``type_vocab_size`` is 0) token-type embeddings, then LayerNorm and dropout."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformers.config import EncoderConfig
from jaxformers.dropout import Dropout
from jaxformers.layers.common import Sequences, embed, layer_norm


def position_ids(cfg: EncoderConfig, seq: Sequences, attention_mask=None) -> jax.Array:
  """Position ids as the source model family computes them.

  BERT (``absolute``): ``0 .. L-1`` per row, or per sequence for packed rows.
  RoBERTa (``roberta``): ``cfg.position_offset + index`` (the offset is ``pad + 1``) for tokens and
  ``pad`` for padding, i.e. ``cumsum(mask) * mask + padding_idx``; per sequence for packed rows.
  """
  if cfg.position_style == "absolute":
    if seq.packed:
      return seq.positions
    b, l = seq.positions.shape
    return jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  valid = jnp.ones(seq.positions.shape, bool) if seq.segment_ids is None else seq.segment_ids != 0
  if attention_mask is not None and not seq.packed:
    mask = jnp.asarray(attention_mask, jnp.int32)
    return jnp.where(mask != 0, jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1 + cfg.position_offset, cfg.pad_token_id)
  return jnp.where(valid, seq.positions + cfg.position_offset, cfg.pad_token_id)


class Embeddings(nnx.Module):
  """HF ``embeddings.*``: word + position (+ token type unless ``cfg.type_vocab_size`` is 0), LayerNorm, dropout."""

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.word = embed(cfg, cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), rngs=rngs)
    self.position = embed(cfg, cfg.max_position_embeddings, cfg.hidden_size, ("position", "embed"), rngs=rngs)
    self.token_type = (embed(cfg, cfg.type_vocab_size, cfg.hidden_size, ("type", "embed"), rngs=rngs)
                       if cfg.type_vocab_size > 0 else None)
    self.norm = layer_norm(cfg, cfg.hidden_size, rngs=rngs)
    self.dropout = Dropout(cfg.hidden_dropout, impl=cfg.dropout_impl, rngs=rngs)

  def __call__(self, input_ids: jax.Array, positions: jax.Array, token_type_ids: jax.Array | None) -> jax.Array:
    x_BLD = self.word(input_ids) + self.position(positions)
    if self.token_type is not None:
      tt = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
      x_BLD = x_BLD + self.token_type(tt)
    return self.dropout(self.norm(x_BLD))
