"""HF PyTorch checkpoints <-> jaxformers models: one engine that applies a registered converter family.

The families (BERT, RoBERTa, PAF, DistilBERT, ...) live in :mod:`jaxformers.convert.families`, one
module each, with their key tables, config mappings and conventions. This module recognises a
checkpoint's family (:func:`jaxformers.convert.families.detect`), builds the
:class:`EncoderConfig` from the family's config mapping, and fills a model by the family's rules
(:func:`jaxformers.convert.engine.load`); on export it picks the family of the model's
``config.family`` and layout and writes its tensor names and config. Linear weights are
transposed (PyTorch stores ``[out, in]``); decoder weights tied to the word embeddings are
checked for equality and not stored twice.

Re-arrangement: loading a serial checkpoint into another layout reuses, for each
layer, the parts the target block has (see :func:`jaxformers.convert.engine.layer_map`):
attention projections and their LayerNorm go to blocks with attention, feed-forward
weights and their LayerNorm to blocks with a feed-forward sublayer; a Fourier block
reuses the post-mixing LayerNorm; a parallel block takes the feed-forward LayerNorm as its
single norm. Attention sublayers the layout does not have are dropped and listed in
the report; parameters with no source (a pre-LN stack's final norm, a new task head,
blocks of a layout deeper than the checkpoint) are newly initialised and listed. Native
models are re-arranged by the same tables (:mod:`jaxformers.convert.native`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from flax import nnx

from jaxformers import models
from jaxformers.config import EncoderConfig
from jaxformers.convert import engine
from jaxformers.convert.engine import Ignore, Rule
from jaxformers.convert.families import Family, detect, families, for_export
from jaxformers.convert.families.base import ARCHITECTURES
from jaxformers.convert.io import read_hf_config, read_hf_weights
from jaxformers.errors import CheckpointError
from jaxformers.layout import BLOCKS
from jaxformers.mixers import MIXERS
from jaxformers.params import get_params, param_shapes, set_params

_NEW_OK = ("lm_head.", "nsp.", "classifier.", "encoder.pooler.", "pooler.", "encoder.final_norm.", "final_norm.")
LABELLED = ("classification", "token_classification")


def family_and_task(hf: dict, where: str, layout: str | None = None) -> tuple[Family, str]:
  """The registered family of an HF config dict and the task of its architecture."""
  family = detect(hf, where, layout)
  return family, family.task(hf, where)


def encoder_config(hf: dict, where: str, layout: str | None = None, **overrides) -> EncoderConfig:
  """EncoderConfig from an HF config.json dict, by its family's mapping."""
  family, _ = family_and_task(hf, where, layout)
  kw, n = family.read_config(hf, where)
  if not family.token_types:
    kw["type_vocab_size"] = 0
  stored_layout = (hf.get("jaxformers") or {}).get("layout")
  kw.update(family=family.config_family, layout=layout or stored_layout or f"serial*{n}")
  pruned = hf.get("pruned_heads") or {}
  if pruned:   # a checkpoint pruned by transformers 4 (its tensors have the pruned shapes)
    kw["num_heads_per_layer"] = tuple(kw["num_heads"] - len(set(pruned.get(str(i), pruned.get(i, []))))
                                      for i in range(n))
  kw.update(overrides)
  try:
    return EncoderConfig(**kw)
  except (ValueError, KeyError) as e:
    raise CheckpointError(f"{where}: {e}") from None


