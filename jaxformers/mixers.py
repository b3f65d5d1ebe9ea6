"""Token mixers and what the rest of the package needs to know about each: one :class:`MixerSpec` per mixer.

A block (:class:`jaxformers.layout.BlockSpec`) names its token mixer; the mixer's spec, registered here with
:func:`register_mixer`, is the only place that says what the mixer is:

* ``module``: the ``nnx.Module`` class, built as ``module(cfg, *, rngs)`` (``module(cfg, *, rngs, num_heads=n)``
  for a mixer with heads) and called as ``mixer(x_BLD, seq)``; with a class attribute ``selects_queries = True``
  it also takes ``select_BS`` and returns only those positions.
* ``flops(cfg, length, heads)``: forward FLOPs per token at sequence length ``length`` (a multiply-add is 2);
  ``heads`` is the block's head count (:meth:`EncoderConfig.heads_at`) for a mixer with heads, else None.
  :mod:`jaxformers.flops` adds these up for search, pruning and the layout study.
* ``has_heads``: the mixer is multi-head attention: ``query``, ``key``, ``value`` projections of
  ``num_heads * head_dim`` outputs and an ``out`` projection back, built with ``num_heads``. Its blocks take a
  per-layer head count (``num_heads_per_layer``), their attention can be distilled and their heads pruned.
* ``packing``: whether it honours packed rows' segment ids (``True`` / ``False``), or a function of the
  config returning None when it does and the reason when it does not.
* ``fusable``: in a parallel block its query, key and value projections may run as one matmul with the
  feed-forward's up-projection (``fuse_projections``); needs ``has_heads``.
* ``search``: an architecture-search candidate (:mod:`jaxformers.search`; its cost is ``flops``); it needs a
  registered single-sublayer post-LN block of this mixer (``BlockSpec(name, mlp=False)``).
* ``prune``: ``"heads"`` (its heads are pruned; needs ``has_heads``), ``"keep"`` (left whole; the feed-forward
  of its blocks is still pruned) or ``"refuse"`` (:mod:`jaxformers.prune` refuses a model with it, saying
  ``prune_refusal``).
* ``hf_export``: a serial or parallel post-LN block with this mixer and a feed-forward is one layer of a
  transformers BERT/RoBERTa checkpoint (only attention is).
* ``config_fields``: the :class:`~jaxformers.config.EncoderConfig` fields the mixer reads;
  ``options``: hyper-parameters it adds, ``name -> default``, which become ``EncoderConfig`` values
  (``cfg.name``, ``EncoderConfig.from_dict({... "name": v})``) and ``config.model.name`` flags of ``train.py``.
  ``check_options(cfg)`` returns None or why the config's values are unusable.
* ``introduced``: runtime field values a re-arranged checkpoint gets when its new layout adds this mixer and the
  source had none of it, unless the run's config sets them (Fourier mixing: ``fourier_norm='ortho'``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from jaxformers.registry import Registry

PRUNE_RULES = ("heads", "keep", "refuse")


@dataclasses.dataclass(frozen=True)
class MixerSpec:
  """What one token mixer is (see the module docstring for each field)."""
  name: str
  module: Callable
  flops: Callable[[Any, int, int | None], float]
  has_heads: bool = False
  packing: bool | Callable[[Any], str | None] = False
  fusable: bool = False
  search: bool = False
  prune: str = "keep"
  prune_refusal: str = ""
  hf_export: bool = False
  config_fields: tuple[str, ...] = ()
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  check_options: Callable[[Any], str | None] | None = None
  introduced: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  doc: str = ""

  def __post_init__(self):
    def bad(field: str, why: str):
      raise ValueError(f"MixerSpec({self.name!r}).{field}={getattr(self, field)!r}: {why}")

    if not isinstance(self.name, str) or not self.name.isidentifier():
      raise ValueError(f"MixerSpec.name={self.name!r}: expected a Python identifier")
    if self.prune not in PRUNE_RULES:
      bad("prune", f"expected one of {', '.join(PRUNE_RULES)}")
    if self.prune == "heads" and not self.has_heads:
      bad("prune", "pruning heads needs has_heads=True")
    if self.prune == "refuse" and not self.prune_refusal:
      bad("prune_refusal", "a mixer that prune refuses needs the one-line reason it gives")
    if self.fusable and not self.has_heads:
      bad("fusable", "fusing projections needs query, key and value projections (has_heads=True)")
    for o, v in self.options.items():
      if not o.isidentifier():
        bad("options", f"option name {o!r} is not a Python identifier")
      if not isinstance(v, (bool, int, float, str, tuple)):
        bad("options", f"default of {o!r} must be a bool, int, float, str or tuple, not {type(v).__name__}")

  def packing_refusal(self, cfg) -> str | None:
    """None when the mixer runs on packed rows under ``cfg``, else why not."""
    if callable(self.packing):
      return self.packing(cfg)
    return None if self.packing else f"token mixer {self.name!r} does not handle packed rows (segment ids)"


MIXERS: Registry[MixerSpec] = Registry("token mixer")
_RESERVED: set[str] = set()   # EncoderConfig's field names (jaxformers.config adds them): no option may take one


def reserve_names(names) -> None:
  _RESERVED.update(names)


def register_mixer(spec: MixerSpec) -> MixerSpec:
  """Add ``spec`` to :data:`MIXERS`; its options may not clash with :class:`EncoderConfig` fields or another
  mixer's options."""
  for o in spec.options:
    if o in _RESERVED:
      raise ValueError(f"MixerSpec({spec.name!r}).options: {o!r} is already an EncoderConfig field; list it in "
                       f"config_fields instead")
    owner = option_owner(o)
    if owner is not None and owner != spec.name:
      raise ValueError(f"MixerSpec({spec.name!r}).options: {o!r} is already an option of token mixer {owner!r}")
  MIXERS.register(spec.name)(spec)
  return spec


def unregister_mixer(name: str) -> None:
  """Remove a registered mixer (for tests that register one of their own)."""
  MIXERS.unregister(name)


def option_owner(name: str) -> str | None:
  """The registered mixer that declares option ``name``, or None."""
  for m in MIXERS:
    if name in MIXERS.get(m).options:
      return m
  return None


def all_options() -> dict[str, Any]:
  """Every registered mixer's options with their defaults."""
  return {o: v for m in MIXERS for o, v in MIXERS.get(m).options.items()}


def spec_of(mixer: str | None) -> MixerSpec | None:
  """The spec of a block's mixer name (None for a block without a token mixer)."""
  return None if mixer is None else MIXERS.get(mixer)
