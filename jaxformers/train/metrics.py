"""Task metrics (GLUE's official ones, from scikit-learn and scipy) and the metric writers."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from scipy import stats
from sklearn import metrics as skm


def classification_metrics(labels: np.ndarray, preds: np.ndarray, task_metric: str) -> dict:
  out = {"accuracy": float(skm.accuracy_score(labels, preds))}
  if task_metric == "matthews_corr":
    out["matthews_corr"] = float(skm.matthews_corrcoef(labels, preds))
  if task_metric == "f1":
    out["f1"] = float(skm.f1_score(labels, preds, zero_division=0))
  return out


def regression_metrics(labels: np.ndarray, preds: np.ndarray) -> dict:
  if np.std(preds) == 0 or np.std(labels) == 0:  # correlation undefined: report 0 rather than NaN
    return {"pearson": 0.0, "spearman": 0.0, "mse": float(np.mean((preds - labels) ** 2))}
  return {"pearson": float(stats.pearsonr(preds, labels)[0]), "spearman": float(stats.spearmanr(preds, labels)[0]),
          "mse": float(np.mean((preds - labels) ** 2))}


class Writer:
  """Appends every record to ``DIR/metrics.jsonl`` and mirrors scalars to TensorBoard event files."""

  def __init__(self, workdir: str | Path, enabled: bool = True):
    self.enabled = enabled
    self.path = Path(workdir) / "metrics.jsonl"
    self.tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # slow to import; only runs that log to TensorBoard need it
      self.tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

  def write(self, step: int, kind: str, values: dict) -> None:
    if not self.enabled:
      return
    rec = {"step": int(step), "kind": kind, "time": time.time(),
           **{k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v) for k, v in values.items()}}
    with self.path.open("a") as fh:
      fh.write(json.dumps(rec) + "\n")
    for k, v in values.items():
      if isinstance(v, (int, float, np.floating, np.integer)):
        self.tb.add_scalar(f"{kind}/{k}", float(v), int(step))

  def close(self) -> None:
    if self.tb is not None:
      self.tb.flush()
      self.tb.close()
