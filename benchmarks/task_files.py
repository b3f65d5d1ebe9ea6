"""What the scripts that prepare a labelled task for ``benchmarks/study.py --data DIR`` share: a seeded split that
keeps groups of examples whole, and the files they write (``train.csv``, ``validation.csv``, ``data.json``)."""
from __future__ import annotations

import csv
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np


def grouped_split(keys: list[str], seed: int, fraction: float) -> tuple[list[int], list[int]]:
  """Train and validation indices of examples whose group is ``keys[i]``: the groups (in first-seen order) are
  shuffled with ``seed`` and taken into validation until it holds ``round(fraction * n)`` examples; a group stays
  whole; each split is then shuffled with ``seed + 1``."""
  if not 0 < fraction < 1:
    raise SystemExit(f"--validation-fraction={fraction}: expected a number between 0 and 1")
  groups: dict[str, list[int]] = {}
  for i, k in enumerate(keys):
    groups.setdefault(k, []).append(i)
  order = list(groups)
  want = round(fraction * len(keys))
  train, val = [], []
  for g in np.random.default_rng(seed).permutation(len(order)):
    (val if len(val) < want else train).extend(groups[order[g]])
  rng = np.random.default_rng(seed + 1)
  return [train[i] for i in rng.permutation(len(train))], [val[i] for i in rng.permutation(len(val))]


def write_task(out: Path, columns: list[str], texts: list[tuple[str, ...]], labels: list[str], names: list[str],
               splits: dict[str, list[int]], source: str, seed: int) -> None:
  """``out/train.csv`` and ``out/validation.csv`` (``columns`` then ``label``; the examples ``splits[name]`` lists),
  ``out/data.json`` (what ``benchmarks/study.py --data out`` reads), and one line of label counts per split."""
  out.mkdir(parents=True, exist_ok=True)
  files = {"train": "train.csv", "validation": "validation.csv"}
  for name, idx in splits.items():
    with (out / files[name]).open("w", newline="", encoding="utf-8") as f:
      w = csv.writer(f)
      w.writerow(list(columns) + ["label"])
      w.writerows(texts[i] + (labels[i],) for i in idx)
    counts = Counter(labels[i] for i in idx)
    print(f"{name}: {len(idx)} examples; " + ", ".join(f"{n}={counts.get(n, 0)}" for n in names))
  meta = {"train_file": files["train"], "eval_file": files["validation"], "text_a_column": columns[0],
          "text_b_column": columns[1] if len(columns) > 1 else "", "label_column": "label",
          "label_names": ",".join(names), "num_labels": len(names), "source": source, "seed": seed}
  (out / "data.json").write_text(json.dumps(meta, indent=2) + "\n")
  print(f"wrote {out}/train.csv, validation.csv, data.json", file=sys.stderr)
