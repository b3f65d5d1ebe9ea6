"""Deterministic, resumable batching with length buckets and dynamic padding, and MLM masking.

Every batch is a pure function of ``(seed, epoch, index)``: the order of an epoch is
drawn from ``numpy.random.default_rng([seed, epoch])``, so saving ``(epoch, index)``
with a checkpoint is enough for a resumed run to see exactly the batches it would
have seen.
"""
from __future__ import annotations

import numpy as np

from jaxformers.data.tokenize import Tokenized


def bucket_lengths(max_length: int, smallest: int = 32) -> tuple[int, ...]:
  """Powers of two from ``smallest`` up to ``max_length`` (and ``max_length`` itself)."""
  out, b = [], smallest
  while b < max_length:
    out.append(b)
    b *= 2
  return tuple(out) + (max_length,)


def pad_rows(data: Tokenized, rows: np.ndarray, length: int, pad_id: int, batch_size: int) -> dict:
  """Rows ``rows`` of ``data`` padded to ``[batch_size, length]``; missing rows get weight 0."""
  ids = np.full((batch_size, length), pad_id, np.int32)
  types = np.zeros((batch_size, length), np.int32)
  mask = np.zeros((batch_size, length), np.int32)
  for j, r in enumerate(rows):
    x = data.ids[r]
    ids[j, :len(x)] = x
    types[j, :len(x)] = data.type_ids[r]
    mask[j, :len(x)] = 1
  weights = np.zeros((batch_size,), np.float32)
  weights[:len(rows)] = 1.0
  out = {"input_ids": ids, "token_type_ids": types, "attention_mask": mask, "weights": weights}
  lab = np.zeros((batch_size,), np.int32 if data.label is None else data.label.dtype)
  if data.label is not None:   # unlabelled (test) rows keep label 0: only their logits are used
    lab[:len(rows)] = data.label[rows]
  out["labels"] = lab
  return out


def mask_tokens(batch: dict, rng: np.random.Generator, *, mask_id: int, vocab_size: int,
                special_ids: tuple[int, ...], prob: float = 0.15) -> dict:
  """BERT dynamic masking: choose ``prob`` of the real tokens; 80% -> [MASK], 10% random, 10% unchanged.

  Returns the batch with ``labels`` ``[B, L]`` (the original ids) and ``weights`` ``[B, L]``
  (1 where a token was chosen).
  """
  ids = batch["input_ids"]
  candidate = batch["attention_mask"].astype(bool) & ~np.isin(ids, np.asarray(special_ids, np.int32))
  candidate &= batch["weights"][:, None] > 0
  chosen = candidate & (rng.random(ids.shape) < prob)
  # make sure every row with candidates predicts at least one token
  none = candidate.any(1) & ~chosen.any(1)
  for r in np.nonzero(none)[0]:
    chosen[r, rng.choice(np.nonzero(candidate[r])[0])] = True
  u = rng.random(ids.shape)
  new = ids.copy()
  new[chosen & (u < 0.8)] = mask_id
  rand = chosen & (u >= 0.8) & (u < 0.9)
  new[rand] = rng.integers(0, vocab_size, size=int(rand.sum()), dtype=np.int32)
  out = dict(batch)
  out["input_ids"] = new
  out["labels"] = ids
  out["weights"] = chosen.astype(np.float32)
  return out


class TrainBatches:
  """An endless, deterministic stream of fixed-size training batches.

  Each epoch shuffles the examples, sorts windows of ``window`` batches by length (so a
  batch holds similar lengths), drops the last incomplete batch, and shuffles the
  batch order. ``state()`` / ``restore()`` carry the position ``(epoch, index)``.
  """

  def __init__(self, data: Tokenized, batch_size: int, seed: int, max_length: int, pad_id: int,
               window: int = 50, mlm: dict | None = None):
    if len(data) < batch_size:
      raise ValueError(f"{data.origin}: {len(data)} examples is fewer than one batch of {batch_size}; "
                       f"lower data.batch_size")
    self.data, self.batch_size, self.seed, self.pad_id = data, batch_size, seed, pad_id
    self.buckets = np.asarray(bucket_lengths(max_length))
    self.window, self.mlm = window, mlm
    self.lengths = data.lengths
    self.epoch, self.index = 0, 0
    self._order = None

  @property
  def batches_per_epoch(self) -> int:
    return len(self.data) // self.batch_size

  def _epoch_order(self, epoch: int) -> list[np.ndarray]:
    rng = np.random.default_rng([self.seed, epoch])
    perm = rng.permutation(len(self.data))
    chunk = self.batch_size * self.window
    batches = []
    for s in range(0, len(perm), chunk):
      part = perm[s:s + chunk]
      part = part[np.argsort(self.lengths[part], kind="stable")]
      for t in range(0, len(part) - self.batch_size + 1, self.batch_size):
        batches.append(part[t:t + self.batch_size])
    return [batches[i] for i in rng.permutation(len(batches))]

  def state(self) -> dict:
    return {"epoch": int(self.epoch), "index": int(self.index), "seed": int(self.seed)}

  def restore(self, state: dict) -> None:
    self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._order is None:
      self._order = self._epoch_order(self.epoch)
    if self.index >= len(self._order):
      self.epoch, self.index = self.epoch + 1, 0
      self._order = self._epoch_order(self.epoch)
    rows = self._order[self.index]
    length = int(self.buckets[np.searchsorted(self.buckets, self.lengths[rows].max())])
    batch = pad_rows(self.data, rows, length, self.pad_id, self.batch_size)
    if self.mlm is not None:
      rng = np.random.default_rng([self.seed, self.epoch, self.index, 1])
      batch = mask_tokens(batch, rng, **self.mlm)
    self.index += 1
    return batch


def eval_batches(data: Tokenized, batch_size: int, max_length: int, pad_id: int, mlm: dict | None = None,
                 seed: int = 0):
  """Every example once, in length order, padded to full batches; yields ``(rows, batch)``."""
  buckets = np.asarray(bucket_lengths(max_length))
  lengths = data.lengths
  order = np.argsort(lengths, kind="stable")
  for k, s in enumerate(range(0, len(order), batch_size)):
    rows = order[s:s + batch_size]
    length = int(buckets[np.searchsorted(buckets, lengths[rows].max())])
    batch = pad_rows(data, rows, length, pad_id, batch_size)
    if mlm is not None:
      batch = mask_tokens(batch, np.random.default_rng([seed, k, 2]), **mlm)
    yield rows, batch
