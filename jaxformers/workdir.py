"""Where a ``train.py`` work directory keeps things: ``tokenizer.json``, and orbax trainer states in
``best/<step>`` and ``checkpoints/<step>``. Paths only; nothing here reads a checkpoint."""
from __future__ import annotations

from pathlib import Path

STATE_DIRS = ("best", "checkpoints")   # searched in this order for WORKDIR
TOKENIZER = "tokenizer.json"


def saved_steps(d: Path) -> list[int]:
  """Finished steps of an orbax manager directory (half-written ``N.orbax-checkpoint-tmp-*`` are skipped)."""
  if not d.is_dir():
    return []
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "state").is_dir())


def is_step_dir(p: Path) -> bool:
  return p.name.isdigit() and p.parent.name in STATE_DIRS and (p / "state").is_dir() and (p / "meta").is_dir()


def workdir_of(path: str | Path) -> Path | None:
  """The run directory ``path`` belongs to (``WORKDIR``, ``WORKDIR/best``, ``WORKDIR/checkpoints/N``), else None."""
  p = Path(path)
  if not p.is_dir() or (p / "jaxformers.json").is_file() or (p / "config.json").is_file():
    return None
  if is_step_dir(p):
    return p.parent.parent
  if p.name in STATE_DIRS and (saved_steps(p) or (p.parent / TOKENIZER).is_file()):
    return p.parent
  if any(saved_steps(p / d) for d in STATE_DIRS) or \
      any((p / d).is_dir() for d in STATE_DIRS) and any((p / f).is_file() for f in (TOKENIZER, "metrics.jsonl")):
    return p
  return None


def is_run_dir(path: str | Path) -> bool:
  return workdir_of(path) is not None


def tokenizer_dir(path: str | Path) -> Path:
  """Where the tokenizer of ``path`` lives: the run directory for a run or one of its states, else ``path``."""
  root = workdir_of(path)
  return root if root is not None else Path(path)