def _normalise(state: dict[str, np.ndarray], prefix: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Strip the base-model prefix and old LayerNorm names; returns the state and new -> original names."""
  out, names = {}, {}
  for original, v in state.items():
    k = original
    if k.startswith(prefix + "."):
      k = k[len(prefix) + 1:]
    if k.endswith(".gamma"):
      k = k[:-6] + ".weight"
    elif k.endswith(".beta"):
      k = k[:-5] + ".bias"
    out[k] = v
    names[k] = original
  return out, names


def _num_layers(state: dict, layers: str) -> int:
  depth = layers.count(".") + 1
  idx = [int(k.split(".")[depth]) for k in state if k.startswith(layers + ".")]
  return max(idx) + 1 if idx else 0


def load_hf_state(state: dict[str, np.ndarray], hf: dict, *, where: str, layout: str | None = None,
                  task: str | None = None, num_labels: int | None = None, head: str | None = None,
                  rngs: nnx.Rngs | None = None, progress: bool = False, **overrides):
  """Build a model from an in-memory HF state dict and config dict; returns ``(model, report)`` (eval mode)."""
  family, source_task = family_and_task(hf, where, layout)
  task = task or source_task
  state, original = _normalise(state, family.prefix)
  cfg = encoder_config(hf, where, layout, **overrides)
  labels = len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels", 2)
  source_labels = labels if source_task in LABELLED else None
  if num_labels is None and task in LABELLED:
    num_labels = labels
  if task == "base" and "use_pooler" not in overrides:
    cfg = cfg.replace(use_pooler="pooler.dense.weight" in state)
  n = _num_layers(state, family.layers) or cfg.num_layers
  model, report = fill_model(
      state, family.all_rules(), list(family.ignores), cfg=cfg, task=task, num_labels=num_labels, head=head,
      rngs=rngs, source_blocks=[BLOCKS.get("serial")] * n, source_labels=source_labels,
      position_key="embeddings.position_embeddings.weight", may_be_new=lambda p: p.startswith(_NEW_OK), where=where,
      progress=progress, display=original.__getitem__)
  names = label_names(hf)
  if names and len(names) == getattr(model, "num_labels", None):
    model.label_names = names
  return model, report


def fill_model(state: dict[str, np.ndarray], rules: list[Rule], ignores: list[Ignore], *, cfg: EncoderConfig,
               task: str, num_labels: int | None, head: str | None, rngs: nnx.Rngs | None, source_blocks: list,
               source_labels: int | None, position_key: str, may_be_new, where: str, progress: bool = False,
               display=lambda k: k):
  """Build the ``task`` model for ``cfg`` and fill it from ``state`` (source names) by ``rules``.

  Shared by HF checkpoints and native models: positions are extended when ``cfg`` asks for
  more, a classifier head with another number of labels than ``source_labels`` is dropped
  (the new head is initialised), and the model is returned in eval mode with its report.
  """
  state = dict(state)
  extended = _extend_positions(state, cfg, position_key)
  model = models.build(task, cfg, num_labels=num_labels, head=head, rngs=rngs)
  relabel = {}
  if task in LABELLED and source_labels is not None and source_labels != num_labels:
    for k in [k for k in state if k.startswith("classifier.")]:
      relabel[display(k)] = f"the checkpoint's head has {source_labels} labels, the new one {num_labels}"
      del state[k]
  params, report = engine.load(
      state, rules, ignores, target=param_shapes(model), target_blocks=[BLOCKS.get(b) for b in cfg.blocks],
      source_blocks=source_blocks, prefix="" if task == "base" else "encoder.", may_be_new=may_be_new, where=where,
      progress=progress, display=display)
  set_params(model, params)
  report.dropped.update(relabel)
  if extended:
    report.notes.append(extended)
  model.eval()
  return model, report


def _extend_positions(state: dict[str, np.ndarray], cfg: EncoderConfig, key: str) -> str | None:
  """Longformer's recipe for longer inputs: fill a larger position table by copying the learned one."""
  old = state.get(key)
  if old is None or old.shape[0] >= cfg.max_position_embeddings:
    return None
  offset = cfg.position_offset
  learned = old[offset:]
  reps = -(-(cfg.max_position_embeddings - offset) // len(learned))
  state[key] = np.concatenate([old[:offset], np.tile(learned, (reps, 1))])[: cfg.max_position_embeddings]
  return (f"position embeddings extended from {old.shape[0]} to {cfg.max_position_embeddings} positions by copying "
          f"the learned ones (Longformer)")


def load_hf(directory: str | Path, *, progress: bool = False, **kw):
  """Read an HF checkpoint directory into a jaxformers model; returns ``(model, report)``, the model in eval mode."""
  hf = read_hf_config(directory)
  family_and_task(hf, str(directory), kw.get("layout"))
  state = read_hf_weights(directory, progress=progress)
  return load_hf_state(state, hf, where=str(directory), progress=progress, **kw)


def label_names(hf: dict) -> tuple[str, ...] | None:
  """Class names from an HF config's ``id2label``; None when absent or only transformers' ``LABEL_i`` defaults."""
  id2label = hf.get("id2label") or {}
  try:
    names = tuple(str(id2label[k]) for k in sorted(id2label, key=int))
  except (ValueError, TypeError):
    return None
  return None if not names or names == tuple(f"LABEL_{i}" for i in range(len(names))) else names


def _exportable(cfg: EncoderConfig, where: str) -> str:
  """``"serial"`` or ``"parallel"``: every block is a post-LN block of a token mixer whose spec says ``hf_export``
  and a feed-forward, all serial or all parallel."""
  kinds = set(cfg.blocks)

  def layer(name: str) -> bool:
    spec = BLOCKS.get(name)
    return bool(spec.mixer) and MIXERS.get(spec.mixer).hf_export and spec.mlp and not spec.pre_ln
  bad = sorted(k for k in kinds if not layer(k))
  styles = {BLOCKS.get(k).parallel for k in kinds}
  if not bad and styles == {False}:
    return "serial"
  if not bad and styles == {True}:
    return "parallel"
  bad = bad or sorted(kinds)
  raise CheckpointError(f"{where}: layout {cfg.layout!r} cannot be written as an HF checkpoint: transformers' "
                        f"encoder models have one attention and one feed-forward per layer, serial or "
                        f"parallel, and this layout has {', '.join(bad)} blocks; keep it in the native format "
                        f"(jaxformers convert SRC DST, or use the run directory itself) and load it with "
                        f"jaxformers.from_pretrained")


def export_family(cfg: EncoderConfig, where: str) -> Family:
  """The registered family that writes a model of ``cfg.family`` with ``cfg``'s (serial or parallel) layout."""
  parallel = _exportable(cfg, where) == "parallel"
  family = for_export(cfg.family, parallel)
  if family is None:
    forms = ", ".join(f"{f.name} ({f.config_family})" for f in families() if f.parallel)
    raise CheckpointError(f"{where}: family {cfg.family!r} has no HF checkpoint form with "
                          f"{'parallel' if parallel else 'serial'} layers (layout {cfg.layout!r}); families with "
                          f"parallel layers: {forms}")
  return family


def to_hf_state(model, where: str = "model") -> tuple[dict[str, np.ndarray], dict]:
  """``(state_dict, config_dict)`` in HF layout for a model whose layout a registered family can write: serial
  blocks (BERT, RoBERTa, DistilBERT) or parallel blocks (PAF)."""
  cfg: EncoderConfig = model.config
  task = models.task_of(model)
  family = export_family(cfg, where)
  if cfg.quantization != "none":
    raise CheckpointError(f"{where}: an int8 ({cfg.quantization}) model has no HF checkpoint form; export the float "
                          f"model it was quantized from (and quantize the PyTorch one with torch's quantize_dynamic)")
  if cfg.num_heads_per_layer is not None or cfg.intermediate_sizes is not None:
    from jaxformers.prune import pad_to_full  # pruned heads and neurons are written as zero weights
    model = pad_to_full(model)
    cfg = model.config
  if task not in family.heads:
    raise CheckpointError(f"{where}: a {task} model cannot be written as a {family.name} checkpoint; "
                          f"{family.name} checkpoints hold the tasks {', '.join(family.heads)}")
  if task == "classification" and model.classifier.style != family.classifier:
    raise CheckpointError(f"{where}: a {model.classifier.style}-style classifier head cannot be written as a "
                          f"{family.name} checkpoint (HF's {family.name} classifier is {family.classifier}-style)")
  if not family.token_types and cfg.type_vocab_size:
    raise CheckpointError(f"{where}: {family.name} checkpoints have no token-type embeddings, and this model has "
                          f"type_vocab_size={cfg.type_vocab_size}")
  params = get_params(model)
  pre = "" if task == "base" else family.prefix + "."
  state = engine.export(params, [*family.rules, *family.heads[task]], num_layers=cfg.num_layers,
                        prefix="" if task == "base" else "encoder.", hf_prefix=pre, where=where)
  if family.extra_tensors is not None:
    state.update(family.extra_tensors(cfg, pre))
  try:
    config = hf_config(cfg, task, getattr(model, "num_labels", None), getattr(model, "label_names", None),
                       family=family)
  except CheckpointError as e:   # the family's config mapping refuses a value
    raise CheckpointError(f"{where}: {e}") from None
  return state, config


def hf_config(cfg: EncoderConfig, task: str, num_labels: int | None = None,
              label_names: tuple[str, ...] | None = None, family: Family | None = None) -> dict:
  family = family or export_family(cfg, "model")
  suffix = next(s for s, t in ARCHITECTURES.items() if t == task)
  out = {"architectures": [f"{family.architecture}{suffix}"], "model_type": family.model_type,
         **family.write_config(cfg), "tie_word_embeddings": True, "jaxformers": {"layout": cfg.layout}}
  if num_labels is not None:
    names = list(label_names) if label_names and len(label_names) == num_labels else \
        [f"LABEL_{i}" for i in range(num_labels)]
    out["id2label"] = {str(i): n for i, n in enumerate(names)}
    out["label2id"] = {n: i for i, n in enumerate(names)}
    if num_labels == 1 and task == "classification":
      out["problem_type"] = "regression"
  return out
