"""Deterministic, resumable batching with length buckets and dynamic padding, or packing, and MLM masking.

Every batch is a pure function of ``(seed, epoch, index)``: the order of an epoch is
drawn from ``numpy.random.default_rng([seed, epoch])``, so saving ``(epoch, index)``
with a checkpoint is enough for a resumed run to see exactly the batches it would
have seen.

Packed batches (``Packing``) have one fixed shape ``[rows, max_length]``: each epoch's
shuffled examples are packed window by window (best-fit decreasing, at most
``max_segments`` examples a row), the rows are shuffled and cut into batches of
``rows`` rows (an incomplete last batch is dropped, as the padded path drops its
incomplete batch). ``segment_ids`` number the examples of a row 1, 2, ... (0: unused);
classification ``labels`` / ``weights`` are per slot ``[rows, max_segments]`` (weight 0
for an empty slot), MLM ones per token ``[rows, max_length]``.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxformers.data.tokenize import Tokenized
from jaxformers.packing import best_fit


@dataclasses.dataclass(frozen=True)
class Packing:
  """Packed batches of ``rows`` rows, each holding at most ``max_segments`` examples."""
  rows: int
  max_segments: int


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


def pack_rows(data: Tokenized, plan: list[np.ndarray], length: int, pad_id: int, packing: Packing):
  """Examples ``plan[r]`` side by side in row ``r`` of a ``[packing.rows, length]`` batch (rows past the plan empty).

  Returns ``(batch, slots)``; ``slots`` ``[rows, max_segments]`` holds the example index in each slot, -1 if empty.
  """
  n_rows, n_seg = packing.rows, packing.max_segments
  ids = np.full((n_rows, length), pad_id, np.int32)
  types = np.zeros((n_rows, length), np.int32)
  seg = np.zeros((n_rows, length), np.int32)
  slots = np.full((n_rows, n_seg), -1, np.int64)
  for r, members in enumerate(plan):
    col = 0
    for s, i in enumerate(members):
      x = data.ids[i]
      n = len(x)
      ids[r, col:col + n] = x
      types[r, col:col + n] = data.type_ids[i]
      seg[r, col:col + n] = s + 1
      slots[r, s] = i
      col += n
  valid = slots >= 0
  lab = np.zeros((n_rows, n_seg), np.int32 if data.label is None else data.label.dtype)
  if data.label is not None:   # unlabelled (test) examples keep label 0: only their logits are used
    lab[valid] = data.label[slots[valid]]
  batch = {"input_ids": ids, "token_type_ids": types, "segment_ids": seg, "labels": lab,
           "weights": valid.astype(np.float32)}
  return batch, slots


def num_tokens(batch: dict) -> int:
  """Real (non-padding) tokens of a padded or packed batch."""
  if "segment_ids" in batch:
    return int(np.count_nonzero(batch["segment_ids"]))
  return int(batch["attention_mask"].sum())


def num_examples(batch: dict) -> int:
  """Examples in a padded batch (its rows) or a packed one (the segments of its rows)."""
  if "segment_ids" in batch:
    return int(batch["segment_ids"].max(axis=1).sum())
  return int(batch["weights"].shape[0])


def mask_tokens(batch: dict, rng: np.random.Generator, *, mask_id: int, vocab_size: int,
                special_ids: tuple[int, ...], prob: float = 0.15) -> dict:
  """BERT dynamic masking: choose ``prob`` of the real tokens; 80% -> [MASK], 10% random, 10% unchanged.

  Returns the batch with ``labels`` ``[B, L]`` (the original ids) and ``weights`` ``[B, L]``
  (1 where a token was chosen). Packed batches (with ``segment_ids``) mask only real tokens, at least one
  per example.
  """
  ids = batch["input_ids"]
  packed = "segment_ids" in batch
  real = batch["segment_ids"] != 0 if packed else batch["attention_mask"].astype(bool)
  candidate = real & ~np.isin(ids, np.asarray(special_ids, np.int32))
  if not packed:
    candidate &= batch["weights"][:, None] > 0
  chosen = candidate & (rng.random(ids.shape) < prob)
  if packed:
    # make sure every example (row, segment) with candidates predicts at least one token
    seg = batch["segment_ids"]
    unit = np.arange(ids.shape[0])[:, None] * (ids.shape[1] + 1) + seg
    for u in np.setdiff1d(unit[candidate], unit[chosen]):
      r, s = divmod(int(u), ids.shape[1] + 1)
      chosen[r, rng.choice(np.nonzero(candidate[r] & (seg[r] == s))[0])] = True
  else:
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
  batch order. With ``packing`` each window is packed into rows instead, and the shuffled
  rows are cut into batches of ``packing.rows`` rows (see the module docstring).
  ``state()`` / ``restore()`` carry the position ``(epoch, index)``.
  """

  def __init__(self, data: Tokenized, batch_size: int, seed: int, max_length: int, pad_id: int,
               window: int = 50, mlm: dict | None = None, packing: Packing | None = None):
    if len(data) < batch_size:
      raise ValueError(f"{data.origin}: {len(data)} examples is fewer than one batch of {batch_size}; "
                       f"lower data.batch_size")
    self.data, self.batch_size, self.seed, self.pad_id = data, batch_size, seed, pad_id
    self.buckets = np.asarray(bucket_lengths(max_length))
    self.max_length = int(max_length)
    self.window, self.mlm, self.packing = window, mlm, packing
    self.lengths = data.lengths
    self.epoch, self.index = 0, 0
    self._order = None
    self._first_epoch = None
    if packing is not None and not self._epoch_plan(0):
      raise ValueError(f"{data.origin}: {len(data)} examples pack into fewer than one batch of "
                       f"data.pack_rows={packing.rows} rows of {max_length} tokens; lower data.pack_rows")

  @property
  def batches_per_epoch(self) -> int:
    """Batches of one epoch (packed: of the first epoch; later ones may differ by a batch)."""
    if self.packing is None:
      return len(self.data) // self.batch_size
    return len(self._epoch_plan(0))

  def _epoch_plan(self, epoch: int) -> list:
    if epoch == 0 and self._first_epoch is not None:
      return self._first_epoch
    order = self._epoch_order(epoch)
    if epoch == 0:
      self._first_epoch = order
    return order

  def _epoch_order(self, epoch: int) -> list:
    rng = np.random.default_rng([self.seed, epoch])
    perm = rng.permutation(len(self.data))
    chunk = self.batch_size * self.window
    if self.packing is not None:
      rows = []
      for s in range(0, len(perm), chunk):
        part = perm[s:s + chunk]
        rows.extend(part[np.asarray(m)] for m in best_fit(self.lengths[part], self.max_length,
                                                          self.packing.max_segments))
      rows = [rows[i] for i in rng.permutation(len(rows))]
      n = self.packing.rows
      return [rows[t:t + n] for t in range(0, len(rows) - n + 1, n)]
    batches = []
    for s in range(0, len(perm), chunk):
      part = perm[s:s + chunk]
      part = part[np.argsort(self.lengths[part], kind="stable")]
      for t in range(0, len(part) - self.batch_size + 1, self.batch_size):
        batches.append(part[t:t + self.batch_size])
    return [batches[i] for i in rng.permutation(len(batches))]

  def padding_fraction(self, epoch: int = 0) -> float:
    """Share of the positions of ``epoch``'s batches that hold no token."""
    order = self._epoch_plan(epoch)
    if self.packing is not None:
      tokens = sum(int(self.lengths[m].sum()) for plan in order for m in plan)
      return 1.0 - tokens / max(len(order) * self.packing.rows * self.max_length, 1)
    tokens = sum(int(self.lengths[b].sum()) for b in order)
    widths = sum(len(b) * int(self.buckets[np.searchsorted(self.buckets, self.lengths[b].max())]) for b in order)
    return 1.0 - tokens / max(widths, 1)

  def state(self) -> dict:
    return {"epoch": int(self.epoch), "index": int(self.index), "seed": int(self.seed),
            "packed": self.packing is not None}

  def restore(self, state: dict) -> None:
    packed = bool(state.get("packed", False))
    if packed != (self.packing is not None):
      raise ValueError(f"the checkpoint's data position was saved with data.packing={packed}, this run has "
                       f"data.packing={self.packing is not None}; resume with the same setting")
    self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._order is None:
      self._order = self._epoch_plan(self.epoch)
    if self.index >= len(self._order):
      self.epoch, self.index = self.epoch + 1, 0
      self._order = self._epoch_plan(self.epoch)
    if self.packing is not None:
      batch, _ = pack_rows(self.data, self._order[self.index], self.max_length, self.pad_id, self.packing)
    else:
      rows = self._order[self.index]
      length = int(self.buckets[np.searchsorted(self.buckets, self.lengths[rows].max())])
      batch = pad_rows(self.data, rows, length, self.pad_id, self.batch_size)
    if self.mlm is not None:
      rng = np.random.default_rng([self.seed, self.epoch, self.index, 1])
      batch = mask_tokens(batch, rng, **self.mlm)
    self.index += 1
    return batch


