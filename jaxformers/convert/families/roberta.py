"""RoBERTa: ``model_type`` ``roberta``, ``Roberta*`` architectures.

Encoder tensors and config keys are BERT's (:mod:`jaxformers.convert.families.bert`, ``roberta.``
first in head models); the pad id defaults to 1 and position ids start after it
(``position_style="roberta"``, see :attr:`jaxformers.config.EncoderConfig.position_offset`).
Heads: ``lm_head.{dense,layer_norm,bias}`` -> ``lm_head`` (its transform always applies the exact
GELU), ``classifier.dense`` / ``classifier.out_proj`` -> ``classifier`` (first token, dense, tanh,
out), ``classifier`` of token classification -> ``classifier.out``.
"""
from __future__ import annotations

from jaxformers.convert.engine import Ignore, Rule, linear, norm
from jaxformers.convert.families import bert
from jaxformers.convert.families.base import Family, register

HEADS = {
    "base": (),
    "masked_lm": (*linear("lm_head.dense", "lm_head.transform", base=False),
                  *norm("lm_head.layer_norm", "lm_head.norm", base=False),
                  Rule("lm_head.bias", ("lm_head.bias",), base=False)),
    "classification": (*linear("classifier.dense", "classifier.dense", base=False),
                       *linear("classifier.out_proj", "classifier.out", base=False)),
    "token_classification": tuple(linear("classifier", "classifier.out", base=False)),
}
IGNORES = (*bert.BUFFERS,
           Ignore("lm_head.decoder.weight", "decoder tied to the word embeddings",
                  tied_to="embeddings.word_embeddings.weight"),
           Ignore("lm_head.decoder.bias", "decoder bias tied to lm_head.bias", tied_to="lm_head.bias"))


def read_config(hf: dict, where: str) -> tuple[dict, int]:
  return bert.read_config(hf, where, pad_token_id=1, position_style="roberta")


def write_config(cfg) -> dict:
  return {**bert.write_config(cfg), "bos_token_id": 0, "eos_token_id": 2}


ROBERTA = register(Family(
    name="roberta", model_type="roberta", architecture="Roberta", prefix="roberta", layers="encoder.layer",
    rules=bert.RULES, heads=HEADS, ignores=IGNORES, read_config=read_config, write_config=write_config,
    classifier="roberta", lm_head_act="gelu"))
