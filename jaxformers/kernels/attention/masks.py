"""Static block-sparse masks for the block-sparse flash kernel, and their dense twins.

A :class:`BlockSparseMask` describes, for a fixed ``(q_len, kv_len)`` and block size
``(block_q, block_k)``, which (query block, key block) pairs are visited at all, plus an
optional token-level pattern applied exactly inside every visited block:

* ``window``: query ``i`` may attend key ``j`` when ``|i - j| <= window`` (a one-sided radius),
* ``num_global``: the first ``num_global`` positions are global: they attend to every key
  and every query attends to them (Longformer / BigBird style).

With ``window=None`` and ``num_global=0`` there is no token-level pattern: every token pair
inside a visited block may attend. Segment ids (0 = padding, equal non-zero ids attend) are
and-ed in by the kernel on top of this mask, exactly as in the reference.

The kernel walks only the visited pairs: per query block a list of key-block indices (forward
and dq) and per key block a list of query-block indices (dk, dv), so a sliding window of
radius ``w`` costs ``O(length * (w + block))`` rather than ``O(length**2)``.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxformers.kernels.attention.reference import combined_mask


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


@dataclasses.dataclass(frozen=True)
class BlockSparseMask:
  """Which (query block, key block) pairs to visit, plus the token-level pattern inside them.

  ``blocks`` is a tuple of ``num_q_blocks`` tuples of ``num_kv_blocks`` booleans. The object is
  hashable so it can be a static argument of jitted functions.
  """
  q_len: int
  kv_len: int
  block_q: int
  block_k: int
  blocks: tuple
  window: int | None = None
  num_global: int = 0

  def __post_init__(self):
    for name in ("q_len", "kv_len", "block_q", "block_k"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"BlockSparseMask {name} must be a positive int, got {getattr(self, name)!r}")
    nq, nk = _cdiv(self.q_len, self.block_q), _cdiv(self.kv_len, self.block_k)
    if len(self.blocks) != nq or any(len(row) != nk for row in self.blocks):
      raise ValueError(f"BlockSparseMask blocks must be {nq} rows of {nk} booleans for q_len={self.q_len}, "
                       f"kv_len={self.kv_len}, block_q={self.block_q}, block_k={self.block_k}")
    if self.window is not None and self.window < 0:
      raise ValueError(f"BlockSparseMask window must be None or >= 0, got {self.window}")
    if self.num_global < 0:
      raise ValueError(f"BlockSparseMask num_global must be >= 0, got {self.num_global}")

  @classmethod
  def from_blocks(cls, blocks_QK, *, q_len: int, kv_len: int, block_q: int, block_k: int,
                  window: int | None = None, num_global: int = 0) -> "BlockSparseMask":
    """Builds a mask from a boolean ``[num_q_blocks, num_kv_blocks]`` array."""
    arr = np.asarray(blocks_QK, dtype=bool)
    if arr.ndim != 2:
      raise ValueError(f"blocks_QK must be 2-D [num_q_blocks, num_kv_blocks], got shape {arr.shape}")
    return cls(q_len, kv_len, block_q, block_k, tuple(tuple(bool(x) for x in row) for row in arr),
               window, num_global)

  @property
  def num_q_blocks(self) -> int:
    return len(self.blocks)

  @property
  def num_kv_blocks(self) -> int:
    return len(self.blocks[0])

  @property
  def has_token_pattern(self) -> bool:
    return self.window is not None or self.num_global > 0

  def block_array(self) -> np.ndarray:
    """Boolean ``[num_q_blocks, num_kv_blocks]``."""
    return np.asarray(self.blocks, dtype=bool)

  def density(self) -> float:
    """Fraction of block pairs that are visited."""
    return float(self.block_array().mean())

  def kv_block_lists(self) -> tuple[np.ndarray, np.ndarray]:
    """Per query block: key-block indices ``[num_q_blocks, max_count]`` int32 and counts ``[num_q_blocks]``."""
    return _lists(self.block_array())

  def q_block_lists(self) -> tuple[np.ndarray, np.ndarray]:
    """Per key block: query-block indices ``[num_kv_blocks, max_count]`` int32 and counts ``[num_kv_blocks]``."""
    return _lists(self.block_array().T)

  def token_mask(self) -> np.ndarray:
    """Dense boolean ``[q_len, kv_len]`` twin of this mask (block pattern and token pattern)."""
    blk = self.block_array()
    out = np.repeat(np.repeat(blk, self.block_q, 0), self.block_k, 1)[:self.q_len, :self.kv_len]
    if self.has_token_pattern:
      out = out & token_pattern(self.q_len, self.kv_len, window=self.window, num_global=self.num_global)
    return out


def _lists(blk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  counts = blk.sum(axis=1).astype(np.int32)
  width = max(1, int(counts.max()) if counts.size else 1)
  idx = np.zeros((blk.shape[0], width), np.int32)
  for r in range(blk.shape[0]):
    cols = np.nonzero(blk[r])[0]
    idx[r, :cols.size] = cols
    if cols.size:  # pad with the last index so a padded entry never points at an unlisted block
      idx[r, cols.size:] = cols[-1]
  return idx, counts


def token_pattern(q_len: int, kv_len: int, *, window: int | None = None, num_global: int = 0) -> np.ndarray:
  """Dense boolean ``[q_len, kv_len]``: ``|i - j| <= window`` or either position ``< num_global``.

  ``window=None`` means no window constraint (all pairs), so the result is all True.
  """
  if window is None:
    return np.ones((q_len, kv_len), bool)
  i = np.arange(q_len)[:, None]
  j = np.arange(kv_len)[None, :]
  out = np.abs(i - j) <= window
  if num_global:
    out = out | (i < num_global) | (j < num_global)
  return out


def local_global_mask(q_len: int, *, window: int, num_global: int = 0, block_q: int, block_k: int,
                      kv_len: int | None = None) -> BlockSparseMask:
  """Sliding window of radius ``window`` plus ``num_global`` leading global tokens.

  Visits a block pair when any token pair in it is allowed; the exact token pattern is applied
  inside the visited blocks. Cost is ``O(q_len * (2 * window + block_k + num_global))``.
  """
  if window is None or int(window) < 0:
    raise ValueError(f"window must be an int >= 0, got {window!r}")
  kv_len = q_len if kv_len is None else kv_len
  nq, nk = _cdiv(q_len, block_q), _cdiv(kv_len, block_k)
  q_lo = np.arange(nq)[:, None] * block_q
  q_hi = np.minimum(q_lo + block_q, q_len) - 1
  k_lo = np.arange(nk)[None, :] * block_k
  k_hi = np.minimum(k_lo + block_k, kv_len) - 1
  gap = np.maximum(0, np.maximum(k_lo - q_hi, q_lo - k_hi))
  blocks = gap <= window
  if num_global:
    blocks = blocks | (q_lo < num_global) | (k_lo < num_global)
  return BlockSparseMask.from_blocks(blocks, q_len=q_len, kv_len=kv_len, block_q=block_q, block_k=block_k,
                                     window=int(window), num_global=int(num_global))


def sliding_window_mask(q_len: int, *, window: int, block_q: int, block_k: int,
                        kv_len: int | None = None) -> BlockSparseMask:
  """Sliding window of radius ``window`` (``|i - j| <= window``) without global tokens."""
  return local_global_mask(q_len, window=window, num_global=0, block_q=block_q, block_k=block_k, kv_len=kv_len)


def dense_block_sparse_mask(block_mask: BlockSparseMask, segment_ids=None, kv_segment_ids=None):
  """The dense boolean ``[batch or 1, 1, q_len, kv_len]`` mask the block-sparse kernel computes.

  This is the block/token pattern and-ed with the segment-id mask, suitable as ``mask`` for
  :func:`~jaxformers.kernels.attention.reference.attention_reference`.
  """
  return combined_mask(segment_ids, kv_segment_ids, jnp.asarray(block_mask.token_mask())[None, None])
