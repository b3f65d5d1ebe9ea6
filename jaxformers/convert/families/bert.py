"""BERT: ``model_type`` ``bert``, ``Bert*`` architectures.

=============================================  =====================================
HF name (``bert.`` first in head models)       jaxformers path (``{i}``: the layer)
=============================================  =====================================
``embeddings.word_embeddings``                 ``embeddings.word``
``embeddings.position_embeddings``             ``embeddings.position``
``embeddings.token_type_embeddings``           ``embeddings.token_type``
``embeddings.LayerNorm``                       ``embeddings.norm``
``encoder.layer.{i}.attention.self.query``     ``blocks.{i}.mixer.query`` (key, value alike)
``encoder.layer.{i}.attention.output.dense``   ``blocks.{i}.mixer.out``
``encoder.layer.{i}.attention.output.LayerNorm`` ``blocks.{i}.mixer_norm`` (parallel blocks: unused)
``encoder.layer.{i}.intermediate.dense``       ``blocks.{i}.mlp.up``
``encoder.layer.{i}.output.dense``             ``blocks.{i}.mlp.down``
``encoder.layer.{i}.output.LayerNorm``         ``blocks.{i}.mlp_norm``, or ``norm`` in parallel blocks
``pooler.dense``                               ``pooler.dense``
=============================================  =====================================

Heads: ``cls.predictions.*`` -> ``lm_head``, ``cls.seq_relationship`` -> ``nsp``, ``classifier`` ->
``classifier.out``. Position ids count from 0. The config keys and encoder tensor names are shared
with RoBERTa (:mod:`jaxformers.convert.families.roberta`), which reads them through
:func:`read_config` and :func:`write_config` with its own defaults.
"""
from __future__ import annotations

from jaxformers.convert.engine import Ignore, Rule, embedding, linear, norm
from jaxformers.convert.families.base import ACTIVATIONS_OUT, Family, activation, register, require
from jaxformers.errors import CheckpointError

_L, _B = "encoder.layer.{i}", "blocks.{i}"

RULES: tuple[Rule, ...] = (
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
)
ATTENTION_NORM = f"{_L}.attention.output.LayerNorm"
BUFFERS = (Ignore("embeddings.position_ids", "position-id buffer"),
           Ignore("embeddings.token_type_ids", "token-type-id buffer"))

_MLM = (*linear("cls.predictions.transform.dense", "lm_head.transform", base=False),
        *norm("cls.predictions.transform.LayerNorm", "lm_head.norm", base=False),
        Rule("cls.predictions.bias", ("lm_head.bias",), base=False))
HEADS = {
    "base": (),
    "masked_lm": _MLM,
    "pretraining": (*_MLM, *linear("cls.seq_relationship", "nsp", base=False)),
    "classification": tuple(linear("classifier", "classifier.out", base=False)),
    "token_classification": tuple(linear("classifier", "classifier.out", base=False)),
}
IGNORES = (*BUFFERS,
           Ignore("cls.predictions.decoder.weight", "decoder tied to the word embeddings",
                  tied_to="embeddings.word_embeddings.weight"),
           Ignore("cls.predictions.decoder.bias", "decoder bias tied to cls.predictions.bias",
                  tied_to="cls.predictions.bias"))


def read_config(hf: dict, where: str, *, pad_token_id: int = 0, position_style: str = "absolute") -> tuple[dict, int]:
  """EncoderConfig fields from a BERT-style config; ``pad_token_id`` is the default when the config has none."""
  require(hf, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "max_position_embeddings"), where)
  pet = hf.get("position_embedding_type", "absolute")
  if pet != "absolute":
    raise CheckpointError(f"{where}: position_embedding_type {pet!r} is not supported; expected 'absolute'")
  return dict(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_heads=hf["num_attention_heads"],
      intermediate_size=hf["intermediate_size"], max_position_embeddings=hf["max_position_embeddings"],
      type_vocab_size=hf.get("type_vocab_size", 2), pad_token_id=hf.get("pad_token_id", pad_token_id),
      position_style=position_style, layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
      hidden_act=activation(hf, "hidden_act", where),
      hidden_dropout=hf.get("hidden_dropout_prob", 0.1), attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
      initializer_range=hf.get("initializer_range", 0.02)), hf["num_hidden_layers"]


def write_config(cfg) -> dict:
  return {"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
          "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size,
          "hidden_act": ACTIVATIONS_OUT[cfg.hidden_act], "hidden_dropout_prob": cfg.hidden_dropout,
          "attention_probs_dropout_prob": cfg.attention_dropout, "max_position_embeddings": cfg.max_position_embeddings,
          "type_vocab_size": cfg.type_vocab_size, "initializer_range": cfg.initializer_range,
          "layer_norm_eps": cfg.layer_norm_eps, "pad_token_id": cfg.pad_token_id, "position_embedding_type": "absolute"}


BERT = register(Family(
    name="bert", model_type="bert", architecture="Bert", prefix="bert", layers="encoder.layer", rules=RULES,
    heads=HEADS, ignores=IGNORES, read_config=read_config, write_config=write_config, classifier="bert"))
