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
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from task_files import grouped_split, write_task  # noqa: E402


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
  columns = [c.strip() for c in a.columns.split(",")]
  if len(columns) != (2 if a.separator else 1) or "label" in columns:
    raise SystemExit(f"--columns={a.columns!r}: expected {2 if a.separator else 1} comma-separated names other than "
                     f"'label'")
  texts, labels, names = load_examples(a.task_json, a.separator)
  train, val = grouped_split([t[0] for t in texts], a.seed, a.validation_fraction)
  splits = {"train": train[:a.max_examples] if a.max_examples > 0 else train,
            "validation": val[:a.max_validation] if a.max_validation > 0 else val}
  write_task(a.out, columns, texts, labels, names, splits, str(a.task_json), a.seed)


if __name__ == "__main__":
  main()
