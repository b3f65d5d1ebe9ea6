"""GLUE tasks: columns, labels, metrics and file names, one record per task."""
from __future__ import annotations

import dataclasses
import difflib


@dataclasses.dataclass(frozen=True)
class TsvColumns:
  """Where the fields of one GLUE TSV file live: header names, or column numbers when there is no header."""
  text_a: str | int
  text_b: str | int | None
  label: str | int | None
  header: bool = True


@dataclasses.dataclass(frozen=True)
class GlueTask:
  name: str
  tfds_keys: tuple[str, str | None]       # text feature names in tfds `glue/<name>`
  label_names: tuple[str, ...] | None     # None: regression
  eval_splits: tuple[str, ...]            # tfds split names
  test_splits: tuple[str, ...]
  tsv_train: TsvColumns
  tsv_test: TsvColumns
  tsv_files: dict                          # split -> file name in the GLUE task directory
  submission: dict                         # test split -> submission file name
  metric: str                              # the metric that picks the best checkpoint

  @property
  def num_labels(self) -> int:
    return 1 if self.label_names is None else len(self.label_names)

  @property
  def is_regression(self) -> bool:
    return self.label_names is None


def _std_files(name):
  return {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}


_NLI3 = ("entailment", "neutral", "contradiction")
_NLI2 = ("entailment", "not_entailment")

TASKS = {t.name: t for t in [
    GlueTask("cola", ("sentence", None), ("0", "1"), ("validation",), ("test",),
             TsvColumns(3, None, 1, header=False), TsvColumns("sentence", None, None),
             _std_files("cola"), {"test": "CoLA.tsv"}, "matthews_corr"),
    GlueTask("sst2", ("sentence", None), ("0", "1"), ("validation",), ("test",),
             TsvColumns("sentence", None, "label"), TsvColumns("sentence", None, None),
             _std_files("sst2"), {"test": "SST-2.tsv"}, "accuracy"),
    GlueTask("mrpc", ("sentence1", "sentence2"), ("0", "1"), ("validation",), ("test",),
             TsvColumns("#1 String", "#2 String", "Quality"), TsvColumns("#1 String", "#2 String", None),
             _std_files("mrpc"), {"test": "MRPC.tsv"}, "f1"),
    GlueTask("qqp", ("question1", "question2"), ("0", "1"), ("validation",), ("test",),
             TsvColumns("question1", "question2", "is_duplicate"), TsvColumns("question1", "question2", None),
             _std_files("qqp"), {"test": "QQP.tsv"}, "f1"),
    GlueTask("stsb", ("sentence1", "sentence2"), None, ("validation",), ("test",),
             TsvColumns("sentence1", "sentence2", "score"), TsvColumns("sentence1", "sentence2", None),
             _std_files("stsb"), {"test": "STS-B.tsv"}, "pearson"),
    GlueTask("mnli", ("premise", "hypothesis"), _NLI3, ("validation_matched", "validation_mismatched"),
             ("test_matched", "test_mismatched"),
             TsvColumns("sentence1", "sentence2", "gold_label"), TsvColumns("sentence1", "sentence2", None),
             {"train": "train.tsv", "validation_matched": "dev_matched.tsv",
              "validation_mismatched": "dev_mismatched.tsv", "test_matched": "test_matched.tsv",
              "test_mismatched": "test_mismatched.tsv"},
             {"test_matched": "MNLI-m.tsv", "test_mismatched": "MNLI-mm.tsv"}, "accuracy"),
    GlueTask("qnli", ("question", "sentence"), _NLI2, ("validation",), ("test",),
             TsvColumns("question", "sentence", "label"), TsvColumns("question", "sentence", None),
             _std_files("qnli"), {"test": "QNLI.tsv"}, "accuracy"),
    GlueTask("rte", ("sentence1", "sentence2"), _NLI2, ("validation",), ("test",),
             TsvColumns("sentence1", "sentence2", "label"), TsvColumns("sentence1", "sentence2", None),
             _std_files("rte"), {"test": "RTE.tsv"}, "accuracy"),
    GlueTask("wnli", ("sentence1", "sentence2"), ("0", "1"), ("validation",), ("test",),
             TsvColumns("sentence1", "sentence2", "label"), TsvColumns("sentence1", "sentence2", None),
             _std_files("wnli"), {"test": "WNLI.tsv"}, "accuracy"),
]}


def get_task(name: str) -> GlueTask:
  key = name.lower().replace("-", "")
  if key not in TASKS:
    close = difflib.get_close_matches(key, TASKS, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(f"unknown GLUE task {name!r}{hint}; known tasks: {', '.join(TASKS)}")
  return TASKS[key]
