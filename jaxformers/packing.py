"""Padding-free execution: pack variable-length examples into fixed-size rows.

ByteTransformer's observation is that real batches are mostly padding. With static
shapes the JAX equivalent is packing: several examples share a row, told apart by
segment ids (1, 2, ... per example, 0 for the unused tail), each with its own positions.
Every block honours segment ids (attention masks across examples, sparse attention
also within its window, Fourier mixing transforms each example over its own length,
position-wise layers need nothing), heads give one output per example.

    batch = pack([ids_a, ids_b, ...], row_length=128)
    out = model.encoder(batch.input_ids, segment_ids=batch.segment_ids, max_segments=batch.max_segments)
    per_example = batch.unpack_tokens(out.last_hidden_state)     # list, input order
    pooled = batch.unpack_segments(out.pooler_output)            # [num_examples, hidden]
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxformers import models
from jaxformers.layers.common import DEFAULT_MAX_SEGMENTS


@dataclasses.dataclass
class PackedBatch:
  input_ids: np.ndarray        # [rows, row_length]
  segment_ids: np.ndarray      # [rows, row_length], 0 = unused
  token_type_ids: np.ndarray | None
  slots: np.ndarray            # [rows, max_segments]: example index in each sequence slot, -1 if empty
  starts: np.ndarray           # [num_examples]: (row, column) of each example's first token
  lengths: np.ndarray          # [num_examples]
  max_segments: int

  @property
  def num_examples(self) -> int:
    return len(self.lengths)

  @property
  def padding_fraction(self) -> float:
    """Share of the packed rows' positions that hold no token."""
    return 1.0 - float(self.lengths.sum()) / self.input_ids.size

  def unpack_tokens(self, x: np.ndarray) -> list[np.ndarray]:
    """Per-token outputs ``[rows, row_length, ...]`` -> one ``[length_i, ...]`` array per example, input order."""
    x = np.asarray(x)
    return [x[r, c:c + n] for (r, c), n in zip(self.starts, self.lengths)]

  def unpack_segments(self, x: np.ndarray) -> np.ndarray:
    """Per-sequence outputs ``[rows, max_segments, ...]`` -> ``[num_examples, ...]``, input order."""
    return scatter_segments(x, self.slots, self.num_examples)


def scatter_segments(x: np.ndarray, slots: np.ndarray, num_examples: int) -> np.ndarray:
  """Per-sequence outputs ``[rows, max_segments, ...]`` -> ``[num_examples, ...]`` by ``slots`` (example index per
  sequence slot, -1 for empty ones)."""
  x = np.asarray(x)
  out = np.empty((num_examples,) + x.shape[2:], x.dtype)
  rows, cols = np.nonzero(slots >= 0)
  out[slots[rows, cols]] = x[rows, cols]
  return out


def padded_fraction(lengths: Sequence[int], pad_to: int | None = None) -> float:
  """Share of padding when each example sits in its own row of ``pad_to`` (default: the longest)."""
  lengths = np.asarray(lengths)
  width = pad_to or int(lengths.max())
  return 1.0 - float(lengths.sum()) / (len(lengths) * width)


def first_fit(lengths: Sequence[int], row_length: int, max_segments: int = DEFAULT_MAX_SEGMENTS,
              sort: bool = True) -> list[list[int]]:
  """Greedy first-fit bin packing: example indices per row. ``sort`` packs the longest first (first-fit decreasing)."""
  order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort else range(len(lengths))
  rows: list[list[int]] = []
  space: list[int] = []
  for i in order:
    n = int(lengths[i])
    if n > row_length:
      raise ValueError(f"example {i} has {n} tokens, more than row_length={row_length}; truncate it first")
    if n == 0:
      raise ValueError(f"example {i} is empty; every example needs at least one token")
    for r, free in enumerate(space):
      if free >= n and len(rows[r]) < max_segments:
        rows[r].append(i)
        space[r] -= n
        break
    else:
      rows.append([i])
      space.append(row_length - n)
  return rows


def best_fit(lengths: Sequence[int], row_length: int, max_segments: int = DEFAULT_MAX_SEGMENTS) -> list[list[int]]:
  """Best-fit decreasing bin packing: example indices per row, longest examples first, each into the open row
  with the least free space that still holds it. Same contract as :func:`first_fit`, but ``O(n * row_length)``
  at worst instead of ``O(n * rows)``, so whole epochs of a large data set pack in seconds."""
  lengths = np.asarray(lengths, np.int64)
  if len(lengths) and lengths.max() > row_length:
    i = int(np.argmax(lengths))
    raise ValueError(f"example {i} has {lengths[i]} tokens, more than row_length={row_length}; truncate it first")
  if len(lengths) and lengths.min() < 1:
    raise ValueError(f"example {int(np.argmin(lengths))} is empty; every example needs at least one token")
  order = np.argsort(-lengths, kind="stable")
  rows: list[list[int]] = []
  by_free: list[list[int]] = [[] for _ in range(row_length + 1)]   # open rows by free space (stacks)
  free_of: list[int] = []
  for i in order:
    n = int(lengths[i])
    r = -1
    for f in range(n, row_length + 1):
      while by_free[f] and free_of[by_free[f][-1]] != f:   # stale entry: the row moved or closed
        by_free[f].pop()
      if by_free[f]:
        r = by_free[f].pop()
        break
    if r < 0:
      r = len(rows)
      rows.append([])
      free_of.append(row_length)
    rows[r].append(int(i))
    free_of[r] -= n
    if len(rows[r]) < max_segments and free_of[r] > 0:
      by_free[free_of[r]].append(r)
    else:
      free_of[r] = -1                                         # closed
  return rows


