"""Orbax checkpoints: periodic saves (keep N), the best by an eval metric, async, resume, and a refusal
to restore a checkpoint written for another model or configuration.

A step that no longer restores (a truncated or deleted file) never blocks a resume: the newest step that
restores is used, each newer unreadable step is named in one warning line and moved aside to
``<step>.unreadable`` (kept, out of orbax's sight, so the resumed run can save that step again)."""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxformers.config import RUNTIME_FIELDS, EncoderConfig
from jaxformers.errors import CheckpointError, CheckpointMismatch
from jaxformers.params import read_shapes

log = logging.getLogger("jaxformers.train")
UNREADABLE = ".unreadable"


def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def keys_to_data(tree):
  """Typed PRNG keys -> their uint32 data (what orbax stores)."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def abstract_keys_to_data(tree):
  def one(x):
    if _is_key(x):
      return jax.ShapeDtypeStruct(jax.eval_shape(jax.random.key_data, x).shape, np.uint32,
                                  sharding=getattr(x, "sharding", None))
    return x
  return jax.tree.map(one, tree)


def _impl_of(like):
  impl = getattr(like.dtype, "_impl", None)   # the key dtype knows its implementation (also when abstract)
  return impl if impl is not None else jax.random.key_impl(like)


def data_to_keys(tree, like):
  return jax.tree.map(lambda x, l: jax.random.wrap_key_data(x, impl=_impl_of(l)) if _is_key(l) else x, tree, like)


# Model config fields that a saved state does not depend on: how the model computes (RUNTIME_FIELDS) and how fresh
# parameters are drawn. A resume, an eval or a predict may change them.
FREE_ON_RESTORE = RUNTIME_FIELDS | {"initializer_range"}


def _field_defaults(config_cls) -> dict:
  out = {}
  for f in dataclasses.fields(config_cls):
    if f.default is not dataclasses.MISSING:
      out[f.name] = f.default
    elif f.default_factory is not dataclasses.MISSING:
      out[f.name] = f.default_factory()
  return out


def _plain(v):
  return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def compare_meta(saved: dict, current: dict, where: str, config_cls=EncoderConfig) -> None:
  """Raise :class:`CheckpointMismatch` naming the first differences that make the checkpoint another model's: a model
  config field a saved state depends on (every ``config_cls`` field but :data:`FREE_ON_RESTORE`), the task, its head
  and labels, and the tree of parameter names and shapes. A field that either metadata lacks (a run saved before the
  field existed) takes its ``config_cls`` default; saved fields ``config_cls`` does not know are not compared."""
  problems = []
  defaults = _field_defaults(config_cls)
  sc, cc = saved.get("model_config", {}), current.get("model_config", {})
  for k, default in defaults.items():
    if k in FREE_ON_RESTORE:
      continue
    s, c = _plain(sc.get(k, default)), _plain(cc.get(k, default))
    if s != c:
      problems.append(f"model config {k}: checkpoint has {s!r}, this run has {c!r}")
  for k in ("task", "model_task", "num_labels"):
    if k == "model_task" and (k not in saved or k not in current):
      continue   # runs saved before the metadata named their head: the task decides it
    if saved.get(k) != current.get(k):
      problems.append(f"{k}: checkpoint has {saved.get(k)!r}, this run has {current.get(k)!r}")
  sp, cp = read_shapes(saved.get("param_shapes", {})), read_shapes(current.get("param_shapes", {}))
  for k in sorted(set(sp) | set(cp)):
    if sp.get(k) != cp.get(k):
      problems.append(f"parameter {k}: checkpoint has shape {sp.get(k)}, this run has {cp.get(k)}")
  if problems:
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    raise CheckpointMismatch(f"checkpoint in {where} was written for another model or configuration: "
                             + "; ".join(problems[:5]) + more
                             + ". Use a fresh --workdir, or the configuration that wrote it.")


def _cause(e: BaseException) -> str:
  """The innermost cause of ``e`` on one line (tensorstore and orbax wrap the real reason several times)."""
  seen = [e]
  while (seen[-1].__cause__ or seen[-1].__context__) is not None and len(seen) < 20:
    seen.append(seen[-1].__cause__ or seen[-1].__context__)
  for x in reversed(seen):
    text = " ".join(str(x).split()).split(" [tensorstore_spec")[0]
    if text:
      return text if len(text) <= 320 else f"{text[:150]} ... {text[-160:]}"   # the OS error comes last
  return type(e).__name__


def _unraisable(u) -> None:
  if u.exc_type is RuntimeError and str(u.exc_value) == "Event loop is closed":
    return
  _unraisable.previous(u)


class _ReportedFailures(logging.Filter):
  """When one read or write of a checkpoint fails, orbax logs the error from each of its threads and asyncio logs
  every abandoned operation ("exception was never retrieved"), hundreds of tracebacks in all; the failure is
  reported on one line instead. Drops exactly those error records: about a half-written
  ``*.orbax-checkpoint-tmp`` directory under one of ``workdirs`` (a failed save), or about one of
  ``unreadable`` (step directories that failed to restore)."""

  def __init__(self):
    super().__init__()
    self.workdirs: set[str] = set()
    self.unreadable: set[str] = set()

  def filter(self, record) -> bool:
    if record.levelno < logging.ERROR:
      return True
    text = f"{record.getMessage()} {record.exc_info[1] if record.exc_info else ''}"
    failed_save = "orbax-checkpoint-tmp" in text and any(d in text for d in self.workdirs)
    return not (failed_save or any(d in text for d in self.unreadable))


_REPORTED = _ReportedFailures()


def _quiet_failures(workdir: str | None = None, unreadable: str | None = None) -> None:
  """Install the filters (once): :class:`_ReportedFailures` on the absl (orbax) and asyncio loggers, and a
  ``sys.unraisablehook`` dropping the "Event loop is closed" tracebacks of tensorstore operations that finish
  after orbax closed its event loop on a failure."""
  _REPORTED.workdirs.update([workdir] if workdir else [])
  _REPORTED.unreadable.update([unreadable] if unreadable else [])
  for name in ("absl", "asyncio"):
    if _REPORTED not in logging.getLogger(name).filters:
      logging.getLogger(name).addFilter(_REPORTED)
  if sys.unraisablehook is not _unraisable:
    _unraisable.previous = sys.unraisablehook
    sys.unraisablehook = _unraisable


@contextlib.contextmanager
def _quiet_orbax():
  """Orbax logs each failed read with its traceback; the caller reports the failure on one line instead."""
  loggers = [logging.getLogger(n) for n in ("absl", "orbax")]
  levels = [l.level for l in loggers]
  for l in loggers:
    l.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    for l, v in zip(loggers, levels):
      l.setLevel(v)


def _try_steps(manager, restore_one, where: str):
  """``restore_one(step)`` for the steps of ``manager`` newest first until one works; a
  :class:`CheckpointMismatch` is raised at once. Returns ``(result, step, skipped)`` with ``skipped`` the
  newer steps that failed, as ``(step, cause)``; None without steps; raises :class:`CheckpointError` when
  none restores."""
  skipped = []
  for step in sorted(manager.all_steps(), reverse=True):
    probe = f"{where}/{step}/"
    # filtered from the start: asyncio may report an abandoned read of this step while the restore still runs
    _quiet_failures(unreadable=probe)
    try:
      with _quiet_orbax():
        out = restore_one(step)
    except CheckpointMismatch:
      _REPORTED.unreadable.discard(probe)
      raise
    except Exception as e:   # tensorstore raises bare Exceptions; orbax ValueError, KeyError, OSError, ...
      gc.collect()           # abandoned reads of the step report now, while their records are dropped
      skipped.append((step, _cause(e)))
      continue
    _REPORTED.unreadable.discard(probe)
    return out, step, skipped
  if skipped:
    raise CheckpointError(f"no checkpoint in {where} restores: " + "; ".join(f"step {s}: {c}" for s, c in skipped)
                          + " (nothing was moved or deleted)")
  return None


class Checkpoints:
  """``DIR/checkpoints``: the latest ``keep`` saves (resume); ``DIR/best``: the best by ``best_metric``."""

  def __init__(self, workdir: str | Path, keep: int = 2, best_metric: str = "", best_mode: str = "max",
               async_save: bool = True):
    workdir = Path(workdir).absolute()
    self.dir = workdir / "checkpoints"
    _quiet_failures(workdir=str(workdir))
    self.latest = ocp.CheckpointManager(
        self.dir, options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save))
    self.best_metric = best_metric
    self.best = None
    if best_metric:
      self.best = ocp.CheckpointManager(workdir / "best", options=ocp.CheckpointManagerOptions(
          max_to_keep=1, best_fn=lambda m: float(m[best_metric]), best_mode=best_mode,
          keep_checkpoints_without_metrics=False, enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  @contextlib.contextmanager
  def _writing(self, what: str):
    """A failed write (a full disk, a quota) becomes one :class:`CheckpointError` line naming what was written,
    the cause and the newest complete checkpoint; orbax leaves only a ``*.orbax-checkpoint-tmp`` directory."""
    try:
      yield
    except Exception as e:
      done = sorted(int(p.name) for p in self.dir.iterdir() if p.name.isdigit()) if self.dir.is_dir() else []
      raise CheckpointError(f"{what} failed ({_cause(e)}); the checkpoints saved before are intact (newest: "
                            + (f"step {done[-1]}" if done else "none") + "): fix the cause (e.g. free disk space) and "
                            "run the same command to resume") from None

  def save(self, step: int, state, meta: dict, force: bool = False) -> None:
    args = ocp.args.Composite(state=ocp.args.StandardSave(keys_to_data(state)), meta=ocp.args.JsonSave(meta))
    with self._writing(f"saving checkpoint step {step} in {self.dir}"):
      self.latest.save(step, args=args, force=force)

  def save_best(self, step: int, state, meta: dict, metrics: dict) -> None:
    if self.best is None or self.best_metric not in metrics:
      return
    if step in self.best.all_steps():
      return   # saved by an earlier attempt of this run at this very step (resume is exact): the same state
    args = ocp.args.Composite(state=ocp.args.StandardSave(keys_to_data(state)), meta=ocp.args.JsonSave(meta))
    with self._writing(f"saving step {step} in {self.best.directory}"):
      self.best.save(step, args=args, metrics={k: float(v) for k, v in metrics.items()}, force=True)

  def read_meta(self, step: int, manager=None) -> dict:
    m = manager or self.latest
    return m.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state, current_meta: dict, manager=None):
    """Restore ``step`` straight into the (sharded) abstract target after checking it fits this run."""
    m = manager or self.latest
    saved = self.read_meta(step, m)
    compare_meta(saved, current_meta, str(m.directory))
    out = m.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_keys_to_data(abstract_state))))
    return data_to_keys(out["state"], abstract_state), saved

  def restore_latest(self, abstract_state, current_meta: dict):
    """Resume: restore the newest step of ``DIR/checkpoints`` that restores, as ``(state, saved_meta, step)``;
    None when there is none. A step whose files are damaged is skipped with a warning naming it and the cause,
    and moved aside to ``<step>.unreadable`` (never deleted) once an older one has restored. Raises
    :class:`CheckpointMismatch` for a checkpoint of another configuration, :class:`CheckpointError` when
    steps exist but none restores (then nothing is moved)."""
    found = _try_steps(self.latest, lambda step: self.restore(step, abstract_state, current_meta), str(self.dir))
    if found is None:
      return None
    (state, saved), step, skipped = found
    if skipped:
      self._set_aside(skipped, step)
    return state, saved, step

  def _set_aside(self, skipped, step: int) -> None:
    """Rename unreadable step directories out of orbax's view (it would refuse to save those steps again)."""
    if jax.process_index() == 0:
      for s, cause in skipped:
        dst, n = self.dir / f"{s}{UNREADABLE}", 1
        while dst.exists():
          dst, n = self.dir / f"{s}{UNREADABLE}{n}", n + 1
        (self.dir / str(s)).rename(dst)
        log.warning("%s/%d does not restore (%s); kept as %s, resuming from step %d", self.dir, s, cause,
                    dst.name, step)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("jaxformers_set_aside_unreadable")
    self.latest.reload()

  def wait(self) -> None:
    with self._writing(f"saving a checkpoint in {self.dir.parent}"):
      self.latest.wait_until_finished()
      if self.best is not None:
        self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    if self.best is not None:
      self.best.close()


