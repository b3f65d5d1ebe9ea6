"""What ``train.py`` runs: clear messages and exit codes for every expected failure."""
from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import sys

from jaxformers.errors import (CheckpointError, CheckpointMismatch, ConfigError, DataError, Interrupted, NonFiniteLoss,
                               WorkdirLocked)
from jaxformers.train.loop import run

log = logging.getLogger("jaxformers.train")

EXIT_ERROR = 1


def _load_config_file(spec: str):
  path, _, arg = spec.partition(":")
  mod_spec = importlib.util.spec_from_file_location("_train_config", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(arg or None)


def explain_override(argv: list[str], err: Exception) -> str:
  """Turn a flag-parsing failure into one line; for an unknown ``--config.a.b`` key, name the closest valid ones."""
  spec = None
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      spec = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
  if spec:
    try:
      cfg = _load_config_file(spec)
    except Exception as e:  # the config file itself is broken
      return f"cannot load config {spec}: {type(e).__name__}: {e}"
    for a in argv:
      if not a.startswith("--config."):
        continue
      key = a[len("--config."):].split("=", 1)[0]
      node, done = cfg, []
      for part in key.split("."):
        keys = list(node.keys()) if hasattr(node, "keys") else []
        if part not in keys:
          prefix = "".join(f"{d}." for d in done)
          close = difflib.get_close_matches(part, keys, n=3)
          valid = ", ".join(f"{prefix}{c}" for c in (close or keys))
          return f"unknown config key {key!r} in {a!r}; closest valid keys: {valid}"
        node, done = node[part], done + [part]
  msg = str(err).strip().strip("'\"").replace("\\n", " ")
  return f"bad command line: {msg}"


def override_keys(argv: list[str]) -> set[str]:
  """The config keys ``--config.a.b=V`` (or ``--config.a.b V``) arguments set, as ``{"a.b"}``."""
  return {a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")}


def settle_length(config, given: set[str]) -> None:
  """The command line's choice of the run's length wins over the config file's: with ``train.num_steps`` given (and
  not ``train.num_epochs``), the file's ``num_epochs`` becomes 0, and the other way round; logged. Both given and
  both positive is left for the trainer to refuse (config.train.num_steps and num_epochs are both set)."""
  t = config.train
  steps, epochs = "train.num_steps" in given, "train.num_epochs" in given
  if steps and not epochs and t.num_steps > 0 and t.num_epochs > 0:
    log.info("train.num_steps=%d from the command line rules; the config's train.num_epochs=%g is set to 0",
             t.num_steps, t.num_epochs)
    t.num_epochs = 0.0
  elif epochs and not steps and t.num_epochs > 0 and t.num_steps > 0:
    log.info("train.num_epochs=%g from the command line rules; the config's train.num_steps=%d is set to 0",
             t.num_epochs, t.num_steps)
    t.num_steps = 0


def apply_overrides(config, overrides: list[str]) -> set[str]:
  """``["train.num_steps=10", ...]`` set on ``config`` (values parsed as the key's type: int, float, bool, str), as
  train.py's ``--config.KEY=VALUE`` flags do; the keys set. An unknown key names the closest valid ones."""
  given = set()
  for item in overrides:
    key, eq, raw = item.partition("=")
    if not eq:
      raise ConfigError(f"--config.{item}: expected --config.KEY=VALUE")
    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if part not in keys:
        prefix = "".join(f"{p}." for p in parts[:i])
        close = difflib.get_close_matches(part, keys, n=3)
        raise ConfigError(f"unknown config key {key!r} in --config.{item}; closest valid keys: "
                          + ", ".join(f"{prefix}{c}" for c in (close or keys)))
      if i < len(parts) - 1:
        node = node[part]
    kind = node.get_type(parts[-1])
    try:
      if kind is bool:
        if raw.lower() not in ("true", "false", "1", "0"):
          raise ValueError(raw)
        value = raw.lower() in ("true", "1")
      elif kind in (int, float):
        value = kind(raw)
      else:
        value = raw
    except ValueError:
      raise ConfigError(f"--config.{item}: {raw!r} is not a{'n' if kind is int else ''} {kind.__name__}") from None
    node[parts[-1]] = value
    given.add(key)
  return given


def main(config, workdir: str, argv: list[str] = ()) -> int:
  """Run ``config`` in ``workdir``. ``argv`` (train.py's) names the ``--config.KEY`` overrides: they settle the run's
  length, and with ``init_from`` a model field among them that the checkpoint fixes to another value is refused."""
  given = override_keys(list(argv))
  settle_length(config, given)
  try:
    out = run(config, workdir, given=given)
  except Interrupted as e:
    print(f"train.py: {e}", file=sys.stderr)
    return 128 + int(e.signum)
  except (ConfigError, DataError, CheckpointMismatch, CheckpointError, NonFiniteLoss, OSError, WorkdirLocked) as e:
    print(f"train.py: error: {e}", file=sys.stderr)
    return EXIT_ERROR
  if out.get("already_done"):
    state = "finished" if out.get("finished") else f"stopped at train.stop_after (step {out['steps']})"
    if out.get("updated"):
      print(f"train.py: the run in {workdir} is already {state}; summary.json gains {', '.join(out['updated'])} "
            f"(what this run added), the rest is kept as it was.", file=sys.stderr)
    else:
      print(f"train.py: the run in {workdir} is already {state}; its summary.json is kept as it was. Use a fresh "
            f"--workdir, or raise train.num_steps / train.stop_after to train further.", file=sys.stderr)
  if out.get("mode") == "train":
    ev = out["eval"]
    print("final eval: " + " ".join(f"{k}={v:.4f}" for k, v in ev.items()))
    print(f"steps={out['steps']} wall_time={out['wall_time_s']:.1f}s examples/s={out['examples_per_s']:.1f} "
          f"tokens/s={out['tokens_per_s']:.0f} params={out['num_params']} -> {workdir}/summary.json")
  else:
    print(json.dumps(out, indent=2))
  return 0
