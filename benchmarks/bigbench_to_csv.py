"""Turn a BIG-bench multiple-choice task (its ``task.json``) into train / validation CSV files for the ``files`` source.

The task files come with the ``bigbench`` 1.0.0 source distribution on PyPI (358 MB); fetch and unpack it outside
the repository, then convert one task:

  pip download --no-deps bigbench==1.0.0 -d /tmp/bb && tar xzf /tmp/bb/bigbench-1.0.0.tar.gz -C /tmp/bb
  python benchmarks/bigbench_to_csv.py \\
    /tmp/bb/bigbench-1.0.0/bigbench/benchmark_tasks/vitaminc_fact_verification/task.json \\
    --out /tmp/vitaminc --max-examples 2000 --max-validation 500

Each example's label is its best-scored choice (``target_scores``). With ``--separator`` (default ``"\\nClaim: "``,
the form of ``vitaminc_fact_verification``: ``"<evidence>\\nClaim: <claim>"``) an input splits into two texts at the
separator's last occurrence: the part after it is the first column (``claim``), the part before it the second
(``evidence``); ``--columns`` names them. Inputs without the separator are an error unless ``--separator ""``
(one text column). The split is fixed by ``--seed``: examples are grouped by their first text (VitaminC has pairs
of contrasting evidence for one claim; a claim never lands in both splits), groups are shuffled and about
``--validation-fraction`` of the examples go to validation; ``--max-examples`` / ``--max-validation`` then keep the
first N of each split's (shuffled) order. Writes ``OUT/train.csv``, ``OUT/validation.csv`` and ``OUT/data.json``
(columns and label names, read by ``benchmarks/study.py --data OUT``) and prints the label counts.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np


def load_examples(path: Path, separator: str) -> tuple[list[tuple[str, ...]], list[str], list[str]]:
  """``(texts per example, label per example, label names in first-seen order)``."""
  try:
    task = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, json.JSONDecodeError) as e:
    raise SystemExit(f"{path}: cannot read a BIG-bench task.json ({e})")
  examples = task.get("examples") if isinstance(task, dict) else None
  if not examples:
    raise SystemExit(f"{path}: no 'examples' list; expected a BIG-bench JSON task file")
  texts, labels, names = [], [], []
  for i, ex in enumerate(examples):
    scores = ex.get("target_scores")
    if not isinstance(scores, dict) or not scores:
      raise SystemExit(f"{path}: example {i} has no 'target_scores'; only multiple-choice tasks convert to labels")
    for name in scores:
      if name not in names:
        names.append(name)
    label = max(scores, key=lambda k: scores[k])
    text = " ".join(ex["input"].split("\n")) if not separator else ex["input"]
    if separator:
      before, sep, after = text.rpartition(separator)
      if not sep:
        raise SystemExit(f"{path}: example {i}'s input has no separator {separator!r}; pass --separator '' to keep "
                         f"the input as one text")
      texts.append((" ".join(after.split()), " ".join(before.split())))
    else:
      texts.append((" ".join(text.split()),))
    labels.append(label)
  return texts, labels, names


def split(texts: list[tuple[str, ...]], seed: int, fraction: float) -> tuple[list[int], list[int]]:
  """Train and validation indices: groups of equal first text, shuffled with ``seed``; a group stays whole."""
  groups: dict[str, list[int]] = {}
  for i, t in enumerate(texts):
    groups.setdefault(t[0], []).append(i)
  keys = sorted(groups)
  order = np.random.default_rng(seed).permutation(len(keys))
  want = round(fraction * len(texts))
  train, val = [], []
  for k in order:
    (val if len(val) < want else train).extend(groups[keys[k]])
  rng = np.random.default_rng(seed + 1)
  return [train[i] for i in rng.permutation(len(train))], [val[i] for i in rng.permutation(len(val))]


def write_csv(path: Path, columns: list[str], rows: list[tuple[str, ...]]) -> None:
  with path.open("w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(columns)
    w.writerows(rows)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("task_json", type=Path)
  p.add_argument("--out", type=Path, required=True, help="output directory")
  p.add_argument("--separator", default="\nClaim: ", help="splits an input into two texts ('' = one text)")
  p.add_argument("--columns", default="claim,evidence", help="names of the text columns (second one with a separator)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--validation-fraction", type=float, default=0.1)
  p.add_argument("--max-examples", type=int, default=0, help="> 0: keep this many training examples")
  p.add_argument("--max-validation", type=int, default=0, help="> 0: keep this many validation examples")
  a = p.parse_args(argv)
  if not 0 < a.validation_fraction < 1:
    raise SystemExit(f"--validation-fraction={a.validation_fraction}: expected a number between 0 and 1")
  columns = [c.strip() for c in a.columns.split(",")]
  if len(columns) != (2 if a.separator else 1) or "label" in columns:
    raise SystemExit(f"--columns={a.columns!r}: expected {2 if a.separator else 1} comma-separated names other than "
                     f"'label'")
  texts, labels, names = load_examples(a.task_json, a.separator)
  train, val = split(texts, a.seed, a.validation_fraction)
  if a.max_examples > 0:
    train = train[:a.max_examples]
  if a.max_validation > 0:
    val = val[:a.max_validation]
  a.out.mkdir(parents=True, exist_ok=True)
  for name, idx in (("train", train), ("validation", val)):
    write_csv(a.out / f"{name}.csv", columns + ["label"], [texts[i] + (labels[i],) for i in idx])
    counts = Counter(labels[i] for i in idx)
    print(f"{name}: {len(idx)} examples; " + ", ".join(f"{n}={counts.get(n, 0)}" for n in names))
  meta = {"train_file": "train.csv", "eval_file": "validation.csv", "text_a_column": columns[0],
          "text_b_column": columns[1] if len(columns) > 1 else "", "label_column": "label",
          "label_names": ",".join(names), "num_labels": len(names), "source": str(a.task_json), "seed": a.seed}
  (a.out / "data.json").write_text(json.dumps(meta, indent=2) + "\n")
  print(f"wrote {a.out}/train.csv, validation.csv, data.json", file=sys.stderr)


if __name__ == "__main__":
  main()
