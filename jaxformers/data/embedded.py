"""The embedded default data set: docstrings of the Python standard library.

Built at run time from the ``.py`` sources of the interpreter that runs it (found with
``sysconfig``), so it needs no download. Each example is one documented definition
(module, class or function) of a standard-library package:

* ``text_a``: the definition's kind and name (``"def create_task"``, ``"class Message"``),
* ``text_b``: its docstring,
* ``label``: the package it comes from (``asyncio``, ``email``, ... see ``PACKAGES``).

The task "which package is this from" is learnable from the vocabulary of a
docstring, and a model that has not learnt it scores near chance (1 / 9). The split
is a stable hash of the file path and definition name: about 12% held out. The
exact counts depend on the Python version (documented in the run's summary).
"""
from __future__ import annotations

import ast
import functools
import sysconfig
import zlib
from pathlib import Path

from jaxformers.data.sources import SOURCES, DataError, Examples, Labels, Source, finish

PACKAGES = ("asyncio", "email", "http", "importlib", "logging", "multiprocessing", "unittest", "urllib", "xml")
HELD_OUT_PERCENT = 12


def stdlib_root() -> Path:
  return Path(sysconfig.get_paths()["stdlib"])


def _definitions(path: Path):
  try:
    tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"), filename=str(path))
  except SyntaxError:
    return
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
      doc = ast.get_docstring(node)
      if not doc or len(doc) < 20:
        continue
      if isinstance(node, ast.Module):
        head = f"module {path.stem}"
      elif isinstance(node, ast.ClassDef):
        head = f"class {node.name}"
      else:
        head = f"def {node.name}"
      yield head, " ".join(doc.split())


@functools.lru_cache(maxsize=4)
def stdlib_docstrings(packages=PACKAGES, root: Path | None = None) -> dict[str, list[dict]]:
  """``{"train": [...], "validation": [...]}`` of ``{"text_a", "text_b", "label", "id"}`` examples
  (cached per process; treat the lists as read-only)."""
  root = root or stdlib_root()
  splits = {"train": [], "validation": []}
  for label, pkg in enumerate(packages):
    pkg_dir = root / pkg
    if not pkg_dir.is_dir():
      raise FileNotFoundError(f"embedded data: standard-library package {pkg!r} not found under {root}")
    for f in sorted(pkg_dir.rglob("*.py")):
      rel = f.relative_to(root)
      if any(p in ("test", "tests") for p in rel.parts[:-1]):
        continue
      for head, doc in _definitions(f):
        key = f"{rel.as_posix()}::{head}::{doc[:40]}"
        split = "validation" if zlib.crc32(key.encode()) % 100 < HELD_OUT_PERCENT else "train"
        splits[split].append({"text_a": head, "text_b": doc, "label": label, "id": key})
  return splits


def stdlib_corpus(root: Path | None = None, max_docs: int | None = None) -> list[str]:
  """All docstrings of the standard library (every package, tests excluded), for masked-LM pre-training."""
  root = root or stdlib_root()
  texts = []
  for f in sorted(root.rglob("*.py")):
    rel = f.relative_to(root)
    if any(p in ("test", "tests", "site-packages") for p in rel.parts[:-1]):
      continue
    for _, doc in _definitions(f):
      texts.append(doc)
      if max_docs and len(texts) >= max_docs:
        return texts
  return texts


@SOURCES.register("embedded")
class Embedded(Source):
  """The standard library's docstrings: classify by package; for masked-LM, the whole corpus (2% held out)."""

  def labels(self, data_cfg) -> Labels:
    return Labels(len(PACKAGES), PACKAGES, "accuracy")

  def examples(self, data_cfg, split: str) -> Examples:
    s = "validation" if split != "train" else "train"
    rows = stdlib_docstrings()[s]
    return finish(f"embedded:stdlib-docstrings[{s}]", [r["text_a"] for r in rows], [r["text_b"] for r in rows],
                  [r["label"] for r in rows], False)

  def texts(self, data_cfg, split: str) -> list[str]:
    texts = stdlib_corpus()
    keep = [(zlib.crc32(t.encode()) % 50 == 0) == (split != "train") for t in texts]   # a stable 2% held out
    texts = [t for t, k in zip(texts, keep) if k]
    if not texts:
      raise DataError("embedded corpus: the data set is empty")
    return texts
