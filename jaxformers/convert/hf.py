"""HF PyTorch BERT / RoBERTa / PAF-RoBERTa checkpoints <-> jaxformers models.

Key tables (HF name -> jaxformers path; ``{i}`` is the layer):

=============================================  =====================================
``embeddings.word_embeddings``                 ``encoder.embeddings.word``
``embeddings.position_embeddings``             ``encoder.embeddings.position``
``embeddings.token_type_embeddings``           ``encoder.embeddings.token_type``
``embeddings.LayerNorm``                       ``encoder.embeddings.norm``
``encoder.layer.{i}.attention.self.query``     ``encoder.blocks.{i}.mixer.query`` (key, value alike)
``encoder.layer.{i}.attention.output.dense``   ``encoder.blocks.{i}.mixer.out``
``encoder.layer.{i}.attention.output.LayerNorm`` ``encoder.blocks.{i}.mixer_norm`` (PAF: unused)
``encoder.layer.{i}.intermediate.dense``       ``encoder.blocks.{i}.mlp.up``
``encoder.layer.{i}.output.dense``             ``encoder.blocks.{i}.mlp.down``
``encoder.layer.{i}.output.LayerNorm``         ``encoder.blocks.{i}.mlp_norm``, or ``norm`` in parallel blocks
``pooler.dense``                               ``encoder.pooler.dense``
=============================================  =====================================

Heads: BERT ``cls.predictions.*`` / RoBERTa ``lm_head.*`` -> ``lm_head``, BERT
``cls.seq_relationship`` -> ``nsp``, ``classifier[.dense|.out_proj]`` -> ``classifier``.
Linear weights are transposed (PyTorch stores ``[out, in]``); decoder weights tied to
the word embeddings are checked for equality and not stored twice.

Re-arrangement: loading a serial checkpoint into another layout reuses, for each
layer, the parts the target block has (see :func:`jaxformers.convert.engine.layer_map`):
attention projections and their LayerNorm go to blocks with attention, feed-forward
weights and their LayerNorm to blocks with a feed-forward sublayer; a Fourier block
reuses the post-mixing LayerNorm; a parallel block takes ``output.LayerNorm`` as its
single norm. Attention sublayers the layout does not have are dropped and listed in
the report; parameters with no source (a pre-LN stack's final norm, a new task head,
blocks of a layout deeper than the checkpoint) are newly initialised and listed. Native
models are re-arranged by the same tables (:mod:`jaxformers.convert.native`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from flax import nnx

from jaxformers.layout import BLOCKS
from jaxformers.mixers import MIXERS
from jaxformers.config import EncoderConfig
from jaxformers.convert import engine
from jaxformers.convert.engine import Ignore, Rule, embedding, linear, norm
from jaxformers.convert.io import (SAFETENSORS, CheckpointError, read_hf_config, read_hf_weights, write_beside,
                                  write_hf_files)
from jaxformers.convert.params import get_params, param_shapes, set_params
from jaxformers import models

_L, _B = "encoder.layer.{i}", "blocks.{i}"

BASE_RULES: list[Rule] = [
    *embedding("embeddings.word_embeddings", "embeddings.word"),
    *embedding("embeddings.position_embeddings", "embeddings.position"),
    *embedding("embeddings.token_type_embeddings", "embeddings.token_type"),
    *norm("embeddings.LayerNorm", "embeddings.norm"),
    *(r for n in ("query", "key", "value") for r in linear(f"{_L}.attention.self.{n}", f"{_B}.mixer.{n}", group="mixer")),
    *linear(f"{_L}.attention.output.dense", f"{_B}.mixer.out", group="mixer"),
    *norm(f"{_L}.attention.output.LayerNorm", f"{_B}.mixer_norm", group="mixer"),
    *linear(f"{_L}.intermediate.dense", f"{_B}.mlp.up", group="mlp"),
    *linear(f"{_L}.output.dense", f"{_B}.mlp.down", group="mlp"),
    *norm(f"{_L}.output.LayerNorm", (f"{_B}.mlp_norm", f"{_B}.norm"), group="mlp"),
    *linear("pooler.dense", "pooler.dense"),
]

HEAD_RULES: dict[tuple[str, str], list[Rule]] = {
    ("bert", "masked_lm"): [*linear("cls.predictions.transform.dense", "lm_head.transform", base=False),
                            *norm("cls.predictions.transform.LayerNorm", "lm_head.norm", base=False),
                            Rule("cls.predictions.bias", ("lm_head.bias",), base=False)],
    ("roberta", "masked_lm"): [*linear("lm_head.dense", "lm_head.transform", base=False),
                               *norm("lm_head.layer_norm", "lm_head.norm", base=False),
                               Rule("lm_head.bias", ("lm_head.bias",), base=False)],
    ("bert", "classification"): linear("classifier", "classifier.out", base=False),
    ("roberta", "classification"): [*linear("classifier.dense", "classifier.dense", base=False),
                                    *linear("classifier.out_proj", "classifier.out", base=False)],
    ("bert", "token_classification"): linear("classifier", "classifier.out", base=False),
    ("roberta", "token_classification"): linear("classifier", "classifier.out", base=False),
}
HEAD_RULES[("bert", "pretraining")] = HEAD_RULES[("bert", "masked_lm")] + linear("cls.seq_relationship", "nsp", base=False)
HEAD_RULES[("bert", "base")] = HEAD_RULES[("roberta", "base")] = []

IGNORES: dict[str, list[Ignore]] = {
    "bert": [Ignore("embeddings.position_ids", "position-id buffer"),
             Ignore("embeddings.token_type_ids", "token-type-id buffer"),
             Ignore("cls.predictions.decoder.weight", "decoder tied to the word embeddings",
                    tied_to="embeddings.word_embeddings.weight"),
             Ignore("cls.predictions.decoder.bias", "decoder bias tied to cls.predictions.bias",
                    tied_to="cls.predictions.bias")],
    "roberta": [Ignore("embeddings.position_ids", "position-id buffer"),
                Ignore("embeddings.token_type_ids", "token-type-id buffer"),
                Ignore("lm_head.decoder.weight", "decoder tied to the word embeddings",
                       tied_to="embeddings.word_embeddings.weight"),
                Ignore("lm_head.decoder.bias", "decoder bias tied to lm_head.bias", tied_to="lm_head.bias")],
}

ARCHITECTURES = {
    "Model": "base", "ForMaskedLM": "masked_lm", "ForPreTraining": "pretraining",
    "ForSequenceClassification": "classification", "ForTokenClassification": "token_classification",
}
_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
         "relu": "relu"}
_NEW_OK = ("lm_head.", "nsp.", "classifier.", "encoder.pooler.", "pooler.", "encoder.final_norm.", "final_norm.")


def family_and_task(hf: dict, where: str) -> tuple[str, str]:
  family = hf.get("model_type")
  if family not in ("bert", "roberta"):
    raise CheckpointError(f"{where}: model_type {family!r} is not supported; expected 'bert' or 'roberta'")
  archs = hf.get("architectures") or [f"{family.capitalize()}Model"]
  arch = archs[0]
  prefix = "Bert" if family == "bert" else "Roberta"
  task = ARCHITECTURES.get(arch[len(prefix):]) if arch.startswith(prefix) else None
  if task is None or (family, task) not in HEAD_RULES:
    known = ", ".join(f"{prefix}{s}" for s, t in ARCHITECTURES.items() if (family, t) in HEAD_RULES)
    raise CheckpointError(f"{where}: architecture {arch!r} is not supported; expected one of {known}")
  return family, task


def encoder_config(hf: dict, where: str, layout: str | None = None, **overrides) -> EncoderConfig:
  """EncoderConfig from an HF config.json dict."""
  family, _ = family_and_task(hf, where)
  missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                         "intermediate_size", "max_position_embeddings") if k not in hf]
  if missing:
    raise CheckpointError(f"{where}: config.json lacks {', '.join(missing)}")
  pet = hf.get("position_embedding_type", "absolute")
  if pet != "absolute":
    raise CheckpointError(f"{where}: position_embedding_type {pet!r} is not supported; expected 'absolute'")
  act = hf.get("hidden_act", "gelu")
  if act not in _ACTS:
    raise CheckpointError(f"{where}: hidden_act {act!r} is not supported; expected one of {', '.join(_ACTS)}")
  n = hf["num_hidden_layers"]
  stored_layout = (hf.get("jaxformers") or {}).get("layout")
  kw = dict(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_heads=hf["num_attention_heads"],
      intermediate_size=hf["intermediate_size"], max_position_embeddings=hf["max_position_embeddings"],
      type_vocab_size=hf.get("type_vocab_size", 2), pad_token_id=hf.get("pad_token_id", 0 if family == "bert" else 1),
      position_style="roberta" if family == "roberta" else "absolute",
      layer_norm_eps=hf.get("layer_norm_eps", 1e-12), hidden_act=_ACTS[act],
      hidden_dropout=hf.get("hidden_dropout_prob", 0.1), attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
      initializer_range=hf.get("initializer_range", 0.02), family=family,
      layout=layout or stored_layout or f"serial*{n}")
  pruned = hf.get("pruned_heads") or {}
  if pruned:   # a checkpoint pruned by transformers 4 (its tensors have the pruned shapes)
    kw["num_heads_per_layer"] = tuple(hf["num_attention_heads"] - len(set(pruned.get(str(i), pruned.get(i, []))))
                                      for i in range(n))
  kw.update(overrides)
  try:
    return EncoderConfig(**kw)
  except (ValueError, KeyError) as e:
    raise CheckpointError(f"{where}: {e}") from None


def _normalise(state: dict[str, np.ndarray], family: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Strip the base-model prefix and old LayerNorm names; returns the state and new -> original names."""
  out, names = {}, {}
  for original, v in state.items():
    k = original
    if k.startswith(family + "."):
      k = k[len(family) + 1:]
    if k.endswith(".gamma"):
      k = k[:-6] + ".weight"
    elif k.endswith(".beta"):
      k = k[:-5] + ".bias"
    out[k] = v
    names[k] = original
  return out, names


