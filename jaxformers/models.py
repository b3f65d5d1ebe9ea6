"""The encoder and its task heads.

``Encoder(cfg)(input_ids, attention_mask=None, token_type_ids=None)`` returns an
:class:`EncoderOutput` with ``last_hidden_state`` ``[batch, length, hidden]``; heads
return logits. Packed rows (several sequences per row) are passed as ``segment_ids``
(1, 2, ... per sequence, 0 for padding) instead of ``attention_mask``.
Outputs at padding positions carry no meaning.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxformers.blocks import BLOCKS, Block
from jaxformers.config import EncoderConfig, of_config
from jaxformers.dropout import Dropout
from jaxformers.layers import Embeddings, Sequences, position_ids
from jaxformers.layers.common import dtype_of, flat_matmul, layer_norm, linear
from jaxformers.layers.mlp import activation


@struct.dataclass
class EncoderOutput:
  """``last_hidden_state`` ``[batch, length, hidden]`` (None when only first tokens were computed).
  ``first_token_state`` and ``pooler_output`` are ``[batch, hidden]``, or for packed rows
  ``[batch, max_segments, hidden]`` (one per sequence, in row order) with ``segment_valid``
  ``[batch, max_segments]`` marking real ones. ``hidden_states`` (with ``output_hidden_states``): the
  embeddings' output and every block's output, ``num_layers + 1`` arrays ``[batch, length, hidden]``
  (the last before a pre-LN stack's final norm)."""
  last_hidden_state: jax.Array
  pooler_output: jax.Array | None = None
  first_token_state: jax.Array | None = None
  segment_valid: jax.Array | None = None
  hidden_states: tuple[jax.Array, ...] | None = None


def segment_starts(seq: Sequences) -> tuple[jax.Array, jax.Array]:
  """Row indices of each sequence's first token ``[batch, max_segments]`` and which slots are real."""
  is_start = (seq.positions == 0) & (seq.segment_ids != 0)
  order = jnp.argsort(~is_start, axis=-1, stable=True)[:, :seq.max_segments]
  return order, jnp.take_along_axis(is_start, order, axis=-1)


class Pooler(nnx.Module):
  """BERT pooler: ``tanh(dense(h[:, 0]))``."""

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.dense = linear(cfg, cfg.hidden_size, cfg.hidden_size, ("embed", None), rngs=rngs)

  def __call__(self, first_BD: jax.Array) -> jax.Array:
    return jnp.tanh(self.dense(first_BD))


class Encoder(nnx.Module):
  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.embeddings = Embeddings(cfg, rngs=rngs)
    specs = [BLOCKS.get(name) for name in cfg.blocks]
    self.blocks = nnx.List([Block(cfg, spec, rngs=rngs, layer=i) for i, spec in enumerate(specs)])
    self.final_norm = layer_norm(cfg, cfg.hidden_size, rngs=rngs) if specs[-1].pre_ln else None
    self.pooler = Pooler(cfg, rngs=rngs) if cfg.use_pooler else None

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, segment_ids=None,
               max_segments: int | None = None, position_ids_override=None,
               first_tokens_only: bool = False, output_hidden_states: bool = False) -> EncoderOutput:
    """Padded rows pass ``attention_mask``; packed rows pass ``segment_ids`` (and may bound
    ``max_segments``, the most sequences one row holds, default 32).

    ``first_tokens_only``: compute the last block only where heads that read each sequence's first
    token need it (its keys and values still come from every token), so ``last_hidden_state`` is None.
    The outputs are those of the full pass; a classifier saves most of one block's work.
    ``output_hidden_states``: also return every block's output (then every block runs in full)."""
    first_tokens_only = first_tokens_only and not output_hidden_states
    input_ids = jnp.asarray(input_ids, jnp.int32)
    b, l = input_ids.shape
    if l > self.config.max_position_embeddings and not (segment_ids is not None or position_ids_override is not None):
      raise ValueError(f"input length {l} exceeds max_position_embeddings={self.config.max_position_embeddings}")
    seq = Sequences.build(b, l, attention_mask=attention_mask, segment_ids=segment_ids, max_segments=max_segments)
    pos = position_ids(self.config, seq, attention_mask) if position_ids_override is None else position_ids_override
    valid = None
    if seq.packed:
      starts_BS, valid = segment_starts(seq)
    else:
      starts_BS = jnp.zeros((b, 1), jnp.int32)
    x_BLD = self.embeddings(input_ids, pos, token_type_ids)
    hidden = [x_BLD]
    last = len(self.blocks) - 1
    for i, block in enumerate(self.blocks):
      x_BLD = block(x_BLD, seq, select_BS=starts_BS if first_tokens_only and i == last else None)
      hidden.append(x_BLD)
    if self.final_norm is not None:
      x_BLD = self.final_norm(x_BLD)
    if first_tokens_only:
      first = x_BLD[:, 0] if not seq.packed else x_BLD
    else:
      first = x_BLD[:, 0] if not seq.packed else jnp.take_along_axis(x_BLD, starts_BS[..., None], axis=1)
    pooled = self.pooler(first) if self.pooler is not None else None
    return EncoderOutput(last_hidden_state=None if first_tokens_only else x_BLD, pooler_output=pooled,
                         first_token_state=first, segment_valid=valid,
                         hidden_states=tuple(hidden) if output_hidden_states else None)

  def head(self, out: EncoderOutput) -> EncoderOutput:
    """The model's output from the encoder's (here: itself), as for the task models' ``head``."""
    return out


