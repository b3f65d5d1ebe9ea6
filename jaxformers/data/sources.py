"""Where examples come from: the embedded default, GLUE TSV files, CSV/JSONL files, tfds.

Every source returns :class:`Examples`: parallel lists of texts and a label array, with
the file and row each example came from for error messages.
"""
from __future__ import annotations

import csv
import dataclasses
import difflib
import json
import sys
from pathlib import Path

import numpy as np

from jaxformers.data import embedded
from jaxformers.data.glue import GlueTask, TsvColumns, get_task


class DataError(ValueError):
  """Bad input data: the message names the file, column or value at fault."""


@dataclasses.dataclass
class Examples:
  text_a: list[str]
  text_b: list[str] | None
  label: np.ndarray | None          # int32 class ids, float32 targets, or None (unlabelled)
  origin: str                       # file or dataset name, for messages

  def __len__(self):
    return len(self.text_a)


def _label_value(raw, label_names, regression, where):
  if regression:
    try:
      return float(raw)
    except (TypeError, ValueError):
      raise DataError(f"{where}: label {raw!r} is not a number (this task is a regression)") from None
  names = list(label_names)
  s = str(raw).strip()
  if s in names:
    return names.index(s)
  try:
    v = int(float(s))
  except ValueError:
    v = None
  if v is None or not 0 <= v < len(names) or str(v) != s and f"{v}.0" != s:
    raise DataError(f"{where}: label {raw!r} is outside the task's range; expected one of "
                    f"{', '.join(names)}" + (f" or an index 0..{len(names) - 1}" if not names[0].isdigit() else ""))
  return v


def _finish(origin, a, b, labels, regression):
  if not a:
    raise DataError(f"{origin}: the data set is empty (no examples)")
  label = None
  if labels is not None:
    label = np.asarray(labels, np.float32 if regression else np.int32)
  return Examples(list(a), list(b) if b is not None else None, label, origin)


def read_glue_tsv(path: str | Path, cols: TsvColumns, task: GlueTask, with_labels: bool) -> Examples:
  """One GLUE TSV file as distributed (tab separated, no quoting; CoLA train/dev have no header)."""
  path = Path(path)
  if not path.is_file():
    raise DataError(f"GLUE {task.name}: data file {path} does not exist (expected the GLUE distribution's "
                    f"{path.name} in {path.parent})")
  csv.field_size_limit(sys.maxsize)
  with path.open(encoding="utf-8-sig", newline="") as fh:
    rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
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
      labels.append(_label_value(row[il], task.label_names, task.is_regression, f"{path} line {n}"))
  return _finish(str(path), a, b, labels, task.is_regression)


def glue_tsv(task: GlueTask, data_dir: str, split: str) -> Examples:
  if split not in task.tsv_files:
    raise DataError(f"GLUE {task.name} has no split {split!r}; splits: {', '.join(task.tsv_files)}")
  is_test = split.startswith("test")
  cols = task.tsv_test if is_test else task.tsv_train
  return read_glue_tsv(Path(data_dir) / task.tsv_files[split], cols, task, with_labels=not is_test)


