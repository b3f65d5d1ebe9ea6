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