def pack(examples: Sequence[Sequence[int]], row_length: int, *, token_types: Sequence[Sequence[int]] | None = None,
         max_segments: int = DEFAULT_MAX_SEGMENTS, pad_id: int = 0, min_rows: int = 0, sort: bool = True) -> PackedBatch:
  """Pack token-id sequences into rows of ``row_length`` (at least ``min_rows`` rows, extra rows empty)."""
  lengths = np.array([len(e) for e in examples], np.int64)
  plan = first_fit(lengths, row_length, max_segments, sort)
  n_rows = max(len(plan), min_rows)
  ids = np.full((n_rows, row_length), pad_id, np.int32)
  seg = np.zeros((n_rows, row_length), np.int32)
  types = np.zeros((n_rows, row_length), np.int32) if token_types is not None else None
  slots = np.full((n_rows, max_segments), -1, np.int64)
  starts = np.zeros((len(examples), 2), np.int64)
  for r, members in enumerate(plan):
    col = 0
    for s, i in enumerate(members):
      n = lengths[i]
      ids[r, col:col + n] = examples[i]
      seg[r, col:col + n] = s + 1
      if types is not None:
        types[r, col:col + n] = token_types[i]
      slots[r, s] = i
      starts[i] = (r, col)
      col += n
  return PackedBatch(ids, seg, types, slots, starts, lengths, max_segments)


def _run_chunk(graphdef, fn, state, input_ids, segment_ids):
  enc = nnx.merge(graphdef, state)
  enc.eval()
  return fn(enc, input_ids, segment_ids)


@functools.cache
def _jitted_chunk():
  return jax.jit(_run_chunk, static_argnums=(0, 1))


def chunk_runner(encoder, fn):
  """``run(input_ids, segment_ids)``: ``fn(encoder, input_ids, segment_ids)`` jitted, with the encoder in eval mode
  (no dropout, whatever mode the caller's is in). ``fn`` must be hashable and equal for equal behaviour (a
  module-level function or a frozen dataclass): the compiled code is then reused by every later call with the
  same model structure, ``fn`` and shapes, so repeated encoding never recompiles. Calls dispatch asynchronously."""
  graphdef, state = nnx.split(encoder)
  jitted = _jitted_chunk()
  return lambda input_ids, segment_ids: jitted(graphdef, fn, state, input_ids, segment_ids)


def run_packed(encoder, batch: PackedBatch, rows_per_call: int, fn, max_segments: int, progress: bool = False):
  """``fn(encoder, input_ids, segment_ids)`` over the rows of ``batch`` through :func:`chunk_runner`:
  ``rows_per_call`` rows a call, the last call filled with empty rows, so every call has the same shape. Returns
  ``fn``'s outputs (any pytree of ``[rows, ...]`` arrays, None leaves allowed) as numpy arrays over the batch's rows."""

  run = chunk_runner(encoder, fn)
  pad_id = encoder.config.pad_token_id
  n_rows = batch.input_ids.shape[0]
  calls = -(-n_rows // rows_per_call)
  extra = calls * rows_per_call - n_rows
  input_ids = np.pad(batch.input_ids, ((0, extra), (0, 0)), constant_values=pad_id)
  segment_ids = np.pad(batch.segment_ids, ((0, extra), (0, 0)))
  chunks = range(calls)
  if progress:
    chunks = tqdm(chunks, desc="encode", unit="call")
  outs = [run(input_ids[c * rows_per_call:(c + 1) * rows_per_call],
              segment_ids[c * rows_per_call:(c + 1) * rows_per_call]) for c in chunks]
  return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs])[:n_rows], *outs)


@dataclasses.dataclass(frozen=True)
class _AllOutputs:
  """The encoder's last hidden state, pooler output and first-token state (hashable, for :func:`chunk_runner`)."""
  max_segments: int

  def __call__(self, enc, input_ids, segment_ids):
    out = enc(input_ids, segment_ids=segment_ids, max_segments=self.max_segments)
    return out.last_hidden_state, out.pooler_output, out.first_token_state


def encode_texts(model, tokenizer, texts: Sequence[str], *, row_length: int = 512, rows_per_call: int = 8,
                 max_segments: int = DEFAULT_MAX_SEGMENTS) -> dict:
  """Tokenise ``texts``, pack them, run the encoder, and return per-text outputs in input order.

  ``tokenizer`` is a ``tokenizers.Tokenizer`` or a transformers tokenizer. Returns
  ``{"last_hidden_state": [array [len_i, hidden] per text], "pooler_output": [n, hidden] or None,
  "first_token_state": [n, hidden], "padding_fraction": float}``, computed in eval mode (no dropout) whatever
  mode ``model`` is in. Rows are run ``rows_per_call`` at a time
  through one jitted function (:func:`run_packed`), so every call has the same shape.
  """

  if hasattr(tokenizer, "encode_batch"):
    ids = [[t for t, m in zip(e.ids, e.attention_mask) if m] for e in tokenizer.encode_batch(list(texts))]
  else:
    ids = tokenizer(list(texts), truncation=True, max_length=row_length)["input_ids"]
  ids = [i[:row_length] for i in ids]
  batch = pack(ids, row_length, max_segments=max_segments, pad_id=model.config.pad_token_id)

  hidden, pooled, first = run_packed(models.encoder_of(model), batch, rows_per_call, _AllOutputs(max_segments),
                                     max_segments)
  return {"last_hidden_state": batch.unpack_tokens(hidden),
          "pooler_output": batch.unpack_segments(pooled) if pooled is not None else None,
          "first_token_state": batch.unpack_segments(first),
          "padding_fraction": batch.padding_fraction}