def _num_layers(state: dict) -> int:
  idx = [int(k.split(".")[2]) for k in state if k.startswith("encoder.layer.")]
  return max(idx) + 1 if idx else 0


def load_hf_state(state: dict[str, np.ndarray], hf: dict, *, where: str, layout: str | None = None,
                  task: str | None = None, num_labels: int | None = None, head: str | None = None,
                  rngs: nnx.Rngs | None = None, progress: bool = False, **overrides):
  """Build a model from an in-memory HF state dict and config dict; returns ``(model, report)`` (eval mode)."""
  family, source_task = family_and_task(hf, where)
  task = task or source_task
  state, original = _normalise(state, family)
  cfg = encoder_config(hf, where, layout, **overrides)
  labels = len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels", 2)
  source_labels = labels if source_task in LABELLED else None
  if num_labels is None and task in LABELLED:
    num_labels = labels
  if task == "base" and "use_pooler" not in overrides:
    cfg = cfg.replace(use_pooler="pooler.dense.weight" in state)
  n = _num_layers(state) or hf["num_hidden_layers"]
  rules = BASE_RULES + [r for (fam, _), rs in HEAD_RULES.items() if fam == family for r in rs]
  model, report = fill_model(
      state, _dedupe(rules), IGNORES[family], cfg=cfg, task=task, num_labels=num_labels, head=head, rngs=rngs,
      source_blocks=[BLOCKS.get("serial")] * n, source_labels=source_labels,
      position_key="embeddings.position_embeddings.weight", may_be_new=lambda p: p.startswith(_NEW_OK), where=where,
      progress=progress, display=original.__getitem__)
  names = label_names(hf)
  if names and len(names) == getattr(model, "num_labels", None):
    model.label_names = names
  return model, report