def read_table(path: str | Path, text_a: str, text_b: str | None, label: str | None, *,
               label_names, regression: bool) -> Examples:
  """A CSV, TSV or JSONL file with a column mapping (``text_a``/``text_b``/``label`` column names)."""
  path = Path(path)
  if not path.is_file():
    raise DataError(f"data file {path} does not exist")
  suffix = path.suffix.lower()
  if suffix in (".jsonl", ".json"):
    records = []
    with path.open(encoding="utf-8") as fh:
      for n, line in enumerate(fh, start=1):
        if line.strip():
          try:
            records.append((n, json.loads(line)))
          except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n}: not valid JSON ({e.msg})") from None
    columns = sorted({k for _, r in records for k in r})
  elif suffix in (".csv", ".tsv"):
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8-sig", newline="") as fh:
      reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
      columns = list(reader.fieldnames or [])
      records = [(n, r) for n, r in enumerate(reader, start=2)]
  else:
    raise DataError(f"data file {path}: unknown format {suffix!r}; expected .csv, .tsv, .jsonl or .json")
  for name in (text_a, text_b, label):
    if name and name not in columns:
      close = difflib.get_close_matches(name, columns, n=2)
      raise DataError(f"{path}: missing column {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                      + f"; columns in the file: {', '.join(columns) or '(none)'}")
  a, b = [], ([] if text_b else None)
  labels = [] if label else None
  for n, r in records:
    a.append(str(r[text_a]))
    if text_b:
      b.append(str(r[text_b]))
    if label:
      labels.append(_label_value(r[label], label_names, regression, f"{path} line {n}"))
  return _finish(str(path), a, b, labels, regression)


def tfds_glue(task: GlueTask, split: str, data_dir: str | None = None) -> Examples:
  """``glue/<task>`` through ``tfds.data_source`` (array_record; needs no TensorFlow)."""
  try:
    import tensorflow_datasets as tfds
    import tensorflow_datasets.text.glue  # noqa: F401  (tfds loads dataset modules lazily)
  except ImportError as e:
    raise DataError(f"data.source='tfds' needs tensorflow-datasets: pip install 'jaxformers[tfds]' ({e})") from None
  name = f"glue/{task.name}"
  try:
    src = tfds.data_source(name, split=split, data_dir=data_dir or None)
  except Exception as e:  # tfds raises many types for "not prepared / no network"
    raise DataError(f"tfds {name} split {split!r} is not available ({type(e).__name__}: {e}); prepare it with "
                    f"`tfds build {name} --file_format=array_record` or use data.source='glue_tsv'") from None
  ka, kb = task.tfds_keys
  a, b, labels = [], ([] if kb else None), []
  is_test = split.startswith("test")

  def text(v):
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)

  for i in range(len(src)):
    ex = src[i]
    a.append(text(ex[ka]))
    if kb:
      b.append(text(ex[kb]))
    if not is_test:
      v = ex["label"]
      labels.append(float(v) if task.is_regression else
                    _label_value(int(v), task.label_names, False, f"tfds {name}[{split}] example {i}"))
  return _finish(f"tfds:{name}[{split}]", a, b, None if is_test else labels, task.is_regression)


def embedded_docstrings(split: str) -> Examples:
  splits = embedded.stdlib_docstrings()
  s = "validation" if split != "train" else "train"
  rows = splits[s]
  return _finish(f"embedded:stdlib-docstrings[{s}]", [r["text_a"] for r in rows], [r["text_b"] for r in rows],
                 [r["label"] for r in rows], False)


def load_split(data_cfg, split: str) -> Examples:
  """Examples of one split (``train``, an eval split or a test split) as ``data_cfg`` describes."""
  src = data_cfg.source
  if src == "embedded":
    return embedded_docstrings(split)
  if src in ("glue_tsv", "tfds"):
    task = get_task(data_cfg.glue_task)
    if src == "tfds":
      return tfds_glue(task, split, data_cfg.dir or None)
    return glue_tsv(task, data_cfg.dir, split)
  if src == "files":
    files = {"train": data_cfg.train_file, "test": data_cfg.test_file}
    path = files.get(split, data_cfg.eval_file)
    if not path:
      raise DataError(f"data.source='files' needs data.{'train' if split == 'train' else 'eval'}_file")
    names = tuple(s.strip() for s in data_cfg.label_names.split(",")) if data_cfg.label_names else \
        tuple(str(i) for i in range(data_cfg.num_labels))
    has_label = split != "test" and bool(data_cfg.label_column)
    return read_table(path, data_cfg.text_a_column, data_cfg.text_b_column or None,
                      data_cfg.label_column if has_label else None, label_names=names,
                      regression=data_cfg.num_labels == 1)
  raise DataError(f"unknown data.source {src!r}; expected one of embedded, glue_tsv, tfds, files")


def eval_splits(data_cfg) -> tuple[str, ...]:
  if data_cfg.source in ("glue_tsv", "tfds"):
    return get_task(data_cfg.glue_task).eval_splits
  return ("validation",)


def test_splits(data_cfg) -> tuple[str, ...]:
  if data_cfg.source in ("glue_tsv", "tfds"):
    return get_task(data_cfg.glue_task).test_splits
  return ("test",)


def mlm_texts(data_cfg, split: str) -> list[str]:
  """Plain texts for masked-LM pre-training."""
  if data_cfg.source == "embedded":
    texts = embedded.stdlib_corpus()
    # a stable 2% of documents held out for the eval loss
    import zlib
    keep = [(zlib.crc32(t.encode()) % 50 == 0) == (split != "train") for t in texts]
    texts = [t for t, k in zip(texts, keep) if k]
    if not texts:
      raise DataError("embedded corpus: the data set is empty")
    return texts
  ex = load_split(data_cfg, split)
  return ex.text_a if ex.text_b is None else [a + " " + b for a, b in zip(ex.text_a, ex.text_b)]