class MaskedLMHead(nnx.Module):
  """dense -> activation -> LayerNorm -> tied decoder (word embeddings transposed) + bias."""

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.transform = linear(cfg, cfg.hidden_size, cfg.hidden_size, ("embed", None), rngs=rngs)
    self.norm = layer_norm(cfg, cfg.hidden_size, rngs=rngs)
    self.bias = nnx.Param(jnp.zeros((cfg.vocab_size,), dtype_of(cfg.param_dtype)), logical_axes=("vocab",))
    # the family's transform activation: BERT's is hidden_act, RoBERTa's always the exact GELU
    self.act = activation(_family(cfg).lm_head_act or cfg.hidden_act)

  def __call__(self, h_BLD: jax.Array, word_embedding_VD: jax.Array) -> jax.Array:
    h_BLD = self.norm(self.act(self.transform(h_BLD)))
    return flat_matmul(h_BLD, word_embedding_VD.T.astype(h_BLD.dtype)) + self.bias[...].astype(h_BLD.dtype)


def _family(cfg: EncoderConfig):
  """The converter family ``cfg.family`` names (its head conventions)."""
  return of_config(cfg.family)


def _encoder_cfg(cfg: EncoderConfig, pooler: bool) -> EncoderConfig:
  return cfg if cfg.use_pooler == pooler else cfg.replace(use_pooler=pooler)


class MaskedLM(nnx.Module):
  """Masked-LM model: logits ``[batch, length, vocab]``."""

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, pooler: bool = False):
    self.encoder = Encoder(_encoder_cfg(cfg, pooler), rngs=rngs)
    self.lm_head = MaskedLMHead(cfg, rngs=rngs)

  @property
  def config(self) -> EncoderConfig:
    return self.encoder.config

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, **kw) -> jax.Array:
    return self.head(self.encoder(input_ids, attention_mask, token_type_ids, **kw))

  def head(self, out: EncoderOutput) -> jax.Array:
    """Logits from the encoder's output (``model(x) == model.head(model.encoder(x))``)."""
    return self.lm_head(out.last_hidden_state, self.encoder.embeddings.word.embedding[...])


class PreTraining(MaskedLM):
  """BERT pre-training: masked-LM logits and next-sentence logits ``[batch, 2]``."""

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs, pooler=True)
    self.nsp = linear(cfg, cfg.hidden_size, 2, ("embed", "labels"), rngs=rngs)

  def head(self, out: EncoderOutput) -> tuple[jax.Array, jax.Array]:
    return super().head(out), self.nsp(out.pooler_output)


