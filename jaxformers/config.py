"""The encoder's configuration: one frozen dataclass, serialisable to JSON."""
from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path
from typing import Any

from jaxformers.dropout import DROPOUT_IMPLS
from jaxformers.layout import BLOCKS, parse_layout
from jaxformers.mixers import MIXERS, all_options, option_owner, reserve_names
from jaxformers.registry import Registry

ACTIVATIONS = ("gelu", "gelu_tanh", "relu")
POSITION_STYLES = ("absolute", "roberta")
FOURIER_IMPLS = ("auto", "fft", "matmul")
FOURIER_PADDINGS = ("per_sequence", "fnet")
FOURIER_NORMS = ("none", "ortho")
DTYPES = ("float32", "bfloat16", "float16")
# Fields that change only how a model computes, never its parameters: a checkpoint loads under any value of these.
RUNTIME_FIELDS = frozenset({"attention_impl", "fourier_impl", "fourier_padding", "fourier_norm",
                            "fuse_projections", "hidden_dropout", "attention_dropout", "dropout_impl", "dtype",
                            "sparse_window", "sparse_global_tokens", "quant_aware"})
QUANTIZATIONS = ("none", "int8")


# Converter families (one module each in jaxformers.convert.families) register here when jaxformers is imported; a
# config's ``family`` names one whose models carry its own name, and models read its head conventions from it.
FAMILIES: Registry = Registry("converter family")


def config_families() -> tuple[str, ...]:
  """The values EncoderConfig.family may take: the families whose models carry their own name."""
  return tuple(n for n in FAMILIES.names() if FAMILIES.get(n).encoder_family is None)


