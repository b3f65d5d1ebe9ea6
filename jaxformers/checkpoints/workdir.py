"""Where a ``train.py`` work directory keeps things: ``tokenizer.json`` and orbax trainer states in ``best/<step>``
and ``checkpoints/<step>``; beside it, ``.DIR.lock``, which the one process training in ``DIR`` holds
(:class:`Lock`). Paths and the lock only; nothing here reads a checkpoint."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from jaxformers.errors import WorkdirLocked

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


def lock_path(workdir: str | Path) -> Path:
  """``.DIR.lock`` beside ``DIR`` (outside it, so that nothing in the workdir changes when a lock is taken over)."""
  p = Path(workdir).resolve()
  return p.parent / f".{p.name}.lock"


class Lock:
  """``.DIR.lock`` beside ``DIR``: held (an exclusive ``flock``) by the one process training in ``DIR``, which writes
  its pid, host and start time into it. A second process is refused with :class:`WorkdirLocked` naming the holder. The
  kernel releases the lock when its holder ends, however it ends: a lock file still naming a process that is gone
  (killed) is taken over, and :attr:`stale` says whose it was. Released, the file is left empty."""

  def __init__(self, workdir: str | Path):
    self.workdir = Path(workdir)
    self.path = lock_path(workdir)
    self.fd = None
    self.stale = None

  def acquire(self) -> "Lock":
    self.path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_holder(fd)
      os.close(fd)
      raise WorkdirLocked(f"{self.workdir} is in use by another training process ("
                          + (f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('started')}"
                             if holder else "that has not written its pid yet") + f", {self.path}): nothing was "
                          f"written; wait for it to end or use another --workdir") from None
    self.stale = _read_holder(fd) or None
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                               "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}) + "\n").encode(), 0)
    os.fsync(fd)
    self.fd = fd
    return self

  def release(self) -> None:
    if self.fd is not None:
      os.ftruncate(self.fd, 0)   # the file stays (unlinking it would let a waiting opener lock a removed file)
      os.close(self.fd)          # closing releases the flock
      self.fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def _read_holder(fd: int) -> dict:
  try:
    text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    return json.loads(text) if text else {}
  except ValueError:
    return {"pid": "?", "host": "?", "started": "?"}
