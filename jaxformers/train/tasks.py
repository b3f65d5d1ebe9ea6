"""What a run learns: one small object per task kind, owning its head, loss, metrics, best metric and predictions.

The trainer (:mod:`jaxformers.train.loop`) calls only the methods of :class:`Task`; it never asks
which kind of task it runs. A new task (distillation, architecture search, ...) is a subclass
registered in :data:`TASKS`, chosen by ``config.task``.
"""
from __future__ import annotations

import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax

from jaxformers import models
from jaxformers.data import sources, tokenize
from jaxformers.registry import Registry
from jaxformers.train import metrics as metrics_lib

TASKS: Registry = Registry("task")


class Task:
  """One kind of learning problem on one data source.

  ``model_task`` is the head :func:`jaxformers.models.build` / ``from_pretrained`` make;
  ``per_token`` says whether labels and weights are per token (``[batch, length]``) or per example.
  """
  name = ""
  model_task = ""
  per_token = False
  can_predict = True

  def __init__(self, source: sources.Source, data_cfg):
    self.source = source
    self.data_cfg = data_cfg
    labels = source.labels(data_cfg)
    self.num_labels = labels.num_labels
    self.label_names = labels.names
    self.metric = labels.metric
    self.eval_splits = source.eval_splits(data_cfg)

  # --- model ---------------------------------------------------------------------------------------------------
  @property
  def head_labels(self) -> int | None:
    """``num_labels`` of the model's head (None: the head has no label dimension)."""
    return self.num_labels

  def build_model(self, cfg, rngs):
    return models.build(self.model_task, cfg, num_labels=self.head_labels, rngs=rngs)

  # --- data ----------------------------------------------------------------------------------------------------
  def examples(self, split: str) -> sources.Examples:
    return self.source.examples(self.data_cfg, split)

  def mlm_options(self, tok, special: dict) -> dict | None:
    """Dynamic masking settings for the batcher (masked-LM tasks only)."""
    return None

  # --- loss (inside the jitted step) --------------------------------------------------------------------------
  def loss_terms(self, logits, batch):
    """Sum of per-example (or per-token) losses, sum of weights and sum of correct predictions."""
    logits = logits.astype(jnp.float32)
    w = batch["weights"]
    per = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    correct = jnp.sum((jnp.argmax(logits, -1) == batch["labels"]) * w)
    return jnp.sum(per * w), jnp.sum(w), correct

  def eval_outputs(self, logits):
    """What the eval step returns per example for :meth:`eval_metrics` and :meth:`write_predictions`."""
    return logits.astype(jnp.float32)

  # --- evaluation ----------------------------------------------------------------------------------------------
  def eval_metrics(self, data: tokenize.Tokenized, outputs: np.ndarray | None, sums: np.ndarray) -> dict:
    """Metrics of one eval split from the per-example ``outputs`` (in data order) and the summed
    ``(loss, weight, correct)``."""
    loss = sums[0] / max(sums[1], 1.0)
    return {"loss": loss, **metrics_lib.classification_metrics(data.label, outputs.argmax(-1), self.metric)}

  def best_metric(self) -> tuple[str, str]:
    """The eval entry that picks the best checkpoint, and whether larger (``max``) or smaller is better."""
    return f"{self.eval_splits[0]}/{self.metric}", "max"

  def write_predictions(self, outputs: np.ndarray, path: Path) -> None:
    lines = ["index\tprediction"]
    for i, row in enumerate(outputs):
      k = int(row.argmax())
      lines.append(f"{i}\t{self.label_names[k] if self.label_names else k}")
    path.write_text("\n".join(lines) + "\n")


@TASKS.register("classification")
class Classification(Task):
  name = model_task = "classification"

  def examples(self, split: str) -> sources.Examples:
    ex = super().examples(split)
    if ex.label is not None:
      bad = np.nonzero((ex.label < 0) | (ex.label >= self.num_labels))[0]
      if len(bad):
        raise sources.DataError(f"{ex.origin}: example {bad[0]} has label {ex.label[bad[0]]}, outside the "
                                f"task's range 0..{self.num_labels - 1}")
    return ex


@TASKS.register("regression")
class Regression(Task):
  """One real-valued target per example (a classification head with one output), squared error."""
  name = "regression"
  model_task = "classification"

  def loss_terms(self, logits, batch):
    w = batch["weights"]
    per = jnp.square(logits.astype(jnp.float32)[..., 0] - batch["labels"].astype(jnp.float32))
    return jnp.sum(per * w), jnp.sum(w), jnp.zeros((), jnp.float32)

  def eval_metrics(self, data, outputs, sums) -> dict:
    return {"loss": sums[0] / max(sums[1], 1.0), **metrics_lib.regression_metrics(data.label, outputs[:, 0])}

  def write_predictions(self, outputs: np.ndarray, path: Path) -> None:
    path.write_text("\n".join(["index\tprediction"] + [f"{i}\t{float(r[0]):.3f}" for i, r in enumerate(outputs)])
                    + "\n")


@TASKS.register("mlm")
class MaskedLM(Task):
  """Masked-LM training on the source's texts: dynamic masking (``data.mlm_probability``, 80/10/10)."""
  name = "mlm"
  model_task = "masked_lm"
  per_token = True
  can_predict = False

  def __init__(self, source, data_cfg):
    self.source, self.data_cfg = source, data_cfg
    self.num_labels, self.label_names, self.metric = 0, None, "loss"
    self.eval_splits = source.eval_splits(data_cfg)

  @property
  def head_labels(self) -> None:
    return None

  def examples(self, split: str) -> sources.Examples:
    return sources.Examples(self.source.texts(self.data_cfg, split), None, None, f"{self.data_cfg.source}:{split}")

  def mlm_options(self, tok, special: dict) -> dict:
    if special["mask"] is None:
      raise sources.DataError("task=mlm needs a tokenizer with a [MASK] / <mask> token")
    specials = tuple(v for k, v in special.items() if v is not None and k != "mask")
    return {"mask_id": special["mask"], "vocab_size": tok.get_vocab_size(), "special_ids": specials,
            "prob": self.data_cfg.mlm_probability}

  def eval_outputs(self, logits):
    return None

  def eval_metrics(self, data, outputs, sums) -> dict:
    loss = sums[0] / max(sums[1], 1.0)
    return {"loss": loss, "accuracy": sums[2] / max(sums[1], 1.0), "perplexity": math.exp(min(loss, 50.0))}

  def best_metric(self) -> tuple[str, str]:
    return f"{self.eval_splits[0]}/loss", "min"


def make_task(c) -> Task:
  """The task ``config.task`` names, on the data ``config.data`` describes; a supervised task follows its data's
  labels (one label = a regression, whatever ``config.task`` says)."""
  source = sources.get_source(c.data)
  source.check(c.data)
  name = c.task
  if name in ("classification", "regression"):
    name = "regression" if source.labels(c.data).regression else "classification"
  return TASKS.get(name)(source, c.data)

