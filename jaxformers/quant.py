"""Post-training int8 quantization of a model, and its size.

``quantize(model, "int8")`` returns a new model whose every dense layer (attention projections, feed-forward,
pooler and task head, as PyTorch's ``quantize_dynamic`` does with every ``nn.Linear``) stores an int8 kernel with
one float32 scale per output channel and quantises its input per token at run time
(:class:`jaxformers.layers.quant.Int8Dense`); embeddings and LayerNorms stay float. The config says
``quantization="int8"``, so ``save_pretrained`` / ``from_pretrained`` keep it as it is, and ``encode`` and the
trainer's eval run it like any model. Quantization-aware fine-tuning is the config's ``quant_aware`` (a runtime
field: ``config.model.quant_aware=True`` in ``train.py``), after which ``quantize`` converts the trained model.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from flax import nnx

from jaxformers import models
from jaxformers.layers.quant import quantize_kernel
from jaxformers.params import get_params, set_params

MODES = ("int8",)


def quantize(model, mode: str = "int8", rngs: nnx.Rngs | None = None):
  """An int8 copy of ``model`` (eval mode); ``model`` is left as it is."""
  if mode not in MODES:
    raise ValueError(f"quantize mode {mode!r}: expected one of {', '.join(MODES)}")
  cfg = model.config
  if cfg.quantization == mode:
    return model
  if cfg.quantization != "none":
    raise ValueError(f"the model is already quantized ({cfg.quantization})")
  target = cfg.replace(quantization=mode, quant_aware=False)
  head = model.classifier.style if hasattr(model, "classifier") else None
  labels = getattr(model, "num_labels", None)
  new = nnx.eval_shape(lambda: models.build(models.task_of(model), target, num_labels=labels, head=head,
                                            rngs=nnx.Rngs(0)))
  want = {".".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(new, nnx.Param))}
  old = get_params(model)
  out = {}
  for path in want:
    if path.endswith(".kernel_scale"):
      continue
    if path.endswith(".kernel") and f"{path}_scale" in want:
      out[path], out[f"{path}_scale"] = quantize_kernel(old[path])
    else:
      out[path] = old[path]
  new = models.build(models.task_of(model), target, num_labels=labels, head=head, rngs=rngs)
  set_params(new, out)
  if getattr(model, "label_names", None):
    new.label_names = model.label_names
  new.eval()
  return new


def size_report(model) -> dict:
  """Parameters and the bytes they take in memory, split into int8 and float."""
  n, b, n8 = 0, 0, 0
  for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    a = v[...]
    n += a.size
    b += a.size * a.dtype.itemsize
    n8 += a.size if a.dtype == np.int8 else 0
  return {"params": int(n), "bytes": int(b), "int8_params": int(n8)}


def dir_bytes(path) -> int:
  """Bytes of every file under ``path`` (a checkpoint's size on disk)."""
  return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
