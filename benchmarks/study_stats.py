"""Statistics of the layout study (``benchmarks/study.py``), in numpy alone: per-example metrics, mean and standard
deviation over seeds, the paired bootstrap interval of a cell's difference to the reference, the Pareto front.

The metrics are the trainer's (:mod:`jaxformers.train.metrics`: accuracy, F1 of class 1, Matthews correlation,
Pearson and Spearman correlation, 0 where a correlation is undefined), computed here from predictions so that the
bootstrap can recompute them on resampled examples. Every function takes predictions of one or more seeds as
``[seeds, examples]`` (a single ``[examples]`` array is one seed) and the labels ``[examples]``.

The bootstrap (:func:`paired_bootstrap`): resample ``b`` (``b = 0 .. resamples - 1``) draws ``n`` example indices with
replacement, ``np.random.default_rng(seed).integers(0, n, size=n)`` once per resample in order, the same indices for
the cell and the reference; on them it computes the cell's metric averaged over its seeds minus the reference's
metric averaged over its seeds (every seed of either is scored on the same examples; the seeds need not pair up one
to one, and with one seed each this is the plain paired bootstrap). The interval is the 2.5 and 97.5 percentiles
(``np.percentile``, linear interpolation) of those differences. :func:`bootstrap_interval` draws the same way for one
cell's metric alone, and :func:`still_improving` compares a learning curve's last rise with that interval's
half-width (the study's budget check).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

METRICS = ("accuracy", "f1", "matthews_corr", "pearson", "spearman")
RESAMPLES = 1000        # bootstrap resamples of the study's intervals
BOOTSTRAP_SEED = 1000   # seed of the bootstrap's index draws (fixed: a rerun gives the same interval)


def _rows(preds) -> np.ndarray:
  """Predictions as ``[seeds, examples]``."""
  p = np.asarray(preds)
  return p[None] if p.ndim == 1 else p


def _pearson(p: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Pearson correlation of every row of ``p`` with ``y``; 0 where a row or ``y`` is constant."""
  p = p.astype(np.float64) - p.mean(-1, keepdims=True)
  y = y.astype(np.float64) - y.mean()
  den = np.sqrt((p * p).sum(-1) * (y * y).sum())
  with np.errstate(invalid="ignore", divide="ignore"):
    r = (p * y).sum(-1) / den
  return np.where((p.std(-1) == 0) | (y.std() == 0) | (den == 0), 0.0, r)


def rank(x: np.ndarray) -> np.ndarray:
  """1-based ranks of ``x`` (1-D), ties sharing their average rank (as ``scipy.stats.rankdata``)."""
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  ends = np.cumsum(counts)
  return (ends - (counts - 1) / 2.0)[inverse]


def metric(name: str, preds, labels) -> np.ndarray | float:
  """The metric ``name`` of every seed's predictions (``[seeds, n]`` -> ``[seeds]``; ``[n]`` -> a float)."""
  p, y = _rows(preds), np.asarray(labels)
  if p.shape[-1] != y.shape[0]:
    raise ValueError(f"{p.shape[-1]} predictions for {y.shape[0]} labels")
  if name == "accuracy":
    out = (p == y).mean(-1)
  elif name == "f1":                      # F1 of class 1 (a binary task), 0 when it is never predicted nor true
    tp = ((p == 1) & (y == 1)).sum(-1)
    wrong = ((p == 1) != (y == 1)).sum(-1)
    out = np.where(2 * tp + wrong > 0, 2 * tp / np.maximum(2 * tp + wrong, 1), 0.0)
  elif name == "matthews_corr":           # multi-class MCC from the confusion matrix's margins (sklearn's formula)
    k = int(max(p.max(), y.max())) + 1
    n = float(y.shape[0])
    t = np.bincount(y.astype(np.int64), minlength=k).astype(np.float64)
    pk = np.stack([(p == c).sum(-1) for c in range(k)], -1).astype(np.float64)
    c = (p == y).sum(-1).astype(np.float64)
    cov_tp = c * n - pk @ t
    cov_pp = n * n - (pk * pk).sum(-1)
    cov_tt = n * n - (t * t).sum()
    den = cov_pp * cov_tt
    out = np.where(den > 0, cov_tp / np.sqrt(np.where(den > 0, den, 1.0)), 0.0)
  elif name == "pearson":
    out = _pearson(p, y)
  elif name == "spearman":
    out = _pearson(np.stack([rank(r) for r in p]), rank(y))
  else:
    raise ValueError(f"metric {name!r}: expected one of {', '.join(METRICS)}")
  out = np.asarray(out, np.float64)
  return float(out[0]) if np.asarray(preds).ndim == 1 else out


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
  """Mean and sample standard deviation (ddof=1) of per-seed values; the deviation is None for one value."""
  v = np.asarray(values, np.float64)
  if v.size == 0:
    raise ValueError("mean_sd of no values")
  return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None)


