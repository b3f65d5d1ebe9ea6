"""The ``files`` source: CSV, TSV or JSONL files with a column mapping.

CSV follows RFC 4180 (quoted fields may hold commas and line breaks). TSV is read as GLUE
writes it: one record per line, fields split at tabs, quotes are ordinary characters. JSONL
holds one JSON object per line. Every record must have every mapped column; the number of
records read and the lines they came from are logged.
"""
from __future__ import annotations

import csv
import difflib
import io
import json
import logging
import sys
from pathlib import Path

from jaxformers.data.sources import SOURCES, DataError, Examples, Labels, Source, finish, label_value, read_text

log = logging.getLogger(__name__)
FORMATS = (".csv", ".tsv", ".jsonl", ".json")


def _missing_column(path, name, columns) -> DataError:
  close = difflib.get_close_matches(name, columns, n=2)
  return DataError(f"{path}: missing column {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                   + f"; columns in the file: {', '.join(columns) or '(none)'}")


def _jsonl_records(path: Path, text: str, wanted: list[str]) -> list[tuple[int, dict]]:
  records = []
  for n, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    try:
      r = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path} line {n}: not valid JSON ({e.msg})") from None
    if not isinstance(r, dict):
      raise DataError(f"{path} line {n}: expected a JSON object with keys {', '.join(wanted)}, "
                      f"got a {type(r).__name__}")
    for name in wanted:
      if name not in r:
        if not records:
          raise _missing_column(path, name, sorted(r))
        raise DataError(f"{path} line {n}: the record has no key {name!r} (its keys: {', '.join(sorted(r))})")
    records.append((n, r))
  return records


def _table_records(path: Path, text: str, tsv: bool, wanted: list[str]) -> list[tuple[int, dict]]:
  csv.field_size_limit(sys.maxsize)
  quoting = dict(quoting=csv.QUOTE_NONE) if tsv else {}
  reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if tsv else ",", **quoting)
  header = next(reader, None)
  if header is None:
    raise DataError(f"{path}: the file is empty (no header row)")
  columns = [h.strip() for h in header]
  for name in wanted:
    if name not in columns:
      raise _missing_column(path, name, columns)
  records, start, spanning = [], reader.line_num + 1, None
  for row in reader:
    n, end = start, reader.line_num
    start = end + 1
    if not row or all(not c.strip() for c in row):
      continue
    if len(row) != len(columns):
      raise DataError(f"{path} line {n}: {len(row)} fields, the header has {len(columns)}"
                      + ("" if tsv else " (a comma inside a text must be quoted: \"a, b\")"))
    if end > n and spanning is None:
      spanning = (n, end)
    records.append((n, dict(zip(columns, row))))
  if spanning:
    log.warning("%s: a quoted field spans lines %d-%d (%d records from %d lines); if that is not intended, "
                "check the file's quotes", path, spanning[0], spanning[1], len(records), reader.line_num)
  return records


def read_records(path: str | Path, wanted: list[str]) -> tuple[list[tuple[int, dict]], int]:
  """``([(line, record)], lines in the file)`` of a CSV, TSV or JSONL file; every record has the ``wanted``
  columns."""
  path = Path(path)
  if not path.is_file():
    raise DataError(f"data file {path} does not exist")
  suffix = path.suffix.lower()
  if suffix not in FORMATS:
    raise DataError(f"data file {path}: unknown format {suffix!r}; expected {', '.join(FORMATS)}")
  text = read_text(path)
  if suffix in (".jsonl", ".json"):
    records = _jsonl_records(path, text, wanted)
  else:
    records = _table_records(path, text, suffix == ".tsv", wanted)
  return records, text.count("\n") + (not text.endswith("\n"))


def read_table(path: str | Path, text_a: str, text_b: str | None, label: str | None, *,
               label_names, regression: bool, hint: str = "") -> Examples:
  """A CSV, TSV or JSONL file with a column mapping (``text_a``/``text_b``/``label`` column names); ``hint``
  ends the message for a label outside ``label_names``."""
  path = Path(path)
  records, lines = read_records(path, [c for c in (text_a, text_b, label) if c])
  a, b = [], ([] if text_b else None)
  labels = [] if label else None
  for n, r in records:
    a.append(str(r[text_a]))
    if text_b:
      b.append(str(r[text_b]))
    if label:
      labels.append(label_value(r[label], label_names, regression, f"{path} line {n}", hint))
  log.info("%s: %d records (lines 1-%d)", path, len(records), lines)
  return finish(str(path), a, b, labels, regression)


