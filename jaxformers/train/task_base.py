"""What a run learns: one small object per task kind, owning its head, loss, metrics, best metric and predictions.

The trainer (:mod:`jaxformers.train.loop`) calls only the methods of :class:`Task`; it never asks
which kind of task it runs. A new task kind is a subclass registered in :data:`TASKS`, chosen by
``config.task``; a task that changes how another one trains (distillation, architecture search) wraps it
(:class:`TaskWrapper`). Hooks that need the run get a :class:`jaxformers.train.context.TaskContext` of plain
values and return what the trainer should apply. :func:`jaxformers.train.tasks.make_task` builds every task.
"""
from __future__ import annotations

import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxformers import models
from jaxformers.data import sources, tokenize
from jaxformers.registry import Registry
from jaxformers.train import metrics as metrics_lib
from jaxformers.train import optim, sharding, steps
from jaxformers.train.context import FollowUp, TaskContext

TASKS: Registry = Registry("task")


def forward(model, batch, max_segments: int | None = None, **kw):
  """``model`` on a padded (``attention_mask``) or packed (``segment_ids``) batch."""
  if "segment_ids" in batch:
    return model(batch["input_ids"], token_type_ids=batch["token_type_ids"], segment_ids=batch["segment_ids"],
                 max_segments=max_segments, **kw)
  return model(batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"],
               **kw)


class Task:
  """One kind of learning problem on one data source.

  ``model_task`` is the head :func:`jaxformers.models.build` / ``from_pretrained`` make;
  ``per_token`` says whether labels and weights are per token (``[batch, length]``) or per example.
  Every attribute and method here is part of the interface a :class:`TaskWrapper` forwards.
  """
  name = ""
  model_task = ""
  per_token = False
  can_predict = True
  param_filter = nnx.Param     # what the optimizer learns (the rest of the model's state is carried along)

  def __init__(self, source: sources.Source, c):
    self.source = source
    self.data_cfg = data_cfg = c.data
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

  def prepare(self, ctx: TaskContext) -> None:
    """Called once the run knows its model config, tokenizer and mesh: load what the loss needs."""

  def adapt_pretrained(self, model):
    """The model ``init_from`` loaded, made the model this task trains (its parameters are the run's first);
    the model itself for most tasks."""
    return model

  def inputs(self):
    """Fixed arrays the jitted steps take besides state and batch (a teacher's parameters), already placed on
    the run's mesh; an empty dict for most tasks."""
    return {}

  # --- training (the trainer's hooks; a task that learns more than weights, e.g. a search, overrides them) ----
  def optimizer(self, c, total_steps: int):
    """``(optax transformation, learning-rate schedule)`` of the run's parameters."""
    return optim.adamw(c.optim, total_steps)

  def make_train_step(self, graphdef, tx, lr_fn, accum_steps: int = 1, max_segments: int | None = None):
    return steps.make_train_step(graphdef, tx, lr_fn, self, accum_steps, max_segments)

  def train_batches(self, ctx: TaskContext, batches):
    """The iterator of host training batches the step takes (with ``state()`` / ``restore()`` for resuming)."""
    return batches

  def batch_shardings(self, ctx: TaskContext) -> dict:
    """The shardings of the arrays of :meth:`train_batches`' batches."""
    return sharding.batch_shardings(ctx.mesh, packed=bool(ctx.data.packing), per_token=self.per_token)

  def log_metrics(self, metrics: dict) -> dict:
    """Extra values written with each train log line, from the step's metrics."""
    return {}

  def finish(self, ctx: TaskContext, state, summary: dict) -> dict:
    """Called at the end of training with the final state; the entries it returns are added to ``summary``
    (written to summary.json)."""
    return {}

  def follow_up(self, ctx: TaskContext, summary: dict) -> FollowUp | None:
    """A run for the trainer to start once training has finished (``summary``: its summary), or None."""
    return None

  def record_follow_up(self, ctx: TaskContext, summary: dict, follow: FollowUp, result: dict) -> dict:
    """The summary the run returns (and rewrites summary.json with) once :meth:`follow_up`'s run ``follow`` has
    finished with ``result``."""
    return summary

  # --- loss (inside the jitted step) --------------------------------------------------------------------------
  def loss(self, model, batch, inputs, max_segments: int | None = None):
    """``(loss_sum, weight_sum, correct_sum, logits)`` of ``model`` on ``batch``; the step divides by the weight."""
    logits = forward(model, batch, max_segments)
    return (*self.loss_terms(logits, batch), logits)

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
  name = "classification"
  model_task = models.TRAINER_TASKS[name]

  def examples(self, split: str) -> sources.Examples:
    ex = super().examples(split)
    if ex.label is not None:
      bad = np.nonzero((ex.label < 0) | (ex.label >= self.num_labels))[0]
      if len(bad):
        raise sources.DataError(f"{ex.origin}: example {bad[0]} has label {ex.label[bad[0]]}, outside the "
                                f"task's range 0..{self.num_labels - 1} (config.data.num_labels={self.num_labels}; "
                                f"set it and config.data.label_names to the data's classes)")
    return ex


