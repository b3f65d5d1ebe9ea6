"""Where examples come from: a registry of data sources (``data.source`` in the trainer's config).

Every source returns :class:`Examples` (parallel lists of texts and a label array, with the
file and row each example came from for error messages) and says what its labels are
(:class:`Labels`) and which splits it has. Sources: ``embedded`` (:mod:`jaxformers.data.embedded`),
``glue_tsv`` (:mod:`jaxformers.data.glue`), ``tfds`` (:mod:`jaxformers.data.tfds`), ``files``
(:mod:`jaxformers.data.files`). A new source is one module with a :class:`Source` subclass
registered in :data:`SOURCES`, imported in ``jaxformers/data/__init__.py``.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxformers.errors import DataError
from jaxformers.registry import Registry


@dataclasses.dataclass
class Examples:
  text_a: list[str]
  text_b: list[str] | None
  label: np.ndarray | None          # int32 class ids, float32 targets, or None (unlabelled)
  origin: str                       # file or dataset name, for messages

  def __len__(self):
    return len(self.text_a)

  def subset(self, keep: np.ndarray) -> "Examples":
    return Examples([self.text_a[i] for i in keep], [self.text_b[i] for i in keep] if self.text_b else None,
                    self.label[keep] if self.label is not None else None, self.origin)


@dataclasses.dataclass(frozen=True)
class Labels:
  """What a source's labels are: ``names`` of the classes in id order (None: ids or a regression target),
  ``num_labels`` (1 = regression) and the official ``metric`` that picks the best checkpoint."""
  num_labels: int
  names: tuple[str, ...] | None
  metric: str

  @property
  def regression(self) -> bool:
    return self.num_labels == 1


class Source:
  """One kind of data. Subclasses implement :meth:`examples` and :meth:`labels`; the rest has defaults."""

  def check(self, data_cfg) -> None:
    """Raise DataError for a config this source cannot read (called before anything is read or written)."""

  def labels(self, data_cfg) -> Labels:
    raise NotImplementedError

  def examples(self, data_cfg, split: str) -> Examples:
    raise NotImplementedError

  def eval_splits(self, data_cfg) -> tuple[str, ...]:
    return ("validation",)

  def test_splits(self, data_cfg) -> tuple[str, ...]:
    return ("test",)

  def prediction_file(self, data_cfg, split: str) -> str:
    return f"{split}.tsv"

  def texts(self, data_cfg, split: str) -> list[str]:
    """Plain texts (masked-LM training): each example's texts joined."""
    ex = self.examples(data_cfg, split)
    return ex.text_a if ex.text_b is None else [a + " " + b for a, b in zip(ex.text_a, ex.text_b)]


SOURCES: Registry = Registry("data source")


def get_source(data_cfg) -> Source:
  try:
    return SOURCES.get(data_cfg.source)()
  except KeyError as e:
    raise DataError(f"config.data.source={data_cfg.source!r}: {e.args[0]}") from None


def load_split(data_cfg, split: str) -> Examples:
  """Examples of one split (``train``, an eval split or a test split) as ``data_cfg`` describes."""
  return get_source(data_cfg).examples(data_cfg, split)


def label_value(raw, label_names, regression, where, hint: str = ""):
  """A label as stored (a class name, an index, a number) -> class id or float target; ``hint`` ends the error
  message for a label outside ``label_names`` (what to set to accept it)."""
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
                    f"{', '.join(names)}" + (f" or an index 0..{len(names) - 1}" if not names[0].isdigit() else "")
                    + hint)
  return v


def finish(origin, a, b, labels, regression) -> Examples:
  if not a:
    raise DataError(f"{origin}: the data set is empty (no examples)")
  label = None
  if labels is not None:
    label = np.asarray(labels, np.float32 if regression else np.int32)
  return Examples(list(a), list(b) if b is not None else None, label, origin)


def read_text(path, what: str = "data file") -> str:
  """A UTF-8 text file (a BOM is dropped); other bytes give a DataError naming the file and line."""
  raw = open(path, "rb").read()
  try:
    return raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b"\n") + 1
    raise DataError(f"{what} {path} line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                    f"save it as UTF-8") from None