def bootstrap_differences(name: str, cell_preds, ref_preds, labels, resamples: int = RESAMPLES,
                          seed: int = BOOTSTRAP_SEED) -> np.ndarray:
  """``[resamples]`` differences: the cell's metric (mean over its seeds) minus the reference's (mean over its
  seeds) on the same resampled examples (see the module docstring for the draws)."""
  cell, ref, y = _rows(cell_preds), _rows(ref_preds), np.asarray(labels)
  n = y.shape[0]
  if cell.shape[-1] != n or ref.shape[-1] != n:
    raise ValueError(f"predictions for {cell.shape[-1]} (cell) and {ref.shape[-1]} (reference) examples, "
                     f"labels for {n}")
  rng = np.random.default_rng(seed)
  out = np.empty(resamples, np.float64)
  for b in range(resamples):
    idx = rng.integers(0, n, size=n)
    out[b] = metric(name, cell[:, idx], y[idx]).mean() - metric(name, ref[:, idx], y[idx]).mean()
  return out


def paired_bootstrap(name: str, cell_preds, ref_preds, labels, resamples: int = RESAMPLES,
                     seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> tuple[float, float]:
  """The ``level`` percentile interval ``(low, high)`` of :func:`bootstrap_differences` (0.95: percentiles 2.5 and
  97.5)."""
  d = bootstrap_differences(name, cell_preds, ref_preds, labels, resamples, seed)
  lo, hi = np.percentile(d, [50 * (1 - level), 50 * (1 + level)])
  return float(lo), float(hi)


def bootstrap_interval(name: str, preds, labels, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
                       level: float = 0.95) -> tuple[float, float]:
  """The ``level`` percentile interval ``(low, high)`` of one cell's metric (averaged over its seeds) on resampled
  examples: the same draws as :func:`bootstrap_differences`, the metric alone instead of a difference."""
  p, y = _rows(preds), np.asarray(labels)
  n = y.shape[0]
  if p.shape[-1] != n:
    raise ValueError(f"{p.shape[-1]} predictions for {n} labels")
  rng = np.random.default_rng(seed)
  values = np.empty(resamples, np.float64)
  for b in range(resamples):
    idx = rng.integers(0, n, size=n)
    values[b] = metric(name, p[:, idx], y[idx]).mean()
  lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
  return float(lo), float(hi)


def still_improving(curve: Sequence[tuple[int, float]], half_width: float) -> dict:
  """Whether a learning curve (``(step, metric)`` evaluations, larger is better) is still rising at its end by more
  than ``half_width`` (the half-width of the final metric's bootstrap interval: the size of a difference the
  validation examples can tell from noise).

  The earlier half is the evaluations at steps <= half the last evaluation's step; ``gain`` is the last evaluation
  minus the best of the earlier half, and ``improving`` is ``gain > half_width``. With no evaluation in the earlier
  half (a curve of one point), ``improving`` and ``gain`` are None: the curve cannot tell. Returns ``{"steps": the
  last step, "last", "best_earlier", "gain", "half_width", "improving"}``."""
  points = sorted((int(s), float(v)) for s, v in curve)
  if not points:
    return {"steps": None, "last": None, "best_earlier": None, "gain": None, "half_width": half_width,
            "improving": None}
  end, last = points[-1]
  earlier = [v for s, v in points[:-1] if s <= end / 2]
  best = max(earlier) if earlier else None
  gain = last - best if earlier else None
  return {"steps": end, "last": last, "best_earlier": best, "gain": gain, "half_width": float(half_width),
          "improving": None if gain is None else bool(gain > half_width)}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
  """For each ``(metric, speed-up)`` point (larger is better in both): whether it is on the Pareto front, i.e. no
  other point is at least as good in both and better in one. Equal points are all on the front; a point with a
  NaN coordinate is on none."""
  pts = np.asarray(points, np.float64).reshape(-1, 2)
  ok = ~np.isnan(pts).any(-1)
  out = []
  for i, (m, s) in enumerate(pts):
    if not ok[i]:
      out.append(False)
      continue
    others = pts[ok]
    dominated = ((others[:, 0] >= m) & (others[:, 1] >= s) & ((others[:, 0] > m) | (others[:, 1] > s))).any()
    out.append(not bool(dominated))
  return out


def fastest_keeping(points: Sequence[tuple[float, float]], ref_metric: float, share: float = 0.95) -> int | None:
  """Index of the point with the highest speed-up among those whose metric is at least ``share`` of
  ``ref_metric`` (ties: the higher metric, then the first); None when none is, or the reference metric is not
  positive (a share of it then means nothing)."""
  if not ref_metric > 0:
    return None
  best = None
  for i, (m, s) in enumerate(points):
    if np.isnan(m) or np.isnan(s) or m < share * ref_metric:
      continue
    if best is None or (s, m) > (points[best][1], points[best][0]):
      best = i
  return best
