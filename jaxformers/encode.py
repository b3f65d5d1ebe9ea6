"""Encode texts into fixed-size vectors: packed rows, one compiled shape, pooling, normalisation.

``encode(model_or_path, texts)`` tokenises the texts, packs them into rows of ``max_length`` tokens
(several texts a row, no padding to compute), runs the encoder ``rows`` rows at a time through one
jitted function (the last chunk is filled with empty rows, so nothing recompiles), pools each text's
tokens (``cls``: its first token's final state; ``mean``: the mean over its tokens, special tokens
included, as sentence-transformers does; ``max``: the elementwise max) and optionally L2-normalises.
The result is a numpy array ``[len(texts), hidden]`` in input order. Given a sentence-transformers
directory (``modules.json``, ``1_Pooling/config.json``, ``sentence_bert_config.json``), its pooling,
normalisation and ``max_seq_length`` are the defaults, so the call gives sentence-transformers' vectors.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

POOLINGS = ("cls", "mean", "max")


def sentence_transformers_config(path: str | Path) -> dict:
  """``{"pooling", "normalize", "max_length"}`` from a sentence-transformers directory ({} if it is not one)."""
  path = Path(path)
  if not (path / "modules.json").is_file():
    return {}
  modules = json.loads((path / "modules.json").read_text())
  out = {"normalize": any(m.get("type", "").endswith("Normalize") for m in modules)}
  for m in modules:
    if m.get("type", "").endswith("Pooling"):
      cfg = json.loads((path / m["path"] / "config.json").read_text())
      modes = [p for p, key in (("cls", "pooling_mode_cls_token"), ("mean", "pooling_mode_mean_tokens"),
                                ("max", "pooling_mode_max_tokens")) if cfg.get(key)]
      if len(modes) != 1:
        raise ValueError(f"{path / m['path'] / 'config.json'}: pooling modes {modes or 'none'}; jaxformers.encode "
                         f"supports exactly one of {', '.join(POOLINGS)}")
      out["pooling"] = modes[0]
  if (path / "sentence_bert_config.json").is_file():
    out["max_length"] = int(json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"])
  return out


def encode(model_or_path, texts: Sequence[str], *, pooling: str | None = None, normalize: bool | None = None,
           max_length: int | None = None, batch_tokens: int = 8192, tokenizer=None, max_segments: int = 16,
           progress: bool | None = None, **overrides) -> np.ndarray:
  """Vectors ``[len(texts), hidden]`` for ``texts``, in input order (see the module docstring).

  ``model_or_path``: a model (then pass ``tokenizer``, a ``tokenizers.Tokenizer``) or anything
  ``from_pretrained`` takes (its tokenizer is used; ``overrides`` such as ``dtype="bfloat16"`` go to
  ``from_pretrained``). Defaults: the sentence-transformers settings of the directory, else ``cls`` pooling,
  no normalisation and the model's longest input. ``batch_tokens``: tokens a compiled call processes.
  """
  import jax.numpy as jnp

  from jaxformers import models
  from jaxformers.convert.hf import max_length as model_max_length
  from jaxformers.packing import pack, run_packed

  st = {}
  if isinstance(model_or_path, (str, Path)):
    from jaxformers.hub import resolve
    from jaxformers.pretrained import from_pretrained
    from jaxformers.runs import load_tokenizer
    path = resolve(model_or_path)
    st = sentence_transformers_config(path)
    model = from_pretrained(path, **overrides)
    tokenizer = tokenizer or load_tokenizer(path)
  else:
    model = model_or_path
    if tokenizer is None:
      raise ValueError("encode(model, texts) needs tokenizer=: a tokenizers.Tokenizer (jaxformers.load_tokenizer)")
  pooling = pooling or st.get("pooling", "cls")
  if pooling not in POOLINGS:
    raise ValueError(f"pooling={pooling!r}: expected one of {', '.join(POOLINGS)}")
  normalize = st.get("normalize", False) if normalize is None else normalize
  encoder = models.encoder_of(model)
  limit = model_max_length(encoder.config)
  max_length = min(max_length or st.get("max_length") or limit, limit)
  texts = list(texts)
  if not texts:
    return np.zeros((0, encoder.config.hidden_size), np.float32)

  tok = tokenizer.__class__.from_str(tokenizer.to_str())   # a private copy: padding/truncation are per object
  tok.no_padding()
  tok.enable_truncation(max_length)
  ids = [e.ids for e in tok.encode_batch(texts)]
  batch = pack(ids, max_length, max_segments=max_segments, pad_id=encoder.config.pad_token_id)
  rows = max(1, batch_tokens // max_length)

  def pooled(enc, ids_BL, seg_BL):
    out = enc(ids_BL, segment_ids=seg_BL, max_segments=max_segments, first_tokens_only=pooling == "cls")
    if pooling == "cls":
      v_BSD = out.first_token_state
    else:
      own_BSL = seg_BL[:, None, :] == jnp.arange(1, max_segments + 1, dtype=seg_BL.dtype)[None, :, None]
      h_BLD = out.last_hidden_state.astype(jnp.float32)
      if pooling == "mean":
        n_BS = jnp.maximum(own_BSL.sum(-1, keepdims=True), 1)
        v_BSD = jnp.einsum("bsl,bld->bsd", own_BSL.astype(jnp.float32), h_BLD) / n_BS
      else:
        v_BSD = jnp.max(jnp.where(own_BSL[..., None], h_BLD[:, None], -jnp.inf), axis=2)
        v_BSD = jnp.where(own_BSL.any(-1)[..., None], v_BSD, 0.0)
    v_BSD = v_BSD.astype(jnp.float32)
    if normalize:
      v_BSD = v_BSD / jnp.maximum(jnp.linalg.norm(v_BSD, axis=-1, keepdims=True), 1e-12)
    return v_BSD

  n_calls = -(-batch.input_ids.shape[0] // rows)
  vectors = run_packed(encoder, batch, rows, pooled, max_segments,
                       progress=progress if progress is not None else n_calls > 20)
  return batch.unpack_segments(vectors)
