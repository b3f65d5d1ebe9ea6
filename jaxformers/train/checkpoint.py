"""Orbax checkpoints: periodic saves (keep N), the best by an eval metric, async, resume, and a refusal
to restore a checkpoint written for another model or configuration."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatch(ValueError):
  """The checkpoint in the workdir was written for another model or configuration."""


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


def param_shapes(params) -> dict[str, list[int]]:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {jax.tree_util.keystr(p): list(np.shape(x)) for p, x in flat}


def compare_meta(saved: dict, current: dict, where: str) -> None:
  """Raise :class:`CheckpointMismatch` naming the first differing model-config entries and parameters."""
  problems = []
  sc, cc = saved.get("model_config", {}), current.get("model_config", {})
  for k in sorted(set(sc) | set(cc)):
    if sc.get(k) != cc.get(k):
      problems.append(f"model config {k}: checkpoint has {sc.get(k)!r}, this run has {cc.get(k)!r}")
  for k in ("task", "num_labels"):
    if saved.get(k) != current.get(k):
      problems.append(f"{k}: checkpoint has {saved.get(k)!r}, this run has {current.get(k)!r}")
  sp, cp = saved.get("param_shapes", {}), current.get("param_shapes", {})
  for k in sorted(set(sp) | set(cp)):
    if sp.get(k) != cp.get(k):
      problems.append(f"parameter {k}: checkpoint has shape {sp.get(k)}, this run has {cp.get(k)}")
  if problems:
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    raise CheckpointMismatch(f"checkpoint in {where} was written for another model or configuration: "
                             + "; ".join(problems[:5]) + more
                             + ". Use a fresh --workdir, or the configuration that wrote it.")


class Checkpoints:
  """``DIR/checkpoints``: the latest ``keep`` saves (resume); ``DIR/best``: the best by ``best_metric``."""

  def __init__(self, workdir: str | Path, keep: int = 2, best_metric: str = "", best_mode: str = "max",
               async_save: bool = True):
    workdir = Path(workdir).absolute()
    self.dir = workdir / "checkpoints"
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

  def save(self, step: int, state, meta: dict, force: bool = False) -> None:
    args = ocp.args.Composite(state=ocp.args.StandardSave(keys_to_data(state)), meta=ocp.args.JsonSave(meta))
    self.latest.save(step, args=args, force=force)

  def save_best(self, step: int, state, meta: dict, metrics: dict) -> None:
    if self.best is None or self.best_metric not in metrics:
      return
    args = ocp.args.Composite(state=ocp.args.StandardSave(keys_to_data(state)), meta=ocp.args.JsonSave(meta))
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

  def wait(self) -> None:
    self.latest.wait_until_finished()
    if self.best is not None:
      self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    if self.best is not None:
      self.best.close()


def restore_for_inference(workdir: str | Path, target, current_meta: dict):
  """Restore the subset ``target`` (e.g. params and rngs) of the newest state in ``DIR/best``, else
  ``DIR/checkpoints``, after checking the checkpoint fits this run. Returns ``(state, meta, step)``."""
  workdir = Path(workdir).absolute()
  for sub in (workdir / "best", workdir / "checkpoints"):
    if sub.is_dir() and any(p.name.isdigit() for p in sub.iterdir()):
      m = ocp.CheckpointManager(sub, options=ocp.CheckpointManagerOptions(read_only=True))
      step = m.latest_step()
      saved = m.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      compare_meta(saved, current_meta, str(sub))
      abs_data = abstract_keys_to_data(target)
      out = m.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=abs_data, restore_args=ocp.checkpoint_utils.construct_restore_args(abs_data), partial_restore=True)))
      m.close()
      return data_to_keys(out["state"], target), saved, step
  raise FileNotFoundError(f"no checkpoint under {workdir / 'best'} or {workdir / 'checkpoints'}: "
                          f"train first with the same --workdir")
