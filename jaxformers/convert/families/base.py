"""What a converter family is, the registry of families, and recognising a checkpoint's family.

A :class:`Family` holds everything that differs between checkpoint formats: how an HF
``config.json`` is recognised (``model_type``, the ``architectures`` class-name prefix, and
whether its layers are serial or parallel), its config keys <-> :class:`EncoderConfig`
fields, its tensor names <-> jaxformers parameter paths (:class:`Rule` tables, used in both
directions), tensors it stores but does not load (:class:`Ignore`), and the conventions its
models follow (position ids, token-type embeddings, head styles). :mod:`jaxformers.convert.hf`
is the engine that applies a family; each family is one module in this package.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import numpy as np

from jaxformers.config import FAMILIES, config_families, of_config  # noqa: F401 (the registry families join)
from jaxformers.convert.engine import Ignore, Rule
from jaxformers.errors import CheckpointError
from jaxformers.layout import BLOCKS, LayoutError, parse_layout

# HF architecture class-name suffix -> jaxformers task
ARCHITECTURES = {
    "Model": "base", "ForMaskedLM": "masked_lm", "ForPreTraining": "pretraining",
    "ForSequenceClassification": "classification", "ForTokenClassification": "token_classification",
}
# HF activation names -> EncoderConfig.hidden_act, and back
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "relu": "relu"}
ACTIVATIONS_OUT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}


@dataclasses.dataclass(frozen=True)
class Family:
  """One checkpoint format. ``read_config(hf, where)`` returns ``(EncoderConfig fields, number of layers)`` from an
  HF config dict (raising :class:`CheckpointError` naming the key); ``write_config(cfg)`` returns the family's HF
  config keys (the engine adds ``model_type``, ``architectures``, labels and the stored layout)."""

  name: str                                   # registry key
  model_type: str                             # HF config.json "model_type"
  architecture: str                           # class-name prefix: "Bert" for BertModel, BertForMaskedLM, ...
  prefix: str                                 # the base model's name in head models ("bert" in "bert.embeddings.*")
  layers: str                                 # HF name of the layer list ("encoder.layer")
  rules: tuple[Rule, ...]                     # encoder tensors
  heads: Mapping[str, tuple[Rule, ...]]       # task -> head tensors; the tasks listed are the supported ones
  ignores: tuple[Ignore, ...]                 # tensors stored but not loaded (buffers, tied copies)
  read_config: Callable[[dict, str], tuple[dict, int]]
  write_config: Callable[[object], dict]
  token_types: bool = True                    # whether its checkpoints hold token-type embeddings
  classifier: str = "bert"                    # default sequence-classifier head style of its models
  lm_head_act: str | None = None              # activation of its masked-LM transform (None: the model's hidden_act)
  parallel: bool = False                      # layers with attention and feed-forward side by side (PAF)
  encoder_family: str | None = None           # EncoderConfig.family of its models (None: its own name)
  extra_tensors: Callable[[object, str], dict[str, np.ndarray]] | None = None   # written on export beyond the rules
  description: str = ""                       # how it is recognised, for messages

  @property
  def config_family(self) -> str:
    return self.encoder_family or self.name

  def task(self, hf: dict, where: str) -> str:
    """The task of the HF config's first architecture; :class:`CheckpointError` for one the family lacks."""
    arch = (hf.get("architectures") or [f"{self.architecture}Model"])[0]
    suffix = arch[len(self.architecture):] if arch.startswith(self.architecture) else None
    task = ARCHITECTURES.get(suffix)
    if task is None or task not in self.heads:
      known = ", ".join(f"{self.architecture}{s}" for s, t in ARCHITECTURES.items() if t in self.heads)
      raise CheckpointError(f"{where}: architecture {arch!r} is not supported; expected one of {known}")
    return task

  def all_rules(self) -> list[Rule]:
    """Encoder and every head's rules, each HF name once."""
    seen, out = set(), []
    for r in (*self.rules, *(r for rs in self.heads.values() for r in rs)):
      if r.hf not in seen:
        seen.add(r.hf)
        out.append(r)
    return out


def register(family: Family) -> Family:
  FAMILIES.register(family.name)(family)
  return family


def families() -> list[Family]:
  return [FAMILIES.get(n) for n in FAMILIES.names()]


def accepted() -> str:
  """The registered families as a message lists them: ``bert (model_type 'bert'), ...``."""
  return ", ".join(f"{f.name} ({f.description or f'model_type {f.model_type!r}'})" for f in families())


def _all_parallel(layout: str | None) -> bool:
  if not layout:
    return False
  try:
    blocks = parse_layout(layout, BLOCKS.names())
  except LayoutError:
    return False      # EncoderConfig reports a bad layout with its grammar
  return set(blocks) == {"parallel"}


def detect(hf: dict, where: str, layout: str | None = None) -> Family:
  """The registered family of an HF config dict: by ``model_type``, then (where a model type has a serial and a
  parallel family) by whether the requested layout, else the layout stored on export, is all parallel blocks."""
  model_type = hf.get("model_type")
  matching = [f for f in families() if f.model_type == model_type]
  if not matching:
    raise CheckpointError(f"{where}: config.json key model_type={model_type!r} names no registered converter "
                          f"family; accepted: {accepted()}")
  parallel = _all_parallel(layout or (hf.get("jaxformers") or {}).get("layout"))
  same = [f for f in matching if f.parallel == parallel] or [f for f in matching if not f.parallel] or matching
  return same[0]


def for_export(config_family: str, parallel: bool) -> Family | None:
  """The family that writes models of ``config_family`` with serial or parallel layers (None when none does)."""
  return next((f for f in families() if f.config_family == config_family and f.parallel == parallel), None)


def activation(hf: dict, key: str, where: str, default: str = "gelu") -> str:
  act = hf.get(key, default)
  if act not in ACTIVATIONS:
    raise CheckpointError(f"{where}: {key} {act!r} is not supported; expected one of {', '.join(ACTIVATIONS)}")
  return ACTIVATIONS[act]


def require(hf: dict, keys: tuple[str, ...], where: str) -> None:
  missing = [k for k in keys if k not in hf]
  if missing:
    raise CheckpointError(f"{where}: config.json lacks {', '.join(missing)}")