def of_config(name: str):
  """The family an EncoderConfig.family value names (its serial form)."""
  if name not in config_families():
    raise ValueError(f"family {name!r} is not a registered converter family; expected one of "
                     f"{', '.join(config_families())}")
  return FAMILIES.get(name)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Everything that fixes an encoder's parameters and computation.

  ``layout`` lists the blocks by depth (see :mod:`jaxformers.layout`); the number of
  layers is the number of blocks it expands to. ``family`` names the registered
  converter family (:mod:`jaxformers.convert.families`: ``bert``, ``roberta``,
  ``distilbert``, ...) whose checkpoint format the model exports to and whose head
  conventions its task models follow. ``position_style`` ``roberta`` starts position ids
  after the padding id (:attr:`position_offset`); ``type_vocab_size=0`` means no
  token-type embeddings.
  """

  vocab_size: int = 30522
  hidden_size: int = 768
  num_heads: int = 12
  intermediate_size: int = 3072
  layout: str = "serial*12"
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  pad_token_id: int = 0
  position_style: str = "absolute"
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  dropout_impl: str = "hash"
  initializer_range: float = 0.02
  attention_impl: str = "auto"
  fourier_impl: str = "auto"
  fourier_padding: str = "per_sequence"
  fourier_norm: str = "none"
  fuse_projections: bool = False
  sparse_window: int = 128
  sparse_global_tokens: tuple[int, ...] = (0,)
  use_pooler: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"
  family: str = "bert"
  # Structured pruning (jaxformers.prune): per-block attention head counts and feed-forward widths, one entry per
  # block (0 where the block has no attention / no feed-forward); None: every block has num_heads and
  # intermediate_size. Heads keep head_dim = hidden_size // num_heads.
  num_heads_per_layer: tuple[int, ...] | None = None
  intermediate_sizes: tuple[int, ...] | None = None
  # int8 inference (jaxformers.quant): "int8" stores every dense layer's kernel as int8 with a scale per output
  # channel and quantises its input per token at run time. quant_aware: float kernels, int8 simulated in the forward
  # pass with straight-through gradients (quantization-aware fine-tuning).
  quantization: str = "none"
  quant_aware: bool = False
  # Hyper-parameters that registered token mixers add (jaxformers.mixers.MixerSpec.options), as (name, value) pairs:
  # read as cfg.<name>, written flat in to_dict / from_dict, and config.model.<name> in train.py. Options of the
  # layout's mixers that are not given take their defaults.
  mixer_options: tuple[tuple[str, Any], ...] = ()

  def __post_init__(self):
    def bad(field: str, why: str):
      raise ValueError(f"EncoderConfig.{field}={getattr(self, field)!r}: {why}")

    for f in ("vocab_size", "hidden_size", "num_heads", "intermediate_size", "max_position_embeddings"):
      if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
        bad(f, "must be a positive integer")
    if self.hidden_size % self.num_heads:
      bad("num_heads", f"must divide hidden_size={self.hidden_size}")
    for f, allowed in (("hidden_act", ACTIVATIONS), ("position_style", POSITION_STYLES),
                       ("fourier_impl", FOURIER_IMPLS), ("fourier_padding", FOURIER_PADDINGS),
                       ("fourier_norm", FOURIER_NORMS),
                       ("dtype", DTYPES), ("param_dtype", DTYPES), ("family", config_families()),
                       ("dropout_impl", DROPOUT_IMPLS), ("quantization", QUANTIZATIONS)):
      if getattr(self, f) not in allowed:
        bad(f, f"expected one of {', '.join(allowed)}")
    if not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 0:
      bad("type_vocab_size", "must be a non-negative integer (0: no token-type embeddings)")
    for f in ("hidden_dropout", "attention_dropout"):
      if not 0.0 <= getattr(self, f) < 1.0:
        bad(f, "must be in [0, 1)")
    if self.sparse_window < 1:
      bad("sparse_window", "must be a positive number of tokens")
    object.__setattr__(self, "sparse_global_tokens", tuple(int(t) for t in self.sparse_global_tokens))
    blocks = parse_layout(self.layout, BLOCKS.names())
    self._set_mixer_options(blocks)
    for f, top, has in (("num_heads_per_layer", self.num_heads,
                         lambda s: bool(s.mixer) and MIXERS.get(s.mixer).has_heads),
                        ("intermediate_sizes", None, lambda s: s.mlp)):
      v = getattr(self, f)
      if v is None:
        continue
      if isinstance(v, (str, bytes)) or not all(isinstance(n, int) and not isinstance(n, bool) for n in v):
        bad(f, "expected a list of integers, one per block, or None")
      object.__setattr__(self, f, tuple(v))
      if len(v) != len(blocks):
        bad(f, f"has {len(v)} entries; the layout {self.layout!r} has {len(blocks)} blocks")
      for i, (n, name) in enumerate(zip(v, blocks)):
        if not has(BLOCKS.get(name)) and n != 0:
          bad(f, f"block {i} ({name}) has no {'attention' if top else 'feed-forward'} sublayer: its entry must be 0")
        if has(BLOCKS.get(name)) and not (1 <= n <= (top or n)):
          bad(f, f"block {i} ({name}): {n} is outside 1..{top or 'any'}")

  def _set_mixer_options(self, blocks: tuple[str, ...]) -> None:
    """Check the given mixer options (known, of the default's type) and add the defaults of the layout's mixers."""
    opts = self.mixer_options
    opts = dict(opts.items() if isinstance(opts, dict) else opts)
    known = all_options()
    for name, v in opts.items():
      if name not in known:
        raise ValueError(f"EncoderConfig.mixer_options: unknown option {name!r}; registered token mixers' options: "
                         f"{', '.join(sorted(known)) or 'none'}")
      want = known[name]
      if isinstance(want, tuple) and isinstance(v, list):
        v = opts[name] = tuple(v)
      ok = isinstance(v, type(want)) and (isinstance(want, bool) or not isinstance(v, bool))
      if isinstance(want, float) and isinstance(v, int) and not isinstance(v, bool):
        v = opts[name] = float(v)
        ok = True
      if not ok:
        raise ValueError(f"EncoderConfig.{name}={v!r}: expected a {type(want).__name__} (option of token mixer "
                         f"{option_owner(name)!r})")
    for b in blocks:
      mixer = BLOCKS.get(b).mixer
      if mixer is not None and mixer in MIXERS:
        for name, v in MIXERS.get(mixer).options.items():
          opts.setdefault(name, v)
    object.__setattr__(self, "mixer_options", tuple(sorted(opts.items())))
    for mixer in sorted({BLOCKS.get(b).mixer for b in blocks} - {None}):
      spec = MIXERS.get(mixer) if mixer in MIXERS else None
      why = spec.check_options(self) if spec is not None and spec.check_options is not None else None
      if why:
        raise ValueError(f"EncoderConfig (token mixer {mixer!r}): {why}")

  def __getattr__(self, name: str) -> Any:
    if name.startswith("__") or name == "mixer_options":
      raise AttributeError(name)
    opts = dict(self.mixer_options)
    if name in opts:
      return opts[name]
    known = all_options()
    if name in known:
      return known[name]
    raise AttributeError(f"EncoderConfig has no field or token-mixer option {name!r}")

  @property
  def blocks(self) -> tuple[str, ...]:
    return parse_layout(self.layout, BLOCKS.names())

  @property
  def num_layers(self) -> int:
    return len(self.blocks)

  @property
  def position_offset(self) -> int:
    """Position id of a sequence's first token: 0, or with ``position_style="roberta"`` the padding id + 1
    (RoBERTa's position ids start after its padding_idx)."""
    return self.pad_token_id + 1 if self.position_style == "roberta" else 0

  @property
  def max_length(self) -> int:
    """Longest input the position table takes (RoBERTa's positions start after the padding id)."""
    return self.max_position_embeddings - self.position_offset

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def heads_at(self, layer: int) -> int:
    """Attention heads of block ``layer`` (``num_heads`` unless pruned)."""
    return self.num_heads if self.num_heads_per_layer is None else self.num_heads_per_layer[layer]

  def ffn_width_at(self, layer: int) -> int:
    """Feed-forward width of block ``layer`` (``intermediate_size`` unless pruned)."""
    return self.intermediate_size if self.intermediate_sizes is None else self.intermediate_sizes[layer]

  def replace(self, **changes: Any) -> "EncoderConfig":
    """A copy with ``changes``: fields and registered token-mixer options alike."""
    known = all_options()
    opts = {k: changes.pop(k) for k in list(changes) if k in known}
    if opts:
      changes["mixer_options"] = {**dict(changes.get("mixer_options", self.mixer_options)), **opts}
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    """Every field as JSON values; token-mixer options sit beside the fields."""
    d = dataclasses.asdict(self)
    d["sparse_global_tokens"] = list(self.sparse_global_tokens)
    for f in ("num_heads_per_layer", "intermediate_sizes"):
      d[f] = None if d[f] is None else list(d[f])
    del d["mixer_options"]
    for k, v in self.mixer_options:
      d[k] = list(v) if isinstance(v, tuple) else v
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any], source: str = "config") -> "EncoderConfig":
    """The config of ``to_dict``'s form; keys that are registered token-mixer options become ``mixer_options``."""
    names = {f.name for f in dataclasses.fields(cls)} - {"mixer_options"}
    options = all_options()
    unknown = sorted(set(d) - names - set(options))
    if unknown:
      hints = {k: difflib.get_close_matches(k, names | set(options), n=2) for k in unknown}
      msg = "; ".join(f"{k!r}" + (f" (did you mean {', '.join(v)}?)" if v else "") for k, v in hints.items())
      raise ValueError(f"{source}: unknown EncoderConfig keys {msg}")
    fields = {k: v for k, v in d.items() if k in names}
    return cls(**fields, mixer_options={k: v for k, v in d.items() if k in options})

  def save(self, path: str | Path) -> None:
    Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

  @classmethod
  def load(cls, path: str | Path) -> "EncoderConfig":
    return cls.from_dict(json.loads(Path(path).read_text()), source=str(path))


reserve_names(f.name for f in dataclasses.fields(EncoderConfig))
