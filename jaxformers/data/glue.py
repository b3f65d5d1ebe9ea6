"""GLUE tasks (columns, labels, metrics and file names, one record per task) and the ``glue_tsv`` source."""
from __future__ import annotations

import csv
import dataclasses
import difflib
import io
import sys
from pathlib import Path

from jaxformers.data.sources import SOURCES, DataError, Examples, Labels, Source, finish, label_value, read_text


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

GLUE_TASKS = {t.name: t for t in [
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
  if key not in GLUE_TASKS:
    close = difflib.get_close_matches(key, GLUE_TASKS, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(f"unknown GLUE task {name!r}{hint}; known tasks: {', '.join(GLUE_TASKS)}")
  return GLUE_TASKS[key]


class GlueSource(Source):
  """What the GLUE sources share: labels, metric and splits from the task record ``data.glue_task``."""

  def check(self, data_cfg) -> None:
    if not data_cfg.glue_task:
      raise DataError(f"config.data.source={data_cfg.source!r} needs config.data.glue_task (one of "
                      f"{', '.join(GLUE_TASKS)})")
    try:
      get_task(data_cfg.glue_task)
    except ValueError as e:
      raise DataError(f"config.data.glue_task: {e}") from None

  def labels(self, data_cfg) -> Labels:
    t = get_task(data_cfg.glue_task)
    return Labels(t.num_labels, t.label_names, t.metric)

  def eval_splits(self, data_cfg) -> tuple[str, ...]:
    return get_task(data_cfg.glue_task).eval_splits

  def test_splits(self, data_cfg) -> tuple[str, ...]:
    return get_task(data_cfg.glue_task).test_splits

  def prediction_file(self, data_cfg, split: str) -> str:
    return get_task(data_cfg.glue_task).submission[split]


def read_glue_tsv(path: str | Path, cols: TsvColumns, task: GlueTask, with_labels: bool) -> Examples:
  """One GLUE TSV file as distributed (tab separated, no quoting; CoLA train/dev have no header)."""
  path = Path(path)
  if not path.is_file():
    raise DataError(f"GLUE {task.name}: data file {path} does not exist (expected the GLUE distribution's "
                    f"{path.name} in {path.parent})")
  csv.field_size_limit(sys.maxsize)
  rows = list(csv.reader(io.StringIO(read_text(path), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
  if cols.header:
    if not rows:
      raise DataError(f"{path}: the data set is empty (no header, no rows)")
    header = [h.strip() for h in rows[0]]
    rows = rows[1:]

    def col(name):
      if name not in header:
        close = difflib.get_close_matches(name, header, n=2)
        raise DataError(f"{path}: missing column {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                        + f"; columns in the file: {', '.join(header)}")
      return header.index(name)
  else:
    def col(i):
      return i
  ia, ib = col(cols.text_a), (col(cols.text_b) if cols.text_b is not None else None)
  il = col(cols.label) if (with_labels and cols.label is not None) else None
  a, b, labels = [], ([] if ib is not None else None), ([] if il is not None else None)
  need = max(i for i in (ia, ib, il) if i is not None)
  for n, row in enumerate(rows, start=2 if cols.header else 1):
    if not row or all(not c for c in row):
      continue
    if len(row) <= need:
      raise DataError(f"{path} line {n}: has {len(row)} fields, expected at least {need + 1}")
    a.append(row[ia])
    if ib is not None:
      b.append(row[ib])
    if il is not None:
      labels.append(label_value(row[il], task.label_names, task.is_regression, f"{path} line {n}"))
  return finish(str(path), a, b, labels, task.is_regression)


@SOURCES.register("glue_tsv")
class GlueTsv(GlueSource):
  """The GLUE TSV files as distributed, ``data.dir`` = the task's folder."""

  def check(self, data_cfg) -> None:
    super().check(data_cfg)
    if not data_cfg.dir:
      raise DataError("config.data.source='glue_tsv' needs config.data.dir, the GLUE task directory")

  def examples(self, data_cfg, split: str) -> Examples:
    """One split's TSV file; test files have no labels."""
    task = get_task(data_cfg.glue_task)
    if split not in task.tsv_files:
      raise DataError(f"GLUE {task.name} has no split {split!r}; splits: {', '.join(task.tsv_files)}")
    is_test = split.startswith("test")
    cols = task.tsv_test if is_test else task.tsv_train
    return read_glue_tsv(Path(data_cfg.dir) / task.tsv_files[split], cols, task, with_labels=not is_test)
