"""What a run learns: one small object per task kind, owning its head, loss, metrics, best metric and predictions.

The trainer (:mod:`jaxformers.train.loop`) calls only the methods of :class:`Task`; it never asks
which kind of task it runs. A new task (distillation, architecture search, ...) is a subclass
registered in :data:`TASKS`, chosen by ``config.task``.
"""
from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxformers import models
from jaxformers.checkpoints import hub
from jaxformers.checkpoints.tokenizers import has_tokenizer, load_tokenizer
from jaxformers.checkpoints.workdir import tokenizer_dir
from jaxformers.data import sources, tokenize
from jaxformers.errors import CheckpointError, ConfigError
from jaxformers.registry import Registry
from jaxformers.train import metrics as metrics_lib

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
  """
  name = ""
  model_task = ""
  per_token = False
  can_predict = True

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

  def prepare(self, run) -> None:
    """Called once the run knows its model config (``run.cfg``) and mesh: load what the loss needs."""

  def inputs(self):
    """Fixed arrays the jitted steps take besides state and batch (a teacher's parameters), already placed on
    the run's mesh; an empty dict for most tasks."""
    return {}

  # --- training (the trainer's hooks; a task that learns more than weights, e.g. a search, overrides them) ----
  def optimizer(self, c, total_steps: int):
    """``(optax transformation, learning-rate schedule)`` of the run's parameters."""
    from jaxformers.train import optim
    return optim.adamw(c.optim, total_steps)

  def make_train_step(self, graphdef, tx, lr_fn, accum_steps: int = 1, max_segments: int | None = None):
    from jaxformers.train import steps
    return steps.make_train_step(graphdef, tx, lr_fn, self, accum_steps, max_segments)

  def train_batches(self, run, batches):
    """The iterator of host training batches the step takes (with ``state()`` / ``restore()`` for resuming)."""
    return batches

  def batch_shardings(self, run) -> dict:
    return run.batch_shardings()

  def log_metrics(self, metrics: dict) -> dict:
    """Extra values written with each train log line, from the step's metrics."""
    return {}

  def finish(self, run, state, summary: dict) -> None:
    """Called at the end of training with the final state; may add to ``summary`` (written to summary.json)."""

  def after_training(self, run, summary: dict, run_fn) -> dict:
    """What ``jaxformers.train.run`` returns after training; ``run_fn`` (that function) may start a follow-up run."""
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
  name = model_task = "classification"

  def examples(self, split: str) -> sources.Examples:
    ex = super().examples(split)
    if ex.label is not None:
      bad = np.nonzero((ex.label < 0) | (ex.label >= self.num_labels))[0]
      if len(bad):
        raise sources.DataError(f"{ex.origin}: example {bad[0]} has label {ex.label[bad[0]]}, outside the "
                                f"task's range 0..{self.num_labels - 1} (config.data.num_labels={self.num_labels}; set it and "
                                f"config.data.label_names to the data's classes)")
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
  model_task = "masked_lm"
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


def make_task(c) -> Task:
  """The task ``config.task`` names, on the data ``config.data`` describes; a supervised task follows its data's
  labels (one label = a regression, whatever ``config.task`` says). With ``config.distill.teacher`` set, the task
  also learns from that teacher (:class:`Distilled`); ``task=heal`` learns from it alone. With
  ``config.search.enabled`` the run is an architecture search on that task
  (:class:`jaxformers.train.search.Searched`)."""
  source = sources.get_source(c.data)
  source.check(c.data)
  name = c.task
  if name in ("classification", "regression"):
    name = "regression" if source.labels(c.data).regression else "classification"
  task = TASKS.get(name)(source, c)
  task = Distilled(task, c.distill) if c.distill.teacher and not isinstance(task, Heal) else task
  if c.search.enabled:
    from jaxformers.train.search import Searched
    task = Searched(task, c)
  return task


class Distillation:
  """The losses of ``config.distill`` against a frozen teacher, added to a task's own (see :mod:`jaxformers.distill`).

  The teacher is any checkpoint ``from_pretrained`` accepts, loaded once in eval mode; its parameters are an
  input of the jitted step, placed by the same sharding rules as the student's, and its forward runs inside
  the step. Losses (weights in ``config.distill``): ``logits`` (soft-label KL at ``temperature``: the
  classification logits, or the masked-LM logits of every real token), ``hidden`` (MSE of the hidden
  states of the layer map's pairs), ``first_token`` (MSE of each sequence's final first-token state, which
  classifier heads read: one term per sequence where ``hidden`` gives it one per token), ``attention`` / ``value`` (MiniLM relation KL at the deepest mapped pair
  where both models have attention). Dense terms are means over real tokens, weighted like the task's own
  per-example loss so that the step's ``loss_sum / weight`` stays a mean.
  """

  def __init__(self, cfg):
    self.c = cfg
    self.weights = {k: float(cfg[k]) for k in ("logits", "hidden", "first_token", "attention", "value")}

  def prepare(self, run, student_task: str) -> None:
    from flax import nnx

    import jaxformers
    from jaxformers import distill
    from jaxformers.train import sharding
    c = self.c
    if not c.teacher:
      raise ConfigError("config.distill.teacher is empty: name the teacher checkpoint (a native, run, HF directory "
                       "or Hub id)")
    overrides = {"dtype": c.teacher_dtype} if c.teacher_dtype else {}
    teacher = jaxformers.from_pretrained(c.teacher, **overrides)
    s_cfg, t_cfg = run.cfg, teacher.config
    where = f"config.distill (teacher {c.teacher}, layout {t_cfg.layout}; student layout {s_cfg.layout})"
    self.check_vocabulary(run, teacher)
    if self.weights["logits"]:
      t_task = models.task_of(teacher)
      if t_task != student_task:
        raise ConfigError(f"{where}: distill.logits needs a teacher with the student's head ({student_task}); the "
                         f"teacher is a {t_task} model. Set distill.logits=0 to distil hidden states and attention only")
      if student_task == "masked_lm" and t_cfg.vocab_size != s_cfg.vocab_size:
        raise ConfigError(f"{where}: the teacher's vocabulary has {t_cfg.vocab_size} tokens, the student's "
                         f"{s_cfg.vocab_size}: masked-LM logits cannot be compared")
      if student_task == "classification" and teacher.num_labels != run.task.num_labels:
        raise ConfigError(f"{where}: the teacher has {teacher.num_labels} labels, the task {run.task.num_labels}")
    for key in ("hidden", "first_token"):
      if self.weights[key] and t_cfg.hidden_size != s_cfg.hidden_size:
        raise ConfigError(f"{where}: distill.{key} compares hidden states, which needs equal hidden sizes (student "
                          f"{s_cfg.hidden_size}, teacher {t_cfg.hidden_size})")
    self.pairs = distill.parse_layer_map(c.layer_map, s_cfg.num_layers, t_cfg.num_layers)
    s_blocks = models.encoder_of(run.abstract).blocks
    t_blocks = models.encoder_of(teacher).blocks
    self.relation = None
    if self.weights["attention"] or self.weights["value"]:
      both = [(i, j) for i, j in self.pairs if i > 0 and j > 0 and s_blocks[i - 1].has_attention
              and t_blocks[j - 1].has_attention]
      if not both:
        raise ConfigError(f"{where}: distill.attention / distill.value need a layer-map pair where both models have "
                         f"attention; the student has none at layers {[i for i, _ in self.pairs]}. Set them to 0 "
                         f"(e.g. for a Fourier student) or choose distill.layer_map")
      self.relation = both[-1]
      self.heads = c.relation_heads or s_cfg.num_heads
      for name, width in (("student", s_cfg.hidden_size), ("teacher", t_cfg.hidden_size)):
        if width % self.heads:
          raise ConfigError(f"{where}: distill.relation_heads={self.heads} must divide the {name}'s hidden size {width}")
    gd, params, rest = nnx.split(teacher, nnx.Param, ...)
    self.teacher_graph = gd
    self.params = jax.device_put(params, sharding.param_shardings(params, run.mesh, run.rules))
    self.rest = jax.device_put(rest, jax.tree.map(lambda _: sharding.replicated(run.mesh), rest))
    self.student_task = student_task

  def check_vocabulary(self, run, teacher) -> None:
    """The teacher reads the student's token ids: refuse a teacher whose tokenizer is another than the run's (or,
    without a tokenizer, whose embeddings have fewer rows than the run's tokenizer has tokens)."""
    c, tok = self.c, run.tok
    mine = f"{tok.get_vocab_size()} tokens, from {run.c.data.tokenizer or run.c.init_from or 'the training texts'}"
    try:
      where = tokenizer_dir(hub.resolve(c.teacher))
    except CheckpointError:
      where = None
    if where is not None and has_tokenizer(where):
      theirs = load_tokenizer(str(where))
      if theirs.get_vocab() != tok.get_vocab():
        raise ConfigError(f"config.distill.teacher={c.teacher}: its tokenizer ({theirs.get_vocab_size()} tokens, "
                          f"embeddings for {teacher.config.vocab_size}) is not the student's ({mine}), so it would "
                          f"read the student's token ids as other tokens; train the student with the teacher's "
                          f"tokenizer (config.data.tokenizer={c.teacher})")
    elif tok.get_vocab_size() > teacher.config.vocab_size:
      raise ConfigError(f"config.distill.teacher={c.teacher}: its embeddings have {teacher.config.vocab_size} "
                        f"tokens, fewer than the student's tokenizer ({mine}); train the student with the teacher's "
                        f"tokenizer")

  def inputs(self):
    return {"teacher_params": self.params, "teacher_rest": self.rest}

  def terms(self, model, batch, inputs, max_segments, weight):
    """``(weighted distillation loss sum, student logits or None)``."""
    from flax import nnx

    from jaxformers import distill
    packed = "segment_ids" in batch
    seg = batch["segment_ids"] if packed else batch["attention_mask"]
    same, valid = distill.token_relations(seg)
    n_tok = jnp.maximum(jnp.sum(valid), 1.0)
    if self.weights["hidden"] or self.relation:
      kw = {"output_hidden_states": True}
    else:   # a classifier's logits need the last block at first tokens only
      kw = {"first_tokens_only": self.student_task == "classification"}
    s_out = forward(models.encoder_of(model), batch, max_segments, **kw)
    s_logits = model.head(s_out) if not isinstance(model, models.Encoder) else None
    teacher = nnx.merge(self.teacher_graph, inputs["teacher_params"], inputs["teacher_rest"])
    t_out = forward(models.encoder_of(teacher), batch, max_segments, **kw)
    t_out = jax.tree.map(jax.lax.stop_gradient, t_out)
    total = jnp.zeros((), jnp.float32)
    if self.weights["logits"]:
      t_logits = jax.lax.stop_gradient(teacher.head(t_out))
      kl = distill.soft_label_kl(s_logits, t_logits, self.c.temperature)
      if self.student_task == "masked_lm":            # per token: mean over real tokens
        total += self.weights["logits"] * weight * jnp.sum(kl * valid) / n_tok
      else:                                           # per example (or packed slot)
        total += self.weights["logits"] * jnp.sum(kl * batch["weights"])
    if self.weights["first_token"]:      # the state classifiers read: one term per sequence, not per token
      if packed:
        seq_valid = s_out.segment_valid.astype(jnp.float32)
      else:
        seq_valid = (seg[:, 0] != 0).astype(jnp.float32)
      d = jnp.mean(jnp.square(s_out.first_token_state.astype(jnp.float32)
                              - t_out.first_token_state.astype(jnp.float32)), axis=-1)
      total += self.weights["first_token"] * weight * jnp.sum(d * seq_valid) / jnp.maximum(jnp.sum(seq_valid), 1.0)
    if self.weights["hidden"]:
      mse = sum(distill.hidden_mse(s_out.hidden_states[i], t_out.hidden_states[j], valid) for i, j in self.pairs)
      total += self.weights["hidden"] * weight * mse / (n_tok * len(self.pairs))
    if self.relation:
      i, j = self.relation
      s_q, s_k, s_v = models.encoder_of(model).blocks[i - 1].attention_inputs(s_out.hidden_states[i - 1])
      t_q, t_k, t_v = jax.lax.stop_gradient(
          models.encoder_of(teacher).blocks[j - 1].attention_inputs(t_out.hidden_states[j - 1]))
      if self.weights["attention"]:
        att = distill.relation_kl((s_q, s_k), (t_q, t_k), self.heads, same, valid)
        total += self.weights["attention"] * weight * att / n_tok
      if self.weights["value"]:
        val = distill.relation_kl((s_v, s_v), (t_v, t_v), self.heads, same, valid)
        total += self.weights["value"] * weight * val / n_tok
    return total, s_logits


class Distilled:
  """A task trained with a teacher: ``distill.task`` x the task's own loss + the distillation losses. Everything
  else (data, metrics, best checkpoint, predictions) is the task's."""

  def __init__(self, inner: Task, distill_cfg):
    self.inner = inner
    self.distillation = Distillation(distill_cfg)
    self.task_weight = float(distill_cfg.task)

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def prepare(self, run) -> None:
    self.inner.prepare(run)
    self.distillation.prepare(run, self.inner.model_task)

  def inputs(self):
    return {**self.inner.inputs(), **self.distillation.inputs()}

  def make_train_step(self, graphdef, tx, lr_fn, accum_steps: int = 1, max_segments: int | None = None):
    return Task.make_train_step(self, graphdef, tx, lr_fn, accum_steps, max_segments)

  def loss(self, model, batch, inputs, max_segments=None):
    w = jnp.sum(batch["weights"])     # the task loss's weight (examples, packed slots or masked tokens)
    extra, logits = self.distillation.terms(model, batch, inputs, max_segments, w)
    if logits is None:
      logits = forward(model, batch, max_segments)
    s, w, c = self.inner.loss_terms(logits, batch)
    return self.task_weight * s + extra, w, c, logits


@TASKS.register("heal")
class Heal(TextTask):
  """Healing a re-arranged model: distil it from a teacher (usually the checkpoint it was re-arranged from) on
  the source's unlabelled texts, with the losses of ``config.distill`` only. The student is an encoder
  (``base``), or a masked-LM model when ``distill.logits`` > 0 (the teacher needs an MLM head then)."""
  name = "heal"

  def __init__(self, source, c):
    super().__init__(source, c)
    self.distillation = Distillation(c.distill)
    self.model_task = "masked_lm" if float(c.distill.logits) else "base"

  def prepare(self, run) -> None:
    if not any(self.distillation.weights.values()):
      raise ConfigError("task=heal needs at least one distillation loss: set distill.hidden, distill.first_token, "
                        "distill.attention, distill.value or distill.logits above 0")
    self.distillation.prepare(run, self.model_task)

  def inputs(self):
    return self.distillation.inputs()

  def loss(self, model, batch, inputs, max_segments=None):
    w = jnp.sum(batch["weights"])
    s, _ = self.distillation.terms(model, batch, inputs, max_segments, w)
    return s, w, jnp.zeros((), jnp.float32), None