LABELLED = ("classification", "token_classification")


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
  offset = cfg.pad_token_id + 1 if cfg.position_style == "roberta" else 0
  learned = old[offset:]
  reps = -(-(cfg.max_position_embeddings - offset) // len(learned))
  state[key] = np.concatenate([old[:offset], np.tile(learned, (reps, 1))])[: cfg.max_position_embeddings]
  return (f"position embeddings extended from {old.shape[0]} to {cfg.max_position_embeddings} positions by copying "
          f"the learned ones (Longformer)")


def _dedupe(rules: list[Rule]) -> list[Rule]:
  seen, out = set(), []
  for r in rules:
    if r.hf not in seen:
      seen.add(r.hf)
      out.append(r)
  return out


def load_hf(directory: str | Path, *, progress: bool = False, **kw):
  """Read an HF checkpoint directory into a jaxformers model; returns ``(model, report)``, the model in eval mode."""
  hf = read_hf_config(directory)
  family_and_task(hf, str(directory))
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
                        f"BERT/RoBERTa/PAF models have one attention and one feed-forward per layer, serial or "
                        f"parallel, and this layout has {', '.join(bad)} blocks; keep it in the native format "
                        f"(jaxformers convert SRC DST, or use the run directory itself) and load it with "
                        f"jaxformers.from_pretrained")


