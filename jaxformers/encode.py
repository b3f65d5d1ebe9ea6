"""Encode texts into fixed-size vectors: packed rows, one compiled shape, pooling, normalisation.

``encode(model_or_path, texts)`` tokenises the texts, packs them into rows of ``max_length`` tokens
(several texts a row, no padding to compute), runs the encoder ``rows`` rows at a time through one
jitted function (the last chunk is filled with empty rows, so nothing recompiles), pools each text's
tokens (``cls``: its first token's final state; ``mean``: the mean over its tokens, special tokens
included, as sentence-transformers does; ``max``: the elementwise max) and optionally L2-normalises.
The result is a numpy array ``[len(texts), hidden]`` in input order. Texts are tokenised a block at a time while
the device runs the previous block's calls (JAX dispatches them asynchronously); ``dtype="bfloat16"`` computes in
bfloat16 with the float32 parameters (softmax and LayerNorm statistics stay float32). Given a sentence-transformers
directory (``modules.json``, ``1_Pooling/config.json``, ``sentence_bert_config.json``), its pooling,
normalisation and ``max_seq_length`` are the defaults, so the call gives sentence-transformers' vectors; a native
checkpoint saved from such a directory (converted, pruned or quantized) keeps them in ``jaxformers.json``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxformers import models
from jaxformers.checkpoints.hub import resolve
from jaxformers.checkpoints.pretrained import from_pretrained
from jaxformers.checkpoints.tokenizers import POOLINGS, load_tokenizer, sentence_transformers_config
from jaxformers.config import DTYPES
from jaxformers.packing import chunk_runner, pack, scatter_segments


@dataclasses.dataclass(frozen=True)
class Pooler:
  """``fn`` for :func:`jaxformers.packing.chunk_runner`: per-sequence vectors ``[rows, max_segments, hidden]``
  (float32) of packed rows; hashable, so equal settings reuse one compiled function across calls."""
  pooling: str
  normalize: bool
  max_segments: int

  def __call__(self, enc, ids_BL, seg_BL):
    out = enc(ids_BL, segment_ids=seg_BL, max_segments=self.max_segments, first_tokens_only=self.pooling == "cls")
    if self.pooling == "cls":
      v_BSD = out.first_token_state
    else:
      own_BSL = seg_BL[:, None, :] == jnp.arange(1, self.max_segments + 1, dtype=seg_BL.dtype)[None, :, None]
      h_BLD = out.last_hidden_state.astype(jnp.float32)
      if self.pooling == "mean":
        n_BS = jnp.maximum(own_BSL.sum(-1, keepdims=True), 1)
        v_BSD = jnp.einsum("bsl,bld->bsd", own_BSL.astype(jnp.float32), h_BLD) / n_BS
      else:
        v_BSD = jnp.max(jnp.where(own_BSL[..., None], h_BLD[:, None], -jnp.inf), axis=2)
        v_BSD = jnp.where(own_BSL.any(-1)[..., None], v_BSD, 0.0)
    v_BSD = v_BSD.astype(jnp.float32)
    if self.normalize:
      v_BSD = v_BSD / jnp.maximum(jnp.linalg.norm(v_BSD, axis=-1, keepdims=True), 1e-12)
    return v_BSD


def with_dtype(encoder, dtype: str):
  """A copy of ``encoder`` computing in ``dtype``; its parameters are the same arrays (nothing is copied)."""

  out = nnx.clone(encoder)
  for _, m in out.iter_modules():
    if isinstance(m, (nnx.Linear, nnx.LayerNorm, nnx.Embed)):   # the layers built from config.dtype (layers.common)
      m.dtype = jnp.dtype(dtype)
  out.config = out.config.replace(dtype=dtype)
  return out


def encode(model_or_path, texts: str | Sequence[str], *, pooling: str | None = None, normalize: bool | None = None,
           max_length: int | None = None, batch_tokens: int = 8192, tokenizer=None, max_segments: int = 16,
           dtype: str | None = None, progress: bool | None = None, tokenize_block: int = 512,
           **overrides) -> np.ndarray:
  """Vectors ``[len(texts), hidden]`` for ``texts``, in input order (see the module docstring); a single string is
  one text and gives one vector ``[hidden]``, as ``SentenceTransformer.encode`` does.

  ``model_or_path``: a model (then pass ``tokenizer``, a ``tokenizers.Tokenizer``) or anything
  ``from_pretrained`` takes (its tokenizer is used; ``overrides`` go to ``from_pretrained``). Defaults: the
  sentence-transformers settings of the directory, else ``cls`` pooling, no normalisation and the model's longest
  input. ``batch_tokens``: tokens a compiled call processes. ``dtype``: compute dtype (``"float32"``,
  ``"bfloat16"``; default the model's), parameters stay as they are. Texts are tokenised ``tokenize_block`` at a
  time while the device runs the previous block's calls. ``progress``: a progress bar (default: more than 20 calls).
  """

  _check_arguments(dtype, tokenize_block, max_length)
  if isinstance(texts, str):   # one text, not a sequence of one-character texts
    return encode(model_or_path, [texts], pooling=pooling, normalize=normalize, max_length=max_length,
                  batch_tokens=batch_tokens, tokenizer=tokenizer, max_segments=max_segments, dtype=dtype,
                  progress=progress, tokenize_block=tokenize_block, **overrides)[0]
  model, tokenizer, st = _load(model_or_path, tokenizer, dtype, overrides)
  pooling = pooling or st.get("pooling", "cls")
  if pooling not in POOLINGS:
    raise ValueError(f"pooling={pooling!r}: expected one of {', '.join(POOLINGS)}")
  normalize = st.get("normalize", False) if normalize is None else normalize
  encoder = models.encoder_of(model)
  if dtype is not None and dtype != encoder.config.dtype:
    encoder = with_dtype(encoder, dtype)
  limit = encoder.config.max_length
  max_length = min(max_length or st.get("max_length") or limit, limit)
  texts = list(texts)
  if not texts:
    return np.zeros((0, encoder.config.hidden_size), np.float32)

  tok = tokenizer.__class__.from_str(tokenizer.to_str())   # a private copy: padding/truncation are per object
  tok.no_padding()
  tok.enable_truncation(max_length)
  bar = None
  if progress or (progress is None and sum(len(t) for t in texts) > 20 * 4 * batch_tokens):   # ~4 characters a token
    bar = tqdm(total=len(texts), desc="encode", unit="text")
  run = chunk_runner(encoder, Pooler(pooling, bool(normalize), max_segments))
  try:
    return _run_blocks(run, tok, texts, rows=max(1, batch_tokens // max_length), max_length=max_length,
                       max_segments=max_segments, pad_id=encoder.config.pad_token_id, tokenize_block=tokenize_block,
                       bar=bar)
  finally:
    if bar is not None:
      bar.close()


def _check_arguments(dtype: str | None, tokenize_block: int, max_length: int | None) -> None:
  """Refuse :func:`encode`'s settings that cannot work, before loading anything."""
  if dtype is not None and dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
  if tokenize_block < 1:
    raise ValueError(f"tokenize_block={tokenize_block}: expected a positive number of texts")
  if max_length is not None and max_length < 2:
    raise ValueError(f"max_length={max_length}: expected at least 2 tokens a text (its special tokens included)")


def _load(model_or_path, tokenizer, dtype: str | None, overrides: dict) -> tuple:
  """``(model, tokenizer, sentence-transformers settings)``: loaded when ``model_or_path`` is a path or Hub id (the
  settings of its directory, else none), else the model as given with the ``tokenizer`` it needs."""
  if not isinstance(model_or_path, (str, Path)):
    if tokenizer is None:
      raise ValueError("encode(model, texts) needs tokenizer=: a tokenizers.Tokenizer (jaxformers.load_tokenizer)")
    return model_or_path, tokenizer, {}
  path = resolve(model_or_path)
  st = sentence_transformers_config(path)
  model = from_pretrained(path, **({"dtype": dtype} if dtype else {}), **overrides)
  return model, tokenizer or load_tokenizer(path), st


def _run_blocks(run, tok, texts: list[str], *, rows: int, max_length: int, max_segments: int, pad_id: int,
                tokenize_block: int, bar) -> np.ndarray:
  """Tokenise a block, pack it, dispatch its full chunks of ``rows`` rows to ``run`` (asynchronously), tokenise the
  next block meanwhile. Rows that do not fill a chunk wait for the next block; the last chunk is filled with empty
  rows. The vectors of ``texts`` in their order."""
  carry = (np.zeros((0, max_length), np.int32), np.zeros((0, max_length), np.int32),
           np.zeros((0, max_segments), np.int64))
  done, in_flight = [], []

  def collect(block):
    for out, s in block:
      done.append((np.asarray(out), s))
      if bar is not None:
        bar.update(int((s >= 0).sum()))
  for start in range(0, len(texts), tokenize_block):
    last = start + tokenize_block >= len(texts)
    ids = [e.ids for e in tok.encode_batch(texts[start:start + tokenize_block])]
    batch = pack(ids, max_length, max_segments=max_segments, pad_id=pad_id)
    slots = np.where(batch.slots >= 0, batch.slots + start, -1)
    buf = [np.concatenate([c, b]) for c, b in zip(carry, (batch.input_ids, batch.segment_ids, slots))]
    n = len(buf[0]) if not last else -(-len(buf[0]) // rows) * rows
    if last and n > len(buf[0]):
      extra = n - len(buf[0])
      buf = [np.pad(buf[0], ((0, extra), (0, 0)), constant_values=pad_id), np.pad(buf[1], ((0, extra), (0, 0))),
             np.pad(buf[2], ((0, extra), (0, 0)), constant_values=-1)]
    n -= n % rows
    block = [(run(buf[0][c:c + rows], buf[1][c:c + rows]), buf[2][c:c + rows]) for c in range(0, n, rows)]
    carry = [b[n:] for b in buf]
    collect(in_flight)     # keep at most two blocks in flight: bounded memory, an honest progress bar
    in_flight = block
  collect(in_flight)
  return scatter_segments(np.concatenate([o for o, _ in done]), np.concatenate([s for _, s in done]), len(texts))
