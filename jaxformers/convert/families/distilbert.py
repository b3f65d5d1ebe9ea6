"""DistilBERT: ``model_type`` ``distilbert``, ``DistilBert*`` architectures.

==================================================  =====================================
HF name (``distilbert.`` first in head models)      jaxformers path (``{i}``: the layer)
==================================================  =====================================
``embeddings.word_embeddings``                      ``embeddings.word``
``embeddings.position_embeddings``                  ``embeddings.position``
``embeddings.LayerNorm``                            ``embeddings.norm``
``transformer.layer.{i}.attention.q_lin``           ``blocks.{i}.mixer.query`` (``k_lin``, ``v_lin`` alike)
``transformer.layer.{i}.attention.out_lin``         ``blocks.{i}.mixer.out``
``transformer.layer.{i}.sa_layer_norm``             ``blocks.{i}.mixer_norm``
``transformer.layer.{i}.ffn.lin1``                  ``blocks.{i}.mlp.up``
``transformer.layer.{i}.ffn.lin2``                  ``blocks.{i}.mlp.down``
``transformer.layer.{i}.output_layer_norm``         ``blocks.{i}.mlp_norm``, or ``norm`` in parallel blocks
==================================================  =====================================

No token-type embeddings (``type_vocab_size=0``) and no pooler; position ids count from 0; every
LayerNorm has epsilon 1e-12. Heads: ``vocab_transform`` / ``vocab_layer_norm`` /
``vocab_projector.bias`` -> ``lm_head`` (``vocab_projector.weight`` is tied to the word
embeddings), ``classifier`` of token classification -> ``classifier.out``. Config keys: ``dim``,
``n_layers``, ``n_heads``, ``hidden_dim``, ``activation``, ``dropout``, ``attention_dropout``,
``max_position_embeddings``, ``sinusoidal_pos_embds``. A sinusoidal position table is stored in
the checkpoint like a learned one and loaded as it is; exports write
``sinusoidal_pos_embds: false`` so transformers uses the stored table. Sequence classification
(``pre_classifier``, ReLU, ``classifier``) has no jaxformers head and is refused.
"""
from __future__ import annotations

from jaxformers.convert.engine import Ignore, Rule, embedding, linear, norm
from jaxformers.convert.families.base import ACTIVATIONS_OUT, Family, activation, register, require
from jaxformers.errors import CheckpointError

_L, _B = "transformer.layer.{i}", "blocks.{i}"
LAYER_NORM_EPS = 1e-12

RULES: tuple[Rule, ...] = (
    *embedding("embeddings.word_embeddings", "embeddings.word"),
    *embedding("embeddings.position_embeddings", "embeddings.position"),
    *norm("embeddings.LayerNorm", "embeddings.norm"),
    *(r for n, m in (("q_lin", "query"), ("k_lin", "key"), ("v_lin", "value"), ("out_lin", "out"))
      for r in linear(f"{_L}.attention.{n}", f"{_B}.mixer.{m}", group="mixer")),
    *norm(f"{_L}.sa_layer_norm", f"{_B}.mixer_norm", group="mixer"),
    *linear(f"{_L}.ffn.lin1", f"{_B}.mlp.up", group="mlp"),
    *linear(f"{_L}.ffn.lin2", f"{_B}.mlp.down", group="mlp"),
    *norm(f"{_L}.output_layer_norm", (f"{_B}.mlp_norm", f"{_B}.norm"), group="mlp"),
)
HEADS = {
    "base": (),
    "masked_lm": (*linear("vocab_transform", "lm_head.transform", base=False),
                  *norm("vocab_layer_norm", "lm_head.norm", base=False),
                  Rule("vocab_projector.bias", ("lm_head.bias",), base=False)),
    "token_classification": tuple(linear("classifier", "classifier.out", base=False)),
}
IGNORES = (Ignore("embeddings.position_ids", "position-id buffer"),
           Ignore("vocab_projector.weight", "decoder tied to the word embeddings",
                  tied_to="embeddings.word_embeddings.weight"))


def read_config(hf: dict, where: str) -> tuple[dict, int]:
  require(hf, ("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim", "max_position_embeddings"), where)
  return dict(
      vocab_size=hf["vocab_size"], hidden_size=hf["dim"], num_heads=hf["n_heads"], intermediate_size=hf["hidden_dim"],
      max_position_embeddings=hf["max_position_embeddings"], pad_token_id=hf.get("pad_token_id", 0),
      position_style="absolute", layer_norm_eps=LAYER_NORM_EPS, hidden_act=activation(hf, "activation", where),
      hidden_dropout=hf.get("dropout", 0.1), attention_dropout=hf.get("attention_dropout", 0.1),
      initializer_range=hf.get("initializer_range", 0.02)), hf["n_layers"]


def write_config(cfg) -> dict:
  if cfg.layer_norm_eps != LAYER_NORM_EPS or cfg.position_style != "absolute":
    raise CheckpointError(f"layer_norm_eps={cfg.layer_norm_eps}, position_style={cfg.position_style!r}: DistilBERT "
                          f"checkpoints have layer_norm_eps={LAYER_NORM_EPS} and position ids from 0 ('absolute')")
  return {"vocab_size": cfg.vocab_size, "dim": cfg.hidden_size, "n_layers": cfg.num_layers, "n_heads": cfg.num_heads,
          "hidden_dim": cfg.intermediate_size, "activation": ACTIVATIONS_OUT[cfg.hidden_act],
          "dropout": cfg.hidden_dropout, "attention_dropout": cfg.attention_dropout,
          "max_position_embeddings": cfg.max_position_embeddings, "sinusoidal_pos_embds": False,
          "initializer_range": cfg.initializer_range, "pad_token_id": cfg.pad_token_id}


DISTILBERT = register(Family(
    name="distilbert", model_type="distilbert", architecture="DistilBert", prefix="distilbert",
    layers="transformer.layer", rules=RULES, heads=HEADS, ignores=IGNORES, read_config=read_config,
    write_config=write_config, token_types=False, classifier="roberta"))