def to_hf_state(model, where: str = "model") -> tuple[dict[str, np.ndarray], dict]:
  """``(state_dict, config_dict)`` in HF layout for a serial (BERT/RoBERTa) or parallel (PAF) model."""
  cfg: EncoderConfig = model.config
  task = models.task_of(model)
  kind = _exportable(cfg, where)
  if cfg.quantization != "none":
    raise CheckpointError(f"{where}: an int8 ({cfg.quantization}) model has no HF checkpoint form; export the float "
                          f"model it was quantized from (and quantize the PyTorch one with torch's quantize_dynamic)")
  if cfg.num_heads_per_layer is not None or cfg.intermediate_sizes is not None:
    from jaxformers.prune import pad_to_full   # pruned heads and neurons are written as zero weights
    model = pad_to_full(model)
    cfg = model.config
  family = cfg.family
  if task == "pretraining" and family != "bert":
    raise CheckpointError(f"{where}: the pre-training head (masked LM + next sentence) exists only for BERT")
  if task == "classification" and model.classifier.style != family:
    raise CheckpointError(f"{where}: a {model.classifier.style}-style classifier head cannot be written as a "
                          f"{family} checkpoint (HF's {family} classifier is {family}-style)")
  params = get_params(model)
  rules = BASE_RULES + HEAD_RULES[(family, task)]
  state = engine.export(params, rules, num_layers=cfg.num_layers, prefix="" if task == "base" else "encoder.",
                        hf_prefix="" if task == "base" else family + ".", where=where)
  pre = "" if task == "base" else family + "."
  if kind == "parallel":  # PAF checkpoints keep an (unused) attention LayerNorm per layer
    for i in range(cfg.num_layers):
      state[f"{pre}encoder.layer.{i}.attention.output.LayerNorm.weight"] = np.ones(cfg.hidden_size, np.float32)
      state[f"{pre}encoder.layer.{i}.attention.output.LayerNorm.bias"] = np.zeros(cfg.hidden_size, np.float32)
  return state, hf_config(cfg, task, getattr(model, "num_labels", None), getattr(model, "label_names", None))


def hf_config(cfg: EncoderConfig, task: str, num_labels: int | None = None,
              label_names: tuple[str, ...] | None = None) -> dict:
  family = cfg.family
  suffix = next(s for s, t in ARCHITECTURES.items() if t == task)
  acts = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
  out = {
      "architectures": [f"{'Bert' if family == 'bert' else 'Roberta'}{suffix}"],
      "model_type": family, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "intermediate_size": cfg.intermediate_size, "hidden_act": acts[cfg.hidden_act],
      "hidden_dropout_prob": cfg.hidden_dropout, "attention_probs_dropout_prob": cfg.attention_dropout,
      "max_position_embeddings": cfg.max_position_embeddings, "type_vocab_size": cfg.type_vocab_size,
      "initializer_range": cfg.initializer_range, "layer_norm_eps": cfg.layer_norm_eps,
      "pad_token_id": cfg.pad_token_id, "position_embedding_type": "absolute",
      "tie_word_embeddings": True, "jaxformers": {"layout": cfg.layout},
  }
  if family == "roberta":
    out.update(bos_token_id=0, eos_token_id=2)
  if num_labels is not None:
    names = list(label_names) if label_names and len(label_names) == num_labels else \
        [f"LABEL_{i}" for i in range(num_labels)]
    out["id2label"] = {str(i): n for i, n in enumerate(names)}
    out["label2id"] = {n: i for i, n in enumerate(names)}
    if num_labels == 1 and task == "classification":
      out["problem_type"] = "regression"
  return out


def export_hf(model, directory: str | Path, tokenizer=None, overwrite: bool = False) -> Path:
  """Write ``config.json`` + ``model.safetensors`` that transformers loads, and with ``tokenizer`` (a checkpoint
  or run directory, a ``tokenizer.json`` file or a ``tokenizers.Tokenizer``) its tokenizer files, so that
  ``transformers.pipeline(..., model=directory)`` needs nothing else. ``directory`` must be new or empty; with
  ``overwrite`` a non-empty one keeps its other files and gets those replaced (written beside it first, then
  renamed into place: an interruption never leaves a half-written checkpoint)."""
  from jaxformers.convert.tokenizer import HF_TOKENIZER_FILES, write_hf_tokenizer
  state, config = to_hf_state(model, where=str(directory))

  def write(tmp: Path):
    write_hf_files(tmp, config, state)
    if tokenizer is not None:
      write_hf_tokenizer(tokenizer, tmp, model_max_length=max_length(model.config))
  return write_beside(directory, write, ("config.json", SAFETENSORS), (), overwrite, "HF checkpoint",
                      HF_TOKENIZER_FILES)


def max_length(cfg: EncoderConfig) -> int:
  """Longest input the model's position table takes (RoBERTa's positions start after the padding id)."""
  return cfg.max_position_embeddings - (cfg.pad_token_id + 1 if cfg.position_style == "roberta" else 0)
