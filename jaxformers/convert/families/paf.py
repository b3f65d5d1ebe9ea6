"""PAF: parallel attention and feed-forward layers (PAF-RoBERTa) in the key names of a serial family.

A PAF checkpoint is a RoBERTa checkpoint (``model_type`` ``roberta``, RoBERTa tensor names) whose
layers compute ``LN(x + attention(x) + feed_forward(x))`` with ``output.LayerNorm`` as the single
norm; its ``attention.output.LayerNorm`` is unused. Nothing in ``config.json`` marks it, so a
checkpoint is read as PAF when the layout asked for (``layout=``), or else the one stored in the
config's ``jaxformers`` entry by an export, is all ``parallel`` blocks. On import the serial
family's rules apply unchanged (the parallel block's ``norm`` is a candidate of
``output.LayerNorm``; the attention LayerNorm finds no parameter and is reported as dropped); on
export the attention LayerNorm of every layer is written as an identity (ones, zeros) so the PAF
modelling code loads the checkpoint. The same form in BERT's key names is registered as ``paf_bert``.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxformers.convert.families import bert, roberta
from jaxformers.convert.families.base import Family, register


def parallel_form(family: Family, name: str, attention_norm: str) -> Family:
  """``family`` with parallel layers; ``attention_norm`` is the HF name template of its per-layer attention norm."""

  def identity_norms(cfg, prefix: str) -> dict[str, np.ndarray]:
    out = {}
    for i in range(cfg.num_layers):
      out[f"{prefix}{attention_norm.format(i=i)}.weight"] = np.ones(cfg.hidden_size, np.float32)
      out[f"{prefix}{attention_norm.format(i=i)}.bias"] = np.zeros(cfg.hidden_size, np.float32)
    return out

  return dataclasses.replace(
      family, name=name, parallel=True, encoder_family=family.name, extra_tensors=identity_norms,
      description=f"model_type {family.model_type!r} with an all-parallel layout")


PAF = register(parallel_form(roberta.ROBERTA, "paf", bert.ATTENTION_NORM))
PAF_BERT = register(parallel_form(bert.BERT, "paf_bert", bert.ATTENTION_NORM))