@TASKS.register("regression")
class Regression(Task):
  """One real-valued target per example (a classification head with one output), squared error."""
  name = "regression"
  model_task = models.TRAINER_TASKS[name]

  def loss_terms(self, logits, batch):
    w = batch["weights"]
    per = jnp.square(logits.astype(jnp.float32)[..., 0] - batch["labels"].astype(jnp.float32))
    return jnp.sum(per * w), jnp.sum(w), jnp.zeros((), jnp.float32)

  def eval_metrics(self, data, outputs, sums) -> dict:
    return {"loss": sums[0] / max(sums[1], 1.0), **metrics_lib.regression_metrics(data.label, outputs[:, 0])}

  def write_predictions(self, outputs: np.ndarray, path: Path) -> None:
    path.write_text("\n".join(["index\tprediction"] + [f"{i}\t{float(r[0]):.3f}" for i, r in enumerate(outputs)])
                    + "\n")


class TextTask(Task):
  """A task on the source's plain texts (no labels): the best checkpoint has the lowest eval loss, no predictions."""
  per_token = False
  can_predict = False

  def __init__(self, source, c):
    self.source, self.data_cfg = source, c.data
    self.num_labels, self.label_names, self.metric = 0, None, "loss"
    self.eval_splits = source.eval_splits(c.data)

  @property
  def head_labels(self) -> None:
    return None

  def examples(self, split: str) -> sources.Examples:
    return sources.Examples(self.source.texts(self.data_cfg, split), None, None, f"{self.data_cfg.source}:{split}")

  def eval_outputs(self, logits):
    return None

  def eval_metrics(self, data, outputs, sums) -> dict:
    return {"loss": sums[0] / max(sums[1], 1.0)}

  def best_metric(self) -> tuple[str, str]:
    return f"{self.eval_splits[0]}/loss", "min"


@TASKS.register("mlm")
class MaskedLM(TextTask):
  """Masked-LM training on the source's texts: dynamic masking (``data.mlm_probability``, 80/10/10)."""
  name = "mlm"
  model_task = models.TRAINER_TASKS[name]
  per_token = True

  def mlm_options(self, tok, special: dict) -> dict:
    if special["mask"] is None:
      raise sources.DataError("task=mlm needs a tokenizer with a [MASK] / <mask> token")
    specials = tuple(v for k, v in special.items() if v is not None and k != "mask")
    return {"mask_id": special["mask"], "vocab_size": tok.get_vocab_size(), "special_ids": specials,
            "prob": self.data_cfg.mlm_probability}

  def eval_metrics(self, data, outputs, sums) -> dict:
    loss = sums[0] / max(sums[1], 1.0)
    return {"loss": loss, "accuracy": sums[2] / max(sums[1], 1.0), "perplexity": math.exp(min(loss, 50.0))}


