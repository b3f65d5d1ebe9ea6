"""Shared helpers for the training tests: load a config file with overrides, read metrics.jsonl."""
import importlib.util
import json
import os
import tempfile
from pathlib import Path

import jax

# a persistent compilation cache: the training tests compile the same tiny steps many times
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "jaxformers-test-jax-cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

ROOT = Path(__file__).resolve().parents[1]


def load_config(name: str, arg: str | None = None, **overrides):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", ROOT / "configs" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(arg)
  for key, v in overrides.items():
    node = c
    parts = key.split("__")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = v
  return c


def records(workdir, kind="train"):
  path = Path(workdir) / "metrics.jsonl"
  return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


def train_losses(workdir):
  return {r["step"]: r["loss"] for r in records(workdir, "train")}


def checkpoint_params(workdir, step, sub="checkpoints") -> dict:
  """The parameters saved at ``step`` in ``DIR/<sub>`` as ``{"encoder.blocks.0.mixer.query.kernel": array}``."""
  import numpy as np
  import orbax.checkpoint as ocp
  m = ocp.CheckpointManager(Path(workdir) / sub, options=ocp.CheckpointManagerOptions(read_only=True))
  state = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  m.close()
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]:
    parts = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
    if parts[-1] == "value":          # the Variable's own field, after the parameter's path
      parts = parts[:-1]
    out[".".join(parts)] = np.asarray(x)
  return out
