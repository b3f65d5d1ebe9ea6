"""The one FLOPs model: forward FLOPs per token of an encoder's blocks, from its config and a sequence length.

A multiply-add counts 2 FLOPs; only matmuls are counted. ``d`` is the hidden size, ``L`` the sequence length,
``H`` the head dimension and ``n`` a block's heads (:meth:`EncoderConfig.heads_at`), ``F`` its feed-forward
width (:meth:`EncoderConfig.ffn_width_at`):

* feed-forward: ``4 d F`` (up- and down-projection);
* a token mixer: its spec's ``flops(cfg, L, heads)`` (:class:`jaxformers.mixers.MixerSpec`): attention
  ``(8 d + 4 L) n H`` (query, key, value and output projections, scores and weighted sum), sparse attention the
  same with a query's ``K`` keys in place of ``L``, Fourier mixing ``4 d^2 + 4 L d`` (the DFT matmuls over hidden
  and sequence).

LayerNorm, softmax, activations, residual sums, the embeddings (a gather), the pooler and task heads are left
out; a block's FLOPs per token are its mixer's plus its feed-forward's. XLA's cost analysis of a block's forward
pass counts the same matmuls plus that elementwise work (``tests/test_flops.py`` compares the two for every block
type). Architecture search (candidate costs and the FLOPs budget), pruning (``flops=`` targets and the reports of
``jaxformers prune``) and the layout study all read this model.
"""
from __future__ import annotations

from jaxformers.config import EncoderConfig
from jaxformers.layout import BLOCKS, format_layout
from jaxformers.mixers import MIXERS


def ffn_flops(cfg: EncoderConfig, width: int | None = None) -> float:
  """Forward FLOPs per token of a feed-forward sublayer of ``width`` neurons (``intermediate_size`` by default)."""
  return 4.0 * cfg.hidden_size * (cfg.intermediate_size if width is None else width)


def mixer_flops(cfg: EncoderConfig, mixer: str, length: int, heads: int | None = None) -> float:
  """Forward FLOPs per token of token mixer ``mixer`` at sequence length ``length``; ``heads`` (mixers with heads
  only) defaults to ``num_heads``."""
  spec = MIXERS.get(mixer)
  if spec.has_heads:
    heads = cfg.num_heads if heads is None else heads
  return float(spec.flops(cfg, length, heads if spec.has_heads else None))


def block_flops(cfg: EncoderConfig, layer: int, length: int) -> float:
  """Forward FLOPs per token of block ``layer`` of ``cfg``'s layout (with its pruned heads and width, if any)."""
  spec = BLOCKS.get(cfg.blocks[layer])
  total = 0.0
  if spec.mixer:
    total += mixer_flops(cfg, spec.mixer, length, cfg.heads_at(layer) if MIXERS.get(spec.mixer).has_heads else None)
  if spec.mlp:
    total += ffn_flops(cfg, cfg.ffn_width_at(layer))
  return total


def model_flops(cfg: EncoderConfig, length: int) -> float:
  """Forward FLOPs per token of all of ``cfg``'s blocks at sequence length ``length``."""
  return sum(block_flops(cfg, i, length) for i in range(cfg.num_layers))


def layout_flops(cfg: EncoderConfig, blocks, length: int) -> float:
  """Forward FLOPs per token of a layout's blocks (a sequence of block names) at ``cfg``'s widths."""
  return model_flops(cfg.replace(layout=format_layout(tuple(blocks)), num_heads_per_layer=None,
                                 intermediate_sizes=None), length)


def attention_flops(cfg: EncoderConfig, keys: int, heads: int) -> float:
  """Multi-head attention with ``heads`` heads where each query attends to ``keys`` keys:
  ``(8 d + 4 keys) heads H``."""
  return (8.0 * cfg.hidden_size + 4.0 * keys) * heads * cfg.head_dim
