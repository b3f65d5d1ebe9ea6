"""One entry point to load models: native jaxformers checkpoints and HF PyTorch directories.

A native checkpoint directory holds ``jaxformers.json`` (the model config, task and
head) and ``params/`` (the parameters, saved with orbax).
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
from flax import nnx

from jaxformers import hub, models
from jaxformers.config import EncoderConfig
from jaxformers.convert.io import CheckpointError

NATIVE_CONFIG = "jaxformers.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1

# Config fields that change only how a model computes, never its parameters.
RUNTIME_FIELDS = {"attention_impl", "fourier_impl", "fourier_padding", "fuse_projections", "hidden_dropout",
                  "attention_dropout", "dropout_impl", "dtype", "sparse_window", "sparse_global_tokens"}


def is_native(path: str | Path) -> bool:
  return (Path(path) / NATIVE_CONFIG).is_file()


def save_pretrained(model, path: str | Path) -> Path:
  """Save a model as a native checkpoint directory (overwrites ``params/`` atomically via orbax)."""
  import orbax.checkpoint as ocp
  path = Path(path).absolute()
  path.mkdir(parents=True, exist_ok=True)
  meta = {"format_version": FORMAT_VERSION, "task": models.task_of(model), "config": model.config.to_dict(),
          "num_labels": getattr(model, "num_labels", None),
          "head": model.classifier.style if hasattr(model, "classifier") else None}
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path / PARAMS_DIR, nnx.state(model, nnx.Param), force=True)
  (path / NATIVE_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
  return path


def _read_meta(path: Path) -> tuple[dict, EncoderConfig]:
  try:
    meta = json.loads((path / NATIVE_CONFIG).read_text())
    return meta, EncoderConfig.from_dict(meta["config"], source=str(path / NATIVE_CONFIG))
  except (json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
    raise CheckpointError(f"{path / NATIVE_CONFIG}: not a valid jaxformers model config ({e})") from None


def _restore(path: Path, meta: dict, cfg: EncoderConfig, rngs: nnx.Rngs | None = None):
  """The model saved in ``path`` built for ``cfg`` (the saved config, runtime fields possibly changed)."""
  import orbax.checkpoint as ocp
  build = lambda: models.build(meta["task"], cfg, num_labels=meta.get("num_labels"), head=meta.get("head"), rngs=rngs)
  abstract = nnx.eval_shape(build)
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
  model = build()
  nnx.update(model, restored)
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
  from jaxformers.convert.native import rearrange
  return rearrange(model, layout=layout, task=task, num_labels=num_labels, head=head, rngs=rngs, where=str(path),
                   progress=progress, **{k: v for k, v in overrides.items() if k not in RUNTIME_FIELDS})


def from_pretrained(path: str | Path, *, revision: str | None = None, layout: str | None = None,
                    task: str | None = None, num_labels: int | None = None, head: str | None = None,
                    rngs: nnx.Rngs | None = None, progress: bool = False, return_report: bool = False, **overrides):
  """Load a model, in eval mode, from a native jaxformers directory, an HF PyTorch checkpoint directory or a
  Hugging Face Hub id (``"bert-base-uncased"``, ``"org/name"``; ``revision`` picks a branch, tag or commit).

  ``layout`` re-arranges the weights into other blocks (e.g. ``"parallel*12"``,
  ``"fourier*10,serial*2"``); ``task`` picks the head (``base``, ``masked_lm``,
  ``pretraining``, ``classification``, ``token_classification``), defaulting to the
  checkpoint's own; ``overrides`` set other :class:`EncoderConfig` fields (e.g.
  ``attention_impl="xla"``, ``dtype="bfloat16"``). With ``return_report`` a conversion or
  re-arrangement also returns its :class:`jaxformers.convert.Report` (None for a native
  checkpoint loaded as saved). ``model.train()`` switches dropout on for fine-tuning.
  """
  path = hub.resolve(path, revision)
  if is_native(path):
    model, report = _load_native(path, layout=layout, task=task, num_labels=num_labels, head=head, rngs=rngs,
                                 progress=progress, **overrides)
  else:
    from jaxformers.convert.hf import load_hf
    model, report = load_hf(path, layout=layout, task=task, num_labels=num_labels, head=head, rngs=rngs,
                            progress=progress, **overrides)
  return (model, report) if return_report else model