class ClassifierHead(nnx.Module):
  """``bert``: dropout -> out on the pooled output. ``roberta``: first token -> dropout -> dense -> tanh -> dropout -> out."""

  def __init__(self, cfg: EncoderConfig, num_labels: int, style: str, *, rngs: nnx.Rngs):
    if style not in ("bert", "roberta", "token"):
      raise ValueError(f"classifier head style {style!r}: expected 'bert', 'roberta' or 'token'")
    self.style = style
    self.dense = linear(cfg, cfg.hidden_size, cfg.hidden_size, ("embed", None), rngs=rngs) if style == "roberta" else None
    self.out = linear(cfg, cfg.hidden_size, num_labels, ("embed", "labels"), rngs=rngs)
    self.dropout = Dropout(cfg.hidden_dropout, impl=cfg.dropout_impl, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.dense is not None:
      x = jnp.tanh(self.dense(self.dropout(x)))
    return self.out(self.dropout(x))


class SequenceClassifier(nnx.Module):
  """Sequence classification (``num_labels`` > 1) or regression (``num_labels`` = 1): logits ``[batch, num_labels]``,
  or ``[batch, max_segments, num_labels]`` for packed rows (one per sequence)."""

  label_names: tuple[str, ...] | None = None   # class names in label-id order, kept by checkpoints and exports

  def __init__(self, cfg: EncoderConfig, num_labels: int = 2, head: str | None = None, *, rngs: nnx.Rngs):
    head = head or _family(cfg).classifier
    self.num_labels = num_labels
    self.encoder = Encoder(_encoder_cfg(cfg, head == "bert"), rngs=rngs)
    self.classifier = ClassifierHead(cfg, num_labels, head, rngs=rngs)

  @property
  def config(self) -> EncoderConfig:
    return self.encoder.config

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, **kw) -> jax.Array:
    return self.head(self.encoder(input_ids, attention_mask, token_type_ids, first_tokens_only=True, **kw))

  def head(self, out: EncoderOutput) -> jax.Array:
    """Logits from the encoder's output (``model(x) == model.head(model.encoder(x))``)."""
    if self.classifier.style == "bert":
      return self.classifier(out.pooler_output)
    return self.classifier(out.first_token_state)


class TokenClassifier(nnx.Module):
  """Token tagging: logits ``[batch, length, num_labels]``."""

  label_names: tuple[str, ...] | None = None

  def __init__(self, cfg: EncoderConfig, num_labels: int = 2, *, rngs: nnx.Rngs):
    self.num_labels = num_labels
    self.encoder = Encoder(_encoder_cfg(cfg, False), rngs=rngs)
    self.classifier = ClassifierHead(cfg, num_labels, "token", rngs=rngs)

  @property
  def config(self) -> EncoderConfig:
    return self.encoder.config

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, **kw) -> jax.Array:
    return self.head(self.encoder(input_ids, attention_mask, token_type_ids, **kw))

  def head(self, out: EncoderOutput) -> jax.Array:
    return self.classifier(out.last_hidden_state)


# The task vocabulary: a model's task names its head (and class); everything that names a task names one of these.
TASKS = {
    "base": Encoder,
    "masked_lm": MaskedLM,
    "pretraining": PreTraining,
    "classification": SequenceClassifier,
    "token_classification": TokenClassifier,
}


# The model each of the trainer's supervised and MLM tasks (``config.task``) trains: their ``Task.model_task``, and
# what a run saved before its metadata named the head ("model_task") is read as.
TRAINER_TASKS = {"classification": "classification", "regression": "classification", "mlm": "masked_lm"}


def build(task: str, cfg: EncoderConfig, *, num_labels: int | None = None, head: str | None = None,
          rngs: nnx.Rngs | None = None):
  """Construct a model for ``task`` (one of :data:`TASKS`)."""
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
  rngs = rngs if rngs is not None else nnx.Rngs(params=0, dropout=1)
  if task == "classification":
    return SequenceClassifier(cfg, num_labels or 2, head, rngs=rngs)
  if task == "token_classification":
    return TokenClassifier(cfg, num_labels or 2, rngs=rngs)
  return TASKS[task](cfg, rngs=rngs)


def encoder_of(model) -> Encoder:
  """The :class:`Encoder` of any model (itself for ``base``)."""
  return model if isinstance(model, Encoder) else model.encoder


def task_of(model) -> str:
  for name, cls in TASKS.items():
    if type(model) is cls:
      return name
  raise TypeError(f"{type(model).__name__} is not a jaxformers model")
