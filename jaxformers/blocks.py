"""Encoder blocks: one :class:`Block` class built from a block type's :class:`~jaxformers.layout.BlockSpec`.

Block types are registered by name in :data:`jaxformers.layout.BLOCKS`, token mixers (with what each is, a
:class:`jaxformers.mixers.MixerSpec`) in :data:`jaxformers.mixers.MIXERS`; a layout string arranges block types
by depth.

Every block is one :class:`Block` configured by a :class:`BlockSpec`: which token
mixer it has (self-attention, Fourier mixing, sparse attention, or none), whether it
has a feed-forward sublayer, whether the two read the same input (parallel) or run one
after the other (serial), and where the LayerNorm sits (after the residual sum, as in
BERT, or before the sublayer, as in pre-LN models).

Parameter names inside a block: ``mixer`` (e.g. ``mixer.query``), ``mixer_norm``,
``mlp`` (``mlp.up``, ``mlp.down``), ``mlp_norm``; parallel blocks have one ``norm``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformers.config import EncoderConfig
from jaxformers.dropout import Dropout
from jaxformers.layers import FeedForward, Sequences
from jaxformers.layers.common import flat_matmul, layer_norm
from jaxformers.layout import BLOCKS, BlockSpec  # noqa: F401  (BLOCKS: the block types, re-exported here)
from jaxformers.mixers import MIXERS


class Block(nnx.Module):
  """One encoder block as described by its :class:`BlockSpec`."""

  def __init__(self, cfg: EncoderConfig, spec: BlockSpec, *, rngs: nnx.Rngs, layer: int = 0):
    """``layer``: the block's depth, which picks its pruned head count and feed-forward width (if any)."""
    self.spec = spec
    d = cfg.hidden_size
    mixer = MIXERS.get(spec.mixer) if spec.mixer else None
    heads = {"num_heads": cfg.heads_at(layer)} if mixer and mixer.has_heads and cfg.num_heads_per_layer else {}
    self.mixer = mixer.module(cfg, rngs=rngs, **heads) if mixer else None
    self.mlp = FeedForward(cfg, rngs=rngs, width=cfg.ffn_width_at(layer)) if spec.mlp else None
    if spec.parallel:
      self.norm = layer_norm(cfg, d, rngs=rngs)
    else:
      self.mixer_norm = layer_norm(cfg, d, rngs=rngs) if spec.mixer else None
      self.mlp_norm = layer_norm(cfg, d, rngs=rngs) if spec.mlp else None
    self.dropout = Dropout(cfg.hidden_dropout, impl=cfg.dropout_impl, rngs=rngs)
    self.fuse = bool(cfg.fuse_projections and spec.parallel and mixer is not None and mixer.fusable and spec.mlp
                     and cfg.quantization == "none" and not cfg.quant_aware)

  @property
  def mixer_spec(self):
    """The token mixer's :class:`jaxformers.mixers.MixerSpec` (None without a mixer)."""
    return MIXERS.get(self.spec.mixer) if self.spec.mixer else None

  @property
  def has_attention(self) -> bool:
    """Whether the token mixer is multi-head attention with query, key and value projections (``has_heads``)."""
    return self.spec.mixer is not None and MIXERS.get(self.spec.mixer).has_heads

  def attention_inputs(self, x_BLD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The queries, keys and values ``[batch, length, hidden]`` (heads not yet split) that this block's attention
    computes from the block input ``x_BLD`` (after the block's LayerNorm in pre-LN blocks)."""
    if not self.has_attention:
      raise ValueError(f"a block with token mixer {self.spec.mixer!r} has no attention queries, keys and values")
    if self.spec.pre_ln:
      x_BLD = (self.norm if self.spec.parallel else self.mixer_norm)(x_BLD)
    return self.mixer.query(x_BLD), self.mixer.key(x_BLD), self.mixer.value(x_BLD)

  def _sublayer(self, x_BLD, fn, norm, take=lambda t: t):
    """Residual sublayer; ``take`` picks the rows of the residual that ``fn`` returns."""
    if self.spec.pre_ln:
      return take(x_BLD) + self.dropout(fn(norm(x_BLD)))
    return norm(take(x_BLD) + self.dropout(fn(x_BLD)))

  def _mix(self, h_BLD: jax.Array, seq: Sequences, select_BS: jax.Array | None, take) -> jax.Array:
    """The token mixer's output at every position, or only at ``select_BS`` (mixers that can compute
    only some queries do so; the others mix every token and are then gathered)."""
    if select_BS is None:
      return self.mixer(h_BLD, seq)
    if getattr(self.mixer, "selects_queries", False):
      return self.mixer(h_BLD, seq, select_BS=select_BS)
    return take(self.mixer(h_BLD, seq))

  def _fused_branches(self, h_BLD: jax.Array, seq: Sequences) -> tuple[jax.Array, jax.Array]:
    """Q, K, V and the FFN up-projection of the same input as one matmul."""
    att, mlp = self.mixer, self.mlp
    kernel = jnp.concatenate([att.query.kernel[...], att.key.kernel[...], att.value.kernel[...],
                              mlp.up.kernel[...]], axis=1)
    bias = jnp.concatenate([att.query.bias[...], att.key.bias[...], att.value.bias[...], mlp.up.bias[...]])
    z = flat_matmul(h_BLD, kernel.astype(h_BLD.dtype)) + bias.astype(h_BLD.dtype)
    a = att.query.kernel.shape[1]   # the attention's inner width (hidden size unless heads were pruned)
    q, k, v, up = jnp.split(z, [a, 2 * a, 3 * a], axis=-1)
    return att(h_BLD, seq, qkv_BLD=(q, k, v)), mlp(h_BLD, hidden_BLF=up)

  def __call__(self, x_BLD: jax.Array, seq: Sequences, select_BS: jax.Array | None = None) -> jax.Array:
    """``[batch, length, hidden]`` -> same shape; with ``select_BS`` ``[batch, S]`` (positions) only those
    positions' outputs ``[batch, S, hidden]`` are computed: every token still feeds the mixer (keys,
    values, Fourier transform), but queries, the feed-forward sublayer and the norms run on S rows."""
    spec = self.spec
    if select_BS is None:
      take = lambda t: t  # noqa: E731
    else:
      take = lambda t: jnp.take_along_axis(t, select_BS[..., None], axis=1)  # noqa: E731
    if spec.parallel:
      h_BLD = self.norm(x_BLD) if spec.pre_ln else x_BLD
      if self.fuse and select_BS is None:
        mix, ff = self._fused_branches(h_BLD, seq)
      else:
        mix, ff = self._mix(h_BLD, seq, select_BS, take), self.mlp(take(h_BLD))
      y_BLD = take(x_BLD) + self.dropout(mix) + self.dropout(ff)
      return y_BLD if spec.pre_ln else self.norm(y_BLD)
    if self.mixer is not None:
      x_BLD = self._sublayer(x_BLD, lambda h: self._mix(h, seq, select_BS, take), self.mixer_norm, take)
    else:
      x_BLD = take(x_BLD)
    if self.mlp is not None:
      x_BLD = self._sublayer(x_BLD, self.mlp, self.mlp_norm)
    return x_BLD
