"""Distillation from a frozen teacher as trainer tasks: :class:`Distilled` adds the losses of ``config.distill`` to
a task's own (any task, with ``config.distill.teacher`` set); ``task=heal`` (:class:`Heal`) learns from them alone.
Both hold a :class:`Distillation`: the teacher, placed on the run's mesh, and the losses of :mod:`jaxformers.distill`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformers import distill, models
from jaxformers.checkpoints import hub
from jaxformers.checkpoints.pretrained import from_pretrained
from jaxformers.checkpoints.tokenizers import has_tokenizer, load_tokenizer
from jaxformers.checkpoints.workdir import tokenizer_dir
from jaxformers.errors import CheckpointError, ConfigError
from jaxformers.train import sharding
from jaxformers.train.context import TaskContext
from jaxformers.train.task_base import TASKS, Task, TaskWrapper, TextTask, forward


class Distillation:
  """The losses of ``config.distill`` against a frozen teacher, added to a task's own (see :mod:`jaxformers.distill`).

  The teacher is any checkpoint ``from_pretrained`` accepts, loaded once in eval mode; its parameters are an
  input of the jitted step, placed by the same sharding rules as the student's, and its forward runs inside
  the step. Losses (weights in ``config.distill``): ``logits`` (soft-label KL at ``temperature``: the
  classification logits, or the masked-LM logits of every real token), ``hidden`` (MSE of the hidden
  states of the layer map's pairs), ``first_token`` (MSE of each sequence's final first-token state, which
  classifier heads read: one term per sequence where ``hidden`` gives it one per token), ``attention`` /
  ``value`` (MiniLM relation KL at the deepest mapped pair where both models have attention). Dense terms are
  means over real tokens, weighted like the task's own per-example loss so that the step's ``loss_sum / weight``
  stays a mean.
  """

  def __init__(self, cfg):
    self.c = cfg
    self.weights = {k: float(cfg[k]) for k in ("logits", "hidden", "first_token", "attention", "value")}

  def prepare(self, ctx: TaskContext, student_task: str, num_labels: int) -> None:
    """Load the teacher and check it against the student (``ctx.model_config``, a ``student_task`` model with
    ``num_labels`` labels): the vocabulary, the head the logits loss compares, hidden sizes and the layer map."""
    c = self.c
    if not c.teacher:
      raise ConfigError("config.distill.teacher is empty: name the teacher checkpoint (a native, run, HF directory "
                        "or Hub id)")
    overrides = {"dtype": c.teacher_dtype} if c.teacher_dtype else {}
    teacher = from_pretrained(c.teacher, **overrides)
    s_cfg, t_cfg = ctx.model_config, teacher.config
    where = f"config.distill (teacher {c.teacher}, layout {t_cfg.layout}; student layout {s_cfg.layout})"
    self.check_vocabulary(ctx, teacher)
    if self.weights["logits"]:
      t_task = models.task_of(teacher)
      if t_task != student_task:
        raise ConfigError(f"{where}: distill.logits needs a teacher with the student's head ({student_task}); the "
                          f"teacher is a {t_task} model. Set distill.logits=0 to distil hidden states and attention "
                          f"only")
      if student_task == "masked_lm" and t_cfg.vocab_size != s_cfg.vocab_size:
        raise ConfigError(f"{where}: the teacher's vocabulary has {t_cfg.vocab_size} tokens, the student's "
                          f"{s_cfg.vocab_size}: masked-LM logits cannot be compared")
      if student_task == "classification" and teacher.num_labels != num_labels:
        raise ConfigError(f"{where}: the teacher has {teacher.num_labels} labels, the task {num_labels}")
    for key in ("hidden", "first_token"):
      if self.weights[key] and t_cfg.hidden_size != s_cfg.hidden_size:
        raise ConfigError(f"{where}: distill.{key} compares hidden states, which needs equal hidden sizes (student "
                          f"{s_cfg.hidden_size}, teacher {t_cfg.hidden_size})")
    self.pairs = distill.parse_layer_map(c.layer_map, s_cfg.num_layers, t_cfg.num_layers)
    s_attention = ctx.blocks_with_attention
    t_blocks = models.encoder_of(teacher).blocks
    self.relation = None
    if self.weights["attention"] or self.weights["value"]:
      both = [(i, j) for i, j in self.pairs if i > 0 and j > 0 and s_attention[i - 1]
              and t_blocks[j - 1].has_attention]
      if not both:
        raise ConfigError(f"{where}: distill.attention / distill.value need a layer-map pair where both models have "
                          f"attention; the student has none at layers {[i for i, _ in self.pairs]}. Set them to 0 "
                          f"(e.g. for a Fourier student) or choose distill.layer_map")
      self.relation = both[-1]
      self.heads = c.relation_heads or s_cfg.num_heads
      for name, width in (("student", s_cfg.hidden_size), ("teacher", t_cfg.hidden_size)):
        if width % self.heads:
          raise ConfigError(f"{where}: distill.relation_heads={self.heads} must divide the {name}'s hidden size "
                            f"{width}")
    gd, params, rest = nnx.split(teacher, nnx.Param, ...)
    self.teacher_graph = gd
    self.params = jax.device_put(params, sharding.param_shardings(params, ctx.mesh, ctx.rules))
    self.rest = jax.device_put(rest, jax.tree.map(lambda _: sharding.replicated(ctx.mesh), rest))
    self.student_task = student_task

  def check_vocabulary(self, ctx: TaskContext, teacher) -> None:
    """The teacher reads the student's token ids: refuse a teacher whose tokenizer is another than the run's (or,
    without a tokenizer, whose embeddings have fewer rows than the run's tokenizer has tokens)."""
    c, tok = self.c, ctx.tokenizer
    mine = f"{tok.get_vocab_size()} tokens, from {ctx.data.tokenizer or ctx.init_from or 'the training texts'}"
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


class Distilled(TaskWrapper):
  """A task trained with a teacher: ``distill.task`` x the task's own loss + the distillation losses. Everything
  else (data, metrics, best checkpoint, predictions) is the task's."""

  def __init__(self, inner: Task, distill_cfg):
    super().__init__(inner)
    self.distillation = Distillation(distill_cfg)
    self.task_weight = float(distill_cfg.task)

  def prepare(self, ctx: TaskContext) -> None:
    self.inner.prepare(ctx)
    self.distillation.prepare(ctx, self.inner.model_task, self.inner.num_labels)

  def inputs(self):
    return {**self.inner.inputs(), **self.distillation.inputs()}

  def make_train_step(self, graphdef, tx, lr_fn, accum_steps: int = 1, max_segments: int | None = None):
    """The plain train step of this task's loss (the inner task's own step would take the inner task's)."""
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

  def prepare(self, ctx: TaskContext) -> None:
    if not any(self.distillation.weights.values()):
      raise ConfigError("task=heal needs at least one distillation loss: set distill.hidden, distill.first_token, "
                        "distill.attention, distill.value or distill.logits above 0")
    self.distillation.prepare(ctx, self.model_task, self.num_labels)

  def inputs(self):
    return self.distillation.inputs()

  def loss(self, model, batch, inputs, max_segments=None):
    w = jnp.sum(batch["weights"])
    s, _ = self.distillation.terms(model, batch, inputs, max_segments, w)
    return s, w, jnp.zeros((), jnp.float32), None
