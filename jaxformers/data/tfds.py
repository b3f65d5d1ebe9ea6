"""The ``tfds`` source: GLUE through ``tfds.data_source`` (array_record; needs no TensorFlow)."""
from __future__ import annotations

from jaxformers.data.glue import GlueSource, GlueTask, get_task
from jaxformers.data.sources import SOURCES, DataError, Examples, finish, label_value


def tfds_glue(task: GlueTask, split: str, data_dir: str | None = None) -> Examples:
  """``glue/<task>`` through ``tfds.data_source`` (array_record; needs no TensorFlow)."""
  try:
    import tensorflow_datasets as tfds   # optional: the tfds extra
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
                    label_value(int(v), task.label_names, False, f"tfds {name}[{split}] example {i}"))
  return finish(f"tfds:{name}[{split}]", a, b, None if is_test else labels, task.is_regression)


@SOURCES.register("tfds")
class TfdsGlue(GlueSource):
  """``glue/<data.glue_task>`` from tensorflow-datasets; ``data.dir`` = its data_dir (optional)."""

  def examples(self, data_cfg, split: str) -> Examples:
    return tfds_glue(get_task(data_cfg.glue_task), split, data_cfg.dir or None)
