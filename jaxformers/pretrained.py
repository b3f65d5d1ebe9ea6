"""One entry point to load models: native jaxformers checkpoints and HF PyTorch directories.

A native checkpoint directory holds ``jaxformers.json`` (the model config, task and
head) and ``params/`` (the parameters, saved with orbax).
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
from flax import nnx

from jaxformers import models
from jaxformers.config import EncoderConfig
from jaxformers.convert.io import CheckpointError, check_destination, write_beside

NATIVE_CONFIG = "jaxformers.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1
# Tokenizer files a checkpoint directory may carry next to the model (replaced with it on overwrite).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt")

# Config fields that change only how a model computes, never its parameters.
RUNTIME_FIELDS = {"attention_impl", "fourier_impl", "fourier_padding", "fuse_projections", "hidden_dropout",
                  "attention_dropout", "dropout_impl", "dtype", "sparse_window", "sparse_global_tokens"}


def is_native(path: str | Path) -> bool:
  return (Path(path) / NATIVE_CONFIG).is_file()


def check_save_destination(path: str | Path, overwrite: bool = False) -> Path:
  """Raise :class:`CheckpointError` if :func:`save_pretrained` would refuse ``path`` (checked before converting)."""
  return check_destination(path, (NATIVE_CONFIG,), (PARAMS_DIR,), overwrite, "jaxformers checkpoint", TOKENIZER_FILES)


def save_pretrained(model, path: str | Path, overwrite: bool = False) -> Path:
  """Save a model as a native checkpoint directory: ``jaxformers.json`` and orbax ``params/``.

  ``path`` must be new or empty; with ``overwrite`` a non-empty one keeps its other files and only
  ``jaxformers.json`` and ``params/`` are replaced (refused if its ``params/`` is not an orbax checkpoint,
  or ``path`` is a file). Everything is written beside ``path`` first and renamed into place, so an
  interruption never leaves a half-written checkpoint and the previous one is removed only after the new
  one is complete."""
  import orbax.checkpoint as ocp
  meta = {"format_version": FORMAT_VERSION, "task": models.task_of(model), "config": model.config.to_dict(),
          "num_labels": getattr(model, "num_labels", None),
          "head": model.classifier.style if hasattr(model, "classifier") else None}

  def write(tmp: Path):
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(tmp / PARAMS_DIR, nnx.state(model, nnx.Param))
    (tmp / NATIVE_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
  return write_beside(path, write, (NATIVE_CONFIG,), (PARAMS_DIR,), overwrite, "jaxformers checkpoint",
                      TOKENIZER_FILES)


def _load_native(path: Path, *, layout=None, task=None, num_labels=None, head=None, rngs=None, **overrides):
  import orbax.checkpoint as ocp
  try:
    meta = json.loads((path / NATIVE_CONFIG).read_text())
    cfg = EncoderConfig.from_dict(meta["config"], source=str(path / NATIVE_CONFIG))
  except (json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
    raise CheckpointError(f"{path / NATIVE_CONFIG}: not a valid jaxformers model config ({e})") from None
  changes = {k: v for k, v in overrides.items() if k in RUNTIME_FIELDS}
  stray = sorted(set(overrides) - RUNTIME_FIELDS)
  wants_other = (layout is not None and layout != cfg.layout) or stray or \
      (task is not None and task != meta["task"]) or (num_labels is not None and num_labels != meta.get("num_labels"))
  if wants_other:
    # A different arrangement or head: go through the HF layout, which the converter re-arranges.
    from jaxformers.convert.hf import load_hf_state, to_hf_state
    model = _load_native(path)
    state, hf = to_hf_state(model, where=str(path))
    return load_hf_state(state, hf, where=str(path), layout=layout, task=task, num_labels=num_labels, head=head,
                         rngs=rngs, **overrides)[0]
  cfg = cfg.replace(**changes)
  build = lambda: models.build(meta["task"], cfg, num_labels=meta.get("num_labels"), head=meta.get("head"), rngs=rngs)
  abstract = nnx.eval_shape(build)
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  params_dir = path / PARAMS_DIR
  if not params_dir.exists():
    raise CheckpointError(f"{path}: no {PARAMS_DIR}/ directory next to {NATIVE_CONFIG}")
  with ocp.StandardCheckpointer() as ckpt:
    try:
      restored = ckpt.restore(params_dir, target)
    except (ValueError, KeyError) as e:
      raise CheckpointError(f"{params_dir}: parameters do not match {NATIVE_CONFIG} ({e})") from None
  model = build()
  nnx.update(model, restored)
  return model


def from_pretrained(path: str | Path, *, layout: str | None = None, task: str | None = None,
                    num_labels: int | None = None, head: str | None = None, rngs: nnx.Rngs | None = None,
                    progress: bool = False, return_report: bool = False, **overrides):
  """Load a model from a native jaxformers directory or an HF PyTorch checkpoint directory.

  ``layout`` re-arranges the weights into other blocks (e.g. ``"parallel*12"``,
  ``"fourier*10,serial*2"``); ``task`` picks the head (``base``, ``masked_lm``,
  ``pretraining``, ``classification``, ``token_classification``), defaulting to the
  checkpoint's own; ``overrides`` set other :class:`EncoderConfig` fields (e.g.
  ``attention_impl="xla"``, ``dtype="bfloat16"``). With ``return_report`` an HF
  conversion also returns its :class:`jaxformers.convert.Report`.
  """
  path = Path(path)
  if is_native(path):
    model = _load_native(path, layout=layout, task=task, num_labels=num_labels, head=head, rngs=rngs, **overrides)
    return (model, None) if return_report else model
  from jaxformers.convert.hf import load_hf
  model, report = load_hf(path, layout=layout, task=task, num_labels=num_labels, head=head, rngs=rngs,
                          progress=progress, **overrides)
  return (model, report) if return_report else model