def restore_for_inference(workdir: str | Path, target, current_meta: dict):
  """Restore the subset ``target`` (e.g. params and rngs) of the newest state in ``DIR/best``, else
  ``DIR/checkpoints``, after checking the checkpoint fits this run. Returns ``(state, meta, step)``.
  A step that does not restore is named in a warning and the next older one (then ``DIR/checkpoints``)
  is tried; nothing is moved or written."""
  workdir = Path(workdir).absolute()
  abs_data = abstract_keys_to_data(target)
  errors = []
  for sub in (workdir / "best", workdir / "checkpoints"):
    if not (sub.is_dir() and any(p.name.isdigit() for p in sub.iterdir())):
      continue
    m = ocp.CheckpointManager(sub, options=ocp.CheckpointManagerOptions(read_only=True))

    def one(step):
      saved = m.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      compare_meta(saved, current_meta, str(sub))
      out = m.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=abs_data, restore_args=ocp.checkpoint_utils.construct_restore_args(abs_data), partial_restore=True)))
      return data_to_keys(out["state"], target), saved
    try:
      found = _try_steps(m, one, str(sub))
    except CheckpointError as e:
      errors.append(str(e))
      log.warning("%s", e)
      continue
    finally:
      m.close()
    if found is not None:
      (state, saved), step, skipped = found
      for s, cause in skipped:
        log.warning("%s/%d does not restore (%s); using step %d", sub, s, cause, step)
      return state, saved, step
  if errors:
    raise CheckpointError("; ".join(errors))
  raise FileNotFoundError(f"no checkpoint under {workdir / 'best'} or {workdir / 'checkpoints'}: "
                          f"train first with the same --workdir")
