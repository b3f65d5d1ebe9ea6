"""Training runs as models: a ``train.py`` work directory loads like a native checkpoint.

A run directory ``WORKDIR`` holds ``tokenizer.json`` and orbax trainer states in
``best/<step>`` (the best by the task's metric) and ``checkpoints/<step>`` (the latest
saves). ``from_pretrained(WORKDIR)`` restores the parameters of the best state, else of the
latest in ``checkpoints/``; ``WORKDIR/checkpoints/N`` (or ``WORKDIR/best``) picks one. The
optimiser state is never read.
"""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxformers import models
from jaxformers.checkpoints.workdir import STATE_DIRS, is_step_dir, saved_steps
from jaxformers.config import EncoderConfig
from jaxformers.errors import CheckpointError
from jaxformers.params import param_shapes, read_shapes


def step_dir(path: str | Path) -> Path:
  """The trainer state that ``path`` names: itself (a step), the newest step of ``best/`` or ``checkpoints/``,
  or for ``WORKDIR`` the best state, else the latest saved one."""
  p = Path(path).absolute()   # orbax takes absolute paths only
  if is_step_dir(p):
    return p
  for d in ([p] if p.name in STATE_DIRS and saved_steps(p) else [p / s for s in STATE_DIRS]):
    steps = saved_steps(d)
    if steps:
      return d / str(steps[-1])
  raise CheckpointError(f"{p}: a training run directory with no saved state yet (no step under "
                        f"{' or '.join(f'{s}/' for s in STATE_DIRS)}); train first, or wait for the first checkpoint")


def read_meta(step: Path) -> dict:
  """The metadata the trainer saved beside a state (model_config, task, num_labels, param_shapes, label_names...)."""
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as c:
    return c.restore(step / "meta")


def build(meta: dict, where: str, rngs: nnx.Rngs | None = None, **runtime):
  """The task model the run trained (SequenceClassifier for classification and regression, MaskedLM for mlm)."""
  try:
    cfg = EncoderConfig.from_dict(meta["model_config"], source=where).replace(**runtime)
    task = meta.get("model_task") or models.TRAINER_TASKS[meta["task"]]
  except (KeyError, ValueError, TypeError) as e:
    raise CheckpointError(f"{where}: not a jaxformers trainer state ({type(e).__name__}: {e})") from None
  return models.build(task, cfg, num_labels=meta.get("num_labels"), rngs=rngs)


def restore(step: Path, rngs: nnx.Rngs | None = None, **runtime):
  """The model of one trainer state with its trained parameters, in eval mode, ``label_names`` set."""
  meta = read_meta(step)
  where = str(step)
  if ((meta.get("config") or {}).get("search") or {}).get("enabled"):
    root = step.parent.parent
    derived = root / "derived"
    raise CheckpointError(f"{root}: an architecture search's run, whose states hold the supernet, not a model: use its "
                          f"derived model, {derived}" + ("" if (derived / "jaxformers.json").is_file() else
                                                        " (written when the search finishes)"))
  abstract = nnx.eval_shape(lambda: build(meta, where, **runtime))
  params = nnx.split(abstract, nnx.Param, ...)[1]
  saved, now = read_shapes(meta.get("param_shapes", {})), param_shapes(params)
  if saved != now:
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    raise CheckpointError(f"{where}: saved parameters do not fit the model its metadata describes (first: "
                          f"{diff[0]} saved {saved.get(diff[0])}, model {now.get(diff[0])})")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), params)}
  with ocp.PyTreeCheckpointer() as c:
    out = c.restore(step / "state", args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
  model = build(meta, where, rngs=rngs, **runtime)
  nnx.update(model, out["params"])
  if meta.get("label_names") and hasattr(model, "num_labels"):
    model.label_names = tuple(meta["label_names"])
  model.eval()
  return model