def eval_batches(data: Tokenized, batch_size: int, max_length: int, pad_id: int, mlm: dict | None = None,
                 seed: int = 0, packing: Packing | None = None):
  """Every example once, padded to full batches; yields ``(rows, batch)``.

  Padded: in length order, ``rows`` ``[n]`` the example indices of the batch's rows. Packed: all
  examples packed (best-fit decreasing) into rows of ``max_length``, ``packing.rows`` rows a batch (the last
  filled up with empty rows); ``rows`` is then the ``[rows, max_segments]`` slot map (-1: empty slot).
  """
  if packing is not None:
    plan = best_fit(data.lengths, max_length, packing.max_segments)
    for k, s in enumerate(range(0, len(plan), packing.rows)):
      batch, slots = pack_rows(data, plan[s:s + packing.rows], max_length, pad_id, packing)
      if mlm is not None:
        batch = mask_tokens(batch, np.random.default_rng([seed, k, 2]), **mlm)
      yield slots, batch
    return
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


def eval_padding_fraction(data: Tokenized, batch_size: int, max_length: int, packing: Packing | None = None) -> float:
  """Share of the positions of :func:`eval_batches`' batches that hold no token (computed from lengths alone)."""
  lengths = data.lengths
  if packing is not None:
    n_rows = len(best_fit(lengths, max_length, packing.max_segments))
    n_batches = -(-n_rows // packing.rows)
    return 1.0 - float(lengths.sum()) / (n_batches * packing.rows * max_length)
  buckets = np.asarray(bucket_lengths(max_length))
  order = np.sort(lengths, kind="stable")
  width = sum(batch_size * int(buckets[np.searchsorted(buckets, order[s:s + batch_size].max())])
              for s in range(0, len(order), batch_size))
  return 1.0 - float(lengths.sum()) / width