def infer_labels(path: str | Path, column: str, others: tuple[str, ...] = ()) -> tuple[int, tuple[str, ...] | None]:
  """``(num_labels, names)`` from the values of ``column`` in a training file (whose ``others`` columns must exist
  too): integer values 0..k-1 are class ids (names None), other integers and strings are class names, sorted
  (integers by value, strings as text)."""
  records, _ = read_records(path, [c for c in (*others, column) if c])
  values = sorted({str(r[column]).strip() for _, r in records})
  if not values:
    raise DataError(f"{path}: no records to infer the labels of column {column!r} from")
  ints = []
  for v in values:
    try:
      ints.append(int(v))
    except ValueError:
      break
  if len(ints) == len(values):
    ints.sort()
    if ints == list(range(len(ints))):
      names = None
    else:
      names = tuple(str(i) for i in ints)
  else:
    numeric = 0
    for v in values:
      try:
        float(v)
        numeric += 1
      except ValueError:
        pass
    if numeric == len(values):
      raise DataError(f"{path}: column {column!r} holds non-integer numbers ({', '.join(values[:3])}, ...); for a "
                      f"regression target set config.data.num_labels=1, for classes set config.data.label_names")
    names = tuple(values)
  if len(values) < 2:
    raise DataError(f"{path}: column {column!r} has one value only ({values[0]!r}); a classifier needs at least 2 "
                    f"classes (set config.data.num_labels / config.data.label_names to name them all)")
  return len(values) if names is None else len(names), names


LABEL_HINT = ("; set config.data.label_names (comma-separated, in id order) and config.data.num_labels to the "
              "file's labels, or set num_labels=0 and label_names='' to infer them from the training file")


@SOURCES.register("files")
class Files(Source):
  """``data.train_file`` / ``eval_file`` / ``test_file`` with ``data.text_a_column`` (``text_b_column``,
  ``label_column``); classes from ``data.num_labels`` and optional ``data.label_names``, or with
  ``num_labels=0`` and no names, inferred from the training file's label column (sorted, logged)."""

  _inferred: dict = {}    # (path, column, mtime) -> (num_labels, names): each file is read for its labels once

  def check(self, data_cfg) -> None:
    if not data_cfg.train_file and not data_cfg.eval_file and not data_cfg.test_file:
      raise DataError("config.data.source='files' needs config.data.train_file (and eval_file / test_file)")
    if data_cfg.num_labels or data_cfg.label_names:
      self.labels(data_cfg)      # inferring the classes is left to the supervised tasks: mlm and heal need no labels

  def labels(self, data_cfg) -> Labels:
    n = data_cfg.num_labels
    if n < 0:
      raise DataError(f"config.data.num_labels={n}: must be 1 (regression), a number of classes, or 0 (infer the "
                      f"classes from the training file)")
    names = tuple(s.strip() for s in data_cfg.label_names.split(",")) if data_cfg.label_names else None
    if n == 0 and names:
      n = len(names)
    elif n == 0:
      n, names = self._infer(data_cfg)
    if names and len(names) != n:
      raise DataError(f"config.data.label_names has {len(names)} names but config.data.num_labels={n}")
    return Labels(n, names, "pearson" if n == 1 else "accuracy")

  def _infer(self, data_cfg) -> tuple[int, tuple[str, ...] | None]:
    path = data_cfg.train_file or data_cfg.eval_file
    if not path or not data_cfg.label_column:
      raise DataError("config.data.num_labels=0 infers the classes from the label column of config.data.train_file "
                      "(or eval_file); with neither, set config.data.num_labels and config.data.label_names")
    p = Path(path)
    key = (str(p.absolute()), data_cfg.label_column, p.stat().st_mtime_ns if p.is_file() else None)
    if key not in Files._inferred:
      n, names = infer_labels(p, data_cfg.label_column, (data_cfg.text_a_column, data_cfg.text_b_column))
      log.info("%s: %d classes inferred from column %r: %s (set config.data.label_names to fix the order, "
               "config.data.num_labels=1 for a regression target)", p, n, data_cfg.label_column,
               ", ".join(f"{i}={v}" for i, v in enumerate(names)) if names else f"ids 0..{n - 1}")
      Files._inferred[key] = (n, names)
    return Files._inferred[key]

  def examples(self, data_cfg, split: str) -> Examples:
    key = {"train": "train_file", "test": "test_file"}.get(split, "eval_file")
    path = data_cfg[key]
    if not path:
      raise DataError(f"data.source='files' needs config.data.{key} for the {split} split")
    has_label = split != "test" and bool(data_cfg.label_column)
    names, regression = None, False
    if has_label:
      labels = self.labels(data_cfg)
      names, regression = labels.names or tuple(str(i) for i in range(labels.num_labels)), labels.regression
    return read_table(path, data_cfg.text_a_column, data_cfg.text_b_column or None,
                      data_cfg.label_column if has_label else None, label_names=names, regression=regression,
                      hint=LABEL_HINT)