class TaskWrapper(Task):
  """A task that changes how another one (``inner``) trains: every attribute and method of :class:`Task` is
  ``inner``'s, forwarded one by one below, until a subclass replaces it (the distillation's loss, the search's
  model and step). Nothing is forwarded implicitly: a method added to :class:`Task` must be added here too
  (tests/test_structure.py checks that none is missing)."""

  def __init__(self, inner: Task):
    """Wrap ``inner``, whose data, labels and metrics this task keeps (Task.__init__ is not called)."""
    self.inner = inner

  # --- what the task is (inner's) ------------------------------------------------------------------------------
  @property
  def name(self) -> str:
    return self.inner.name

  @property
  def model_task(self) -> str:
    return self.inner.model_task

  @property
  def per_token(self) -> bool:
    return self.inner.per_token

  @property
  def can_predict(self) -> bool:
    return self.inner.can_predict

  @property
  def param_filter(self):
    return self.inner.param_filter

  @property
  def source(self) -> sources.Source:
    return self.inner.source

  @property
  def data_cfg(self):
    return self.inner.data_cfg

  @property
  def num_labels(self) -> int:
    return self.inner.num_labels

  @property
  def label_names(self):
    return self.inner.label_names

  @property
  def metric(self) -> str:
    return self.inner.metric

  @property
  def eval_splits(self):
    return self.inner.eval_splits

  @property
  def head_labels(self) -> int | None:
    return self.inner.head_labels

  # --- model and data --------------------------------------------------------------------------------------------
  def build_model(self, cfg, rngs):
    return self.inner.build_model(cfg, rngs)

  def examples(self, split: str) -> sources.Examples:
    return self.inner.examples(split)

  def mlm_options(self, tok, special: dict) -> dict | None:
    return self.inner.mlm_options(tok, special)

  def prepare(self, ctx: TaskContext) -> None:
    self.inner.prepare(ctx)

  def adapt_pretrained(self, model):
    return self.inner.adapt_pretrained(model)

  def inputs(self):
    return self.inner.inputs()

  # --- training --------------------------------------------------------------------------------------------------
  def optimizer(self, c, total_steps: int):
    return self.inner.optimizer(c, total_steps)

  def make_train_step(self, graphdef, tx, lr_fn, accum_steps: int = 1, max_segments: int | None = None):
    return self.inner.make_train_step(graphdef, tx, lr_fn, accum_steps, max_segments)

  def train_batches(self, ctx: TaskContext, batches):
    return self.inner.train_batches(ctx, batches)

  def batch_shardings(self, ctx: TaskContext) -> dict:
    return self.inner.batch_shardings(ctx)

  def log_metrics(self, metrics: dict) -> dict:
    return self.inner.log_metrics(metrics)

  def finish(self, ctx: TaskContext, state, summary: dict) -> dict:
    return self.inner.finish(ctx, state, summary)

  def follow_up(self, ctx: TaskContext, summary: dict) -> FollowUp | None:
    return self.inner.follow_up(ctx, summary)

  def record_follow_up(self, ctx: TaskContext, summary: dict, follow: FollowUp, result: dict) -> dict:
    return self.inner.record_follow_up(ctx, summary, follow, result)

  # --- loss and evaluation ---------------------------------------------------------------------------------------
  def loss(self, model, batch, inputs, max_segments: int | None = None):
    return self.inner.loss(model, batch, inputs, max_segments)

  def loss_terms(self, logits, batch):
    return self.inner.loss_terms(logits, batch)

  def eval_outputs(self, logits):
    return self.inner.eval_outputs(logits)

  def eval_metrics(self, data: tokenize.Tokenized, outputs: np.ndarray | None, sums: np.ndarray) -> dict:
    return self.inner.eval_metrics(data, outputs, sums)

  def best_metric(self) -> tuple[str, str]:
    return self.inner.best_metric()

  def write_predictions(self, outputs: np.ndarray, path: Path) -> None:
    self.inner.write_predictions(outputs, path)
