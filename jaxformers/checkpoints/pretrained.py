"""One entry point to load models: native jaxformers checkpoints and HF PyTorch directories.

A native checkpoint directory holds ``jaxformers.json`` (the model config, task and
head) and ``params/`` (the parameters, saved with orbax).
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxformers import models
from jaxformers.blocks import BLOCKS
from jaxformers.checkpoints import hub, runs
from jaxformers.checkpoints.files import check_destination, write_beside
from jaxformers.checkpoints.tokenizers import (HF_TOKENIZER_FILES, copy_tokenizer_files, sentence_transformers_config,
                                               write_hf_tokenizer)
from jaxformers.checkpoints.workdir import is_run_dir, tokenizer_dir
from jaxformers.config import RUNTIME_FIELDS, EncoderConfig
from jaxformers.convert.hf import load_hf, to_hf_state
from jaxformers.convert.io import SAFETENSORS, write_hf_files
from jaxformers.convert.native import rearrange as native_rearrange
from jaxformers.errors import CheckpointError
from jaxformers.layout import parse_layout

NATIVE_CONFIG = "jaxformers.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1


def export_hf(model, directory: str | Path, tokenizer=None, overwrite: bool = False) -> Path:
  """Write ``config.json`` + ``model.safetensors`` that transformers loads, and with ``tokenizer`` (a checkpoint
  or run directory, a ``tokenizer.json`` file or a ``tokenizers.Tokenizer``) its tokenizer files, so that
  ``transformers.pipeline(..., model=directory)`` needs nothing else. ``directory`` must be new or empty; with
  ``overwrite`` a non-empty one keeps its other files and gets those replaced (written beside it first, then
  renamed into place: an interruption never leaves a half-written checkpoint)."""
  state, config = to_hf_state(model, where=str(directory))

  def write(tmp: Path):
    write_hf_files(tmp, config, state)
    if tokenizer is not None:
      write_hf_tokenizer(tokenizer, tmp, model_max_length=model.config.max_length)
  return write_beside(directory, write, ("config.json", SAFETENSORS), (), overwrite, "HF checkpoint",
                      HF_TOKENIZER_FILES)


def is_native(path: str | Path) -> bool:
  return (Path(path) / NATIVE_CONFIG).is_file()


def check_save_destination(path: str | Path, overwrite: bool = False) -> Path:
  """Raise :class:`CheckpointError` if :func:`save_pretrained` would refuse ``path`` (checked before converting)."""
  return check_destination(path, (NATIVE_CONFIG,), (PARAMS_DIR,), overwrite, "jaxformers checkpoint",
                           HF_TOKENIZER_FILES)


def save_pretrained(model, path: str | Path, overwrite: bool = False, tokenizer: str | Path | None = None) -> Path:
  """Save a model as a native checkpoint directory: ``jaxformers.json`` and orbax ``params/`` (and with
  ``tokenizer``, a checkpoint or run directory, its tokenizer files; a sentence-transformers directory's pooling,
  normalisation and maximum length are kept in ``jaxformers.json["encode"]`` for :func:`jaxformers.encode`).

  ``path`` must be new or empty; with ``overwrite`` a non-empty one keeps its other files and only
  ``jaxformers.json`` and ``params/`` are replaced (refused if its ``params/`` is not an orbax checkpoint,
  or ``path`` is a file). Everything is written beside ``path`` first and renamed into place, so an
  interruption never leaves a half-written checkpoint and the previous one is removed only after the new
  one is complete."""
  meta = {"format_version": FORMAT_VERSION, "task": models.task_of(model), "config": model.config.to_dict(),
          "num_labels": getattr(model, "num_labels", None),
          "head": model.classifier.style if hasattr(model, "classifier") else None,
          "label_names": list(getattr(model, "label_names", None) or []) or None}
  if tokenizer is not None:    # a sentence-transformers source's pooling, normalisation and length go with the model
    try:
      settings = sentence_transformers_config(tokenizer_dir(tokenizer))
    except ValueError:        # pooling modes encode cannot run: nothing to keep (encode on the source says why)
      settings = {}
    if settings:
      meta["encode"] = settings

  def write(tmp: Path):
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(tmp / PARAMS_DIR, nnx.state(model, nnx.Param))
    (tmp / NATIVE_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    if tokenizer is not None:
      copy_tokenizer_files(tokenizer, tmp)
  return write_beside(path, write, (NATIVE_CONFIG,), (PARAMS_DIR,), overwrite, "jaxformers checkpoint",
                      HF_TOKENIZER_FILES)


def _read_meta(path: Path) -> tuple[dict, EncoderConfig]:
  try:
    meta = json.loads((path / NATIVE_CONFIG).read_text())
    return meta, EncoderConfig.from_dict(meta["config"], source=str(path / NATIVE_CONFIG))
  except (json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
    raise CheckpointError(f"{path / NATIVE_CONFIG}: not a valid jaxformers model config ({e})") from None


def _restore(path: Path, meta: dict, cfg: EncoderConfig, rngs: nnx.Rngs | None = None):
  """The model saved in ``path`` built for ``cfg`` (the saved config, runtime fields possibly changed)."""
  def build(r=rngs):
    return models.build(meta["task"], cfg, num_labels=meta.get("num_labels"), head=meta.get("head"), rngs=r)
  abstract = nnx.eval_shape(lambda: build(nnx.Rngs(0)))   # rngs made outside cannot be advanced inside a trace
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  params_dir = path.absolute() / PARAMS_DIR   # orbax takes absolute paths only
  if not params_dir.exists():
    raise CheckpointError(f"{path}: no {PARAMS_DIR}/ directory next to {NATIVE_CONFIG}")
  with ocp.StandardCheckpointer() as ckpt:
    try:
      restored = ckpt.restore(params_dir, target)
    except (ValueError, KeyError) as e:
      raise CheckpointError(f"{params_dir}: parameters do not match {NATIVE_CONFIG} ({e})") from None
  model = build(rngs)
  nnx.update(model, restored)
  if meta.get("label_names"):
    model.label_names = tuple(meta["label_names"])
  return model


def _load_native(path: Path, *, layout=None, task=None, num_labels=None, head=None, rngs=None, progress=False,
                 **overrides):
  """``(model, None)`` as saved, or ``(model, report)`` re-arranged / re-headed directly from the saved parameters."""
  meta, cfg = _read_meta(path)
  as_saved = layout in (None, cfg.layout) and task in (None, meta["task"]) and \
      num_labels in (None, meta.get("num_labels")) and head in (None, meta.get("head")) and \
      set(overrides) <= RUNTIME_FIELDS
  runtime = {k: v for k, v in overrides.items() if k in RUNTIME_FIELDS}
  model = _restore(path, meta, cfg.replace(**runtime), rngs if as_saved else None)
  if as_saved:
    model.eval()
    return model, None
  return rearrange(model, str(path), layout=layout, task=task, num_labels=num_labels, head=head, rngs=rngs,
                   progress=progress, **overrides)


def wants_rearrangement(model, *, layout=None, task=None, num_labels=None, head=None, overrides=()) -> bool:
  """Whether loading ``model`` with these arguments needs other blocks or another head than it has."""
  return (layout is not None and layout != model.config.layout) or bool(set(overrides) - RUNTIME_FIELDS) or \
      (task is not None and task != models.task_of(model)) or \
      (num_labels is not None and num_labels != getattr(model, "num_labels", None)) or \
      (head is not None and head != getattr(getattr(model, "classifier", None), "style", None))


def rearrange(model, where: str, *, layout=None, task=None, num_labels=None, head=None, rngs=None, progress=False,
              **overrides):
  """``(model, report)``: ``model``'s weights in another layout, task or head (runtime ``overrides`` applied as
  they are), in eval mode; label names carry over when the head does."""
  new, report = native_rearrange(model, layout=layout, task=task, num_labels=num_labels, head=head, rngs=rngs,
                                 where=where, progress=progress, **overrides)
  names = getattr(model, "label_names", None)
  if names and getattr(new, "num_labels", None) == len(names) and models.task_of(new) == models.task_of(model):
    new.label_names = names
  new.eval()
  return new, report


def saved_layout(path: str | Path, revision: str | None = None) -> tuple[str, ...]:
  """The blocks of the model that :func:`from_pretrained` would load from ``path`` as saved, read from its metadata
  only (an HF checkpoint is a stack of serial layers)."""
  path = hub.resolve(path, revision)
  if is_run_dir(path):
    return parse_layout(runs.read_meta(runs.step_dir(path))["model_config"]["layout"], BLOCKS.names())
  if is_native(path):
    return _read_meta(Path(path))[1].blocks
  return ("serial",)


def from_pretrained(path: str | Path, *, revision: str | None = None, layout: str | None = None,
                    task: str | None = None, num_labels: int | None = None, head: str | None = None,
                    rngs: nnx.Rngs | None = None, progress: bool = False, return_report: bool = False, **overrides):
  """Load a model, in eval mode, from a native jaxformers directory, a training run's directory, an HF PyTorch
  checkpoint directory or a Hugging Face Hub id (``"bert-base-uncased"``, ``"org/name"``; ``revision`` picks a
  branch, tag or commit). A run directory (``train.py --workdir``) gives its task model with the best saved
  parameters, else the latest; ``WORKDIR/checkpoints/N`` a given state.

  ``layout`` re-arranges the weights into other blocks (e.g. ``"parallel*12"``,
  ``"fourier*10,serial*2"``); ``task`` picks the head (``base``, ``masked_lm``,
  ``pretraining``, ``classification``, ``token_classification``), defaulting to the
  checkpoint's own; ``overrides`` set other :class:`EncoderConfig` fields (e.g.
  ``attention_impl="xla"``, ``dtype="bfloat16"``). With ``return_report`` a conversion or
  re-arrangement also returns its :class:`jaxformers.convert.Report` (None for a native
  checkpoint loaded as saved). ``model.train()`` switches dropout on for fine-tuning.
  """
  path = hub.resolve(path, revision)
  if is_run_dir(path):   # a train.py work directory, WORKDIR/best or WORKDIR/checkpoints/N
    step = runs.step_dir(path)
    model, report = runs.restore(step, rngs=rngs, **{k: v for k, v in overrides.items() if k in RUNTIME_FIELDS}), None
    if wants_rearrangement(model, layout=layout, task=task, num_labels=num_labels, head=head, overrides=overrides):
      model, report = rearrange(model, str(step), layout=layout, task=task, num_labels=num_labels, head=head,
                                rngs=rngs, progress=progress, **overrides)
  elif is_native(path):
    model, report = _load_native(path, layout=layout, task=task, num_labels=num_labels, head=head, rngs=rngs,
                                 progress=progress, **overrides)
  else:
    model, report = load_hf(path, layout=layout, task=task, num_labels=num_labels, head=head, rngs=rngs,
                            progress=progress, **overrides)
  return (model, report) if return_report else model
