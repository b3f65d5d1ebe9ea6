"""Fault injection against ``train.py``: kill -9, SIGTERM, a full disk and damaged checkpoints, in a seeded random
order on one run. After each, re-running the same command ends exactly where an uninterrupted run ends (metrics,
losses and parameters bit for bit) and no file that existed before is lost or changed.

The same seeded loop runs ``jaxformers prune --distill --rounds 2`` and one cell of the layout study
(``benchmarks/study.py``, healed recipe) through kill -9, a full disk and a truncated checkpoint.

``JAXFORMERS_FAULT_SEED=N`` picks another order, fault steps and damaged files. Run as a script
(``python tests/test_faults.py FAULT STEP train.py-flags...``) it is the fault driver: ``train.py`` with FAULT
injected right after step STEP is logged (``kill``: SIGKILL itself; ``term``: SIGTERM itself; ``full``: from then
on every file write past 32 KiB fails, as on a full disk). ``python tests/test_faults.py FAULT N prune|study
flags...`` runs ``jaxformers prune`` or the study instead, FAULT striking after the N-th train log line of the
process (``damage``: truncate a checkpoint, see :func:`_damage_now`, then SIGKILL)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 12, 2
FLAGS = [f"--config={ROOT / 'configs' / 'tiny.py'}:steps={STEPS}", f"--config.train.checkpoint_every={EVERY}"]
SEED = int(os.environ.get("JAXFORMERS_FAULT_SEED", "0"))
# files of a step directory that a restore reads: damaging any of them makes that step unreadable
VITAL = ("state/manifest.ocdbt", "state/_METADATA", "meta/metadata", "state/d/*")


def _drive(fault: str, at: int, flags: list[str]) -> None:
  import resource
  import runpy
  from jaxformers.train import metrics
  write = metrics.Writer.write
  program = flags[0] if flags and flags[0] in ("prune", "study") else "train.py"
  lines = [0]

  def faulty(self, step, kind, values):
    write(self, step, kind, values)
    if kind != "train":
      return
    lines[0] += 1
    if (step if program == "train.py" else lines[0]) < at:
      return
    if fault == "damage" and _damage_now(self.path.parent, program):
      os.kill(os.getpid(), signal.SIGKILL)
    if (step if program == "train.py" else lines[0]) != at:
      return
    if fault == "kill":
      os.kill(os.getpid(), signal.SIGKILL)
    elif fault == "term":
      os.kill(os.getpid(), signal.SIGTERM)
    elif fault == "full":
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit then fails with EFBIG
      resource.setrlimit(resource.RLIMIT_FSIZE, (32768, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
  metrics.Writer.write = faulty
  if program == "prune":
    from jaxformers.cli import main
    sys.exit(main(flags))
  if program == "study":
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import study
    study.main(flags[1:])
    return
  sys.argv = [str(ROOT / "train.py")] + flags
  runpy.run_path(str(ROOT / "train.py"), run_name="__main__")


def _damage_now(run_dir: Path, program: str) -> bool:
  """``damage`` in a prune or study process, once there is something to damage: truncate the newest checkpoint of
  the run being trained when it has an older one to fall back to (prune's rounds), or (study) the final checkpoint of
  the cell's finished healing run while its fine-tuning runs. The damaged step directory is written to the file
  ``$JAXFORMERS_FAULT_NOTE``."""
  if program == "study":
    if run_dir.name != "finetune":
      return False
    run_dir = run_dir.parent / "heal"
  steps = complete_steps(run_dir)
  if len(steps) < (1 if program == "study" else 2):
    return False
  victim = run_dir / "checkpoints" / str(steps[-1]) / "state" / "manifest.ocdbt"
  victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
  Path(os.environ["JAXFORMERS_FAULT_NOTE"]).write_text(str(victim.parents[1]))
  return True


def _env() -> dict:
  import jax
  import tests.train_helpers  # noqa: F401  (sets the compilation cache the subprocesses share)
  return dict(os.environ, PYTHONPATH=str(ROOT), JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")


def _train(wd: Path, fault: str | None = None, at: int = 0) -> subprocess.CompletedProcess:
  cmd = [sys.executable, str(ROOT / "train.py")] if fault is None else \
      [sys.executable, str(Path(__file__)), fault, str(at)]
  return subprocess.run(cmd + FLAGS + [f"--workdir={wd}"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                        timeout=300)


def hashes(root: Path) -> dict[str, str]:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(Path(root).rglob("*")) if p.is_file()}


def results(wd: Path) -> dict[str, str]:
  """The files a later run must keep as they are: everything but the rotating step directories (deleted by
  ``train.keep`` as the run advances), orbax's temporary directories and the append-only metrics.jsonl (of the run
  and of the runs nested in it: prune's rounds, the study's cells), and the workdir locks (``.NAME.lock``: a killed
  run leaves its lock, which the next run takes over)."""
  def rotating(rel: str) -> bool:
    parts = rel.split("/")
    return parts[-1] == "metrics.jsonl" or (parts[-1].startswith(".") and parts[-1].endswith(".lock")) or any(
        a in ("checkpoints", "best") and (b.isdigit() or ".orbax-checkpoint-tmp" in b) for a, b in zip(parts, parts[1:]))
  return {k: v for k, v in hashes(wd).items() if not rotating(k)}


def metric_logs(wd: Path) -> dict[Path, str]:
  return {p: p.read_text() for p in sorted(wd.rglob("metrics.jsonl"))}


def complete_steps(wd: Path) -> list[int]:
  d = wd / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def final_state(wd: Path, step: int):
  import jax
  m = ocp.CheckpointManager(wd / "checkpoints", options=ocp.CheckpointManagerOptions(read_only=True))
  state = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  m.close()
  return [(jax.tree_util.keystr(k), np.asarray(v)) for k, v in jax.tree_util.tree_flatten_with_path(state)[0]]


def damage(step_dir: Path, rng: random.Random) -> str:
  pattern = rng.choice(VITAL)
  victim = sorted(step_dir.glob(pattern))[0]
  if rng.random() < 0.5:
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    return f"truncated {victim.relative_to(step_dir.parent)}"
  victim.unlink()
  return f"deleted {victim.relative_to(step_dir.parent)}"


def assert_same_run(wd: Path, ref: Path):
  from tests.train_helpers import train_losses
  got, want = json.loads((wd / "summary.json").read_text()), json.loads((ref / "summary.json").read_text())
  assert got["steps"] == want["steps"] == STEPS and got["finished"]
  assert got["eval"] == want["eval"] and len(want["eval"]) == 2
  lw, lr = train_losses(wd), train_losses(ref)
  assert sorted(lw) == list(range(1, STEPS + 1)) and lw == lr
  a, b = final_state(wd, STEPS), final_state(ref, STEPS)
  assert [k for k, _ in a] == [k for k, _ in b] and len(a) > 10
  for (k, x), (_, y) in zip(a, b):
    np.testing.assert_array_equal(x, y, err_msg=k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run, and one stopped after step 6 (checkpoints 4 and 6)."""
  from jaxformers.train import run
  from tests.train_helpers import load_config
  base = tmp_path_factory.mktemp("faults")
  run(load_config("tiny", f"steps={STEPS}", train__checkpoint_every=EVERY), base / "full")
  run(load_config("tiny", f"steps={STEPS}", train__checkpoint_every=EVERY, train__stop_after=6), base / "stopped")
  return base


def test_random_faults_never_lose_a_run(tmp_path, reference):
  rng = random.Random(SEED)
  faults = ["kill", "term", "full", "damage"]
  rng.shuffle(faults)
  if faults[0] == "damage":            # damage needs a checkpoint and an older one to fall back to
    faults[:2] = faults[1::-1]
  # steps at which kill / term / full strike; before STEPS - 1, so that SIGTERM never lands on the last step
  at = iter(sorted(rng.sample(range(5, STEPS - 1), 3)))
  wd = tmp_path / "run"
  wd.mkdir()
  (wd / "notes.txt").write_text("a file of the user's in the workdir\n")
  damaged = None                       # (step, hashes of its directory after the damage)
  log = []
  for fault in faults + ["none"]:
    if fault == "damage":
      step = complete_steps(wd)[-1]
      log.append(damage(wd / "checkpoints" / str(step), rng))
      damaged = (step, hashes(wd / "checkpoints" / str(step)))
      continue
    kept, metrics_before = results(wd), (wd / "metrics.jsonl").read_text() if (wd / "metrics.jsonl").exists() else ""
    step = next(at) if fault != "none" else 0
    log.append(f"{fault} at step {step}")
    p = _train(wd, None if fault == "none" else fault, step)
    where = f"seed {SEED}: {'; '.join(log)}\n{p.stderr[-3000:]}"
    err = [l for l in p.stderr.splitlines() if l.startswith("train.py:")]
    if fault == "kill":
      assert p.returncode == -signal.SIGKILL, where
    elif fault == "term":   # the step being computed when the signal came is finished and saved
      assert p.returncode == 128 + signal.SIGTERM and len(err) == 1, where
      assert re.fullmatch(rf"train.py: stopped by SIGTERM at step ({step}|{step + 1}); checkpoint saved, run the same "
                          r"command to resume", err[0]), where
      assert complete_steps(wd)[-1] == int(err[0].split("at step ")[1].split(";")[0]), where
    elif fault == "full":
      assert p.returncode == 1 and len(err) == 1 and err[0].startswith("train.py: error: saving checkpoint step"), where
      assert "File too large" in err[0] and "free disk space) and run the same command to resume" in err[0], where
    else:
      assert p.returncode == 0, where
    assert "Traceback" not in p.stderr, where
    assert results(wd).items() >= kept.items(), where                       # nothing lost or changed
    assert (wd / "metrics.jsonl").read_text().startswith(metrics_before), where
    if damaged is not None and fault != "damage":
      step, before = damaged
      assert hashes(wd / "checkpoints" / f"{step}.unreadable") == before, where   # set aside, intact
      assert f"checkpoints/{step} does not restore (" in p.stderr and \
          f"kept as {step}.unreadable, resuming from step" in p.stderr, where
      damaged = None
  assert_same_run(wd, reference / "full")


# --- prune with distillation rounds, and a study cell -------------------------------------------------------------
PRUNE_CONFIG = """from configs.tiny import get_config as tiny


def get_config(arg=None):
  c = tiny(arg)
  c.unlock()
  c.train.checkpoint_every = 1
  return c
"""


def _prune_args(base: Path, root: Path) -> list[str]:
  """Two rounds of 4 distillation steps (a checkpoint every step, the last two kept): train log lines 1-4, 5-8."""
  return ["prune", str(base / "source"), str(root / "out"), "--heads", "0.5", "--ffn", "0.25", "--distill",
          "--rounds", "2", "--examples", "8", "--config", f"{base / 'prune_config.py'}:steps=4",
          "--workdir", str(root / "rounds")]


def _study_args(base: Path, root: Path) -> list[str]:
  """One healed cell: 2 healing steps, then 2 fine-tuning steps (one train log line each, at their last step)."""
  return ["study", "--init_from", str(base / "source"), "--layouts", "parallel*2", "--recipes", "healed",
          "--data", "embedded", "--workdir", str(root), "--heal_steps", "2", "--finetune_steps", "2",
          "--max_length", "32", "--batch_size", "8", "--max_train_examples", "16", "--infer_batch", "2",
          "--repeats", "1"]


def _run_tool(args: list[str], fault: str | None, at: int, note: Path) -> subprocess.CompletedProcess:
  cmd = [sys.executable, str(Path(__file__)), fault or "none", str(at)] + args
  return subprocess.run(cmd, cwd=ROOT, env=dict(_env(), JAXFORMERS_FAULT_NOTE=str(note)), capture_output=True,
                        text=True, timeout=300)


@pytest.fixture(scope="module")
def tool_reference(tmp_path_factory):
  """The source classifier (a few steps of the tiny config), and uninterrupted prune and study runs from it."""
  from jaxformers.cli import main
  from jaxformers.train import run
  from tests.train_helpers import load_config
  base = tmp_path_factory.mktemp("tools")
  run(load_config("tiny", "steps=4"), base / "source")
  (base / "prune_config.py").write_text(PRUNE_CONFIG)
  assert main(_prune_args(base, base / "prune")[0:]) == 0
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import study
  study.main(_study_args(base, base / "study")[1:])
  return base


def _final(tool: str, root: Path) -> dict:
  """What a finished run of ``tool`` produced, timings left out: the output model's parameters and every trained
  run's losses, evaluation and final parameters."""
  import jaxformers
  from jaxformers.params import get_params
  from tests.train_helpers import train_losses
  out = {}
  runs = sorted(root.glob("rounds/round*/run")) if tool == "prune" else \
      [d for d in sorted(root.glob("cells/*/*")) if d.name in ("heal", "finetune")]
  assert len(runs) == 2, runs
  for r in runs:
    summary = json.loads((r / "summary.json").read_text())
    out[str(r.relative_to(root))] = (train_losses(r), summary["eval"], summary["steps"],
                                     {k: v.tobytes() for k, v in get_params(jaxformers.from_pretrained(r)).items()})
  if tool == "prune":
    out["out"] = {k: v.tobytes() for k, v in get_params(jaxformers.from_pretrained(root / "out")).items()}
  else:
    cells = json.loads((root / "study.json").read_text())["cells"]
    out["cells"] = {k: (c["metric"], c["eval"], c["num_params"], c["flops_per_token"]) for k, c in cells.items()}
  return out


@pytest.mark.parametrize("tool", ["prune", "study"])
def test_random_faults_never_lose_a_prune_or_a_study_cell(tmp_path, tool_reference, tool):
  """kill -9, a full disk and a truncated checkpoint in a seeded order, each striking after a seeded number of
  train log lines of the process; after each, the same command is run again. Nothing written before a fault changes
  (a damaged checkpoint is set aside, intact) and the last run ends where an uninterrupted one ends."""
  rng = random.Random(SEED)
  faults = ["kill", "full", "damage"]
  rng.shuffle(faults)
  root = tmp_path / tool
  root.mkdir()
  (root / "notes.txt").write_text("a file of the user's in the workdir\n")
  args = (_prune_args if tool == "prune" else _study_args)(tool_reference, root)
  note = tmp_path / "damaged"
  damaged, log = None, []
  for fault in faults + ["none"]:
    kept, logs = results(root), metric_logs(root)
    at = rng.randint(1, 3) if tool == "prune" else rng.randint(1, 2)
    log.append(f"{fault} after train line {at}")
    p = _run_tool(args, None if fault == "none" else fault, at, note)
    where = f"{tool}, seed {SEED}: {'; '.join(log)}\n{p.stderr[-3000:]}"
    if fault in ("kill", "damage") and p.returncode == -signal.SIGKILL:
      pass
    elif fault == "full" and p.returncode != 0:
      assert "File too large" in p.stderr, where
    else:
      assert p.returncode == 0 and fault == "none", where      # every fault strikes before the work is done
    if damaged is not None:
      step_dir, before = damaged
      aside = step_dir.with_name(step_dir.name + ".unreadable")     # the trainer fell back to an older checkpoint
      if tool == "study":        # nothing older in a cell's run: the study keeps the whole run aside and reruns it
        run_dir = step_dir.parents[1]
        old, new = f"{run_dir.relative_to(root)}/", f"{run_dir.relative_to(root)}.unreadable/"
        aside = root / new / step_dir.relative_to(run_dir)
        kept = {(new + k[len(old):] if k.startswith(old) else k): v for k, v in kept.items()}
        logs = {(root / new / p.relative_to(run_dir) if p.is_relative_to(run_dir) else p): t for p, t in logs.items()}
      assert hashes(aside) == before, where                                     # set aside, intact
      damaged = None
    assert results(root).items() >= kept.items(), where                      # nothing lost or changed
    for path, text in logs.items():
      assert path.read_text().startswith(text), where
    if fault == "damage":
      step_dir = Path(note.read_text())
      damaged = (step_dir, hashes(step_dir))
  assert damaged is None
  assert _final(tool, root) == _final(tool, tool_reference / tool)


@pytest.mark.parametrize("victim,how", [("state/manifest.ocdbt", "truncate"), ("state/_METADATA", "delete")])
def test_damaged_newest_checkpoint_resumes_from_the_one_before(tmp_path, reference, caplog, capfd, victim, how):
  from jaxformers.train import run
  from tests.train_helpers import load_config
  wd = tmp_path / "run"
  shutil.copytree(reference / "stopped", wd)
  path = wd / "checkpoints" / "6" / victim
  if how == "truncate":
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  else:
    path.unlink()
  before = hashes(wd / "checkpoints" / "6")
  with caplog.at_level(logging.WARNING, logger="jaxformers.train"):
    out = run(load_config("tiny", f"steps={STEPS}", train__checkpoint_every=EVERY), wd)
  assert out["steps_this_run"] == STEPS - 4
  msgs = [r.getMessage() for r in caplog.records if r.name == "jaxformers.train"]
  assert len(msgs) == 1 and msgs[0].startswith(f"{wd / 'checkpoints'}/6 does not restore (") and \
      msgs[0].endswith("); kept as 6.unreadable, resuming from step 4"), msgs
  assert "Traceback" not in capfd.readouterr().err
  assert hashes(wd / "checkpoints" / "6.unreadable") == before
  assert_same_run(wd, reference / "full")


def test_damaged_last_checkpoint_of_a_finished_run(tmp_path, reference):
  """best/12 was saved before checkpoints/12 was damaged: the re-run from step 10 evaluates step 12 again and
  must keep (not re-save) the best checkpoint it already has."""
  from jaxformers.train import run
  from tests.train_helpers import load_config
  wd = tmp_path / "run"
  shutil.copytree(reference / "full", wd)
  (wd / "checkpoints" / str(STEPS) / "state" / "manifest.ocdbt").unlink()
  best = hashes(wd / "best")
  out = run(load_config("tiny", f"steps={STEPS}", train__checkpoint_every=EVERY), wd)
  assert out["steps_this_run"] == 2 and hashes(wd / "best") == best
  assert_same_run(wd, reference / "full")


def test_no_restorable_checkpoint_is_one_error_and_moves_nothing(tmp_path, reference):
  from jaxformers.errors import CheckpointError
  from jaxformers.train import run
  from tests.train_helpers import load_config
  wd = tmp_path / "run"
  shutil.copytree(reference / "stopped", wd)
  for step in (4, 6):
    (wd / "checkpoints" / str(step) / "state" / "_METADATA").unlink()
  before = hashes(wd)
  with pytest.raises(CheckpointError, match=r"no checkpoint in \S+/checkpoints restores: step 6: .*; step 4: .* "
                                            r"\(nothing was moved or deleted\)"):
    run(load_config("tiny", f"steps={STEPS}", train__checkpoint_every=EVERY), wd)
  assert hashes(wd) == before


def test_damaged_newest_checkpoint_still_refuses_another_configuration(tmp_path, reference):
  from jaxformers.train import run
  from jaxformers.train.checkpoint import CheckpointMismatch
  from tests.train_helpers import load_config
  wd = tmp_path / "run"
  shutil.copytree(reference / "stopped", wd)
  (wd / "checkpoints" / "6" / "meta" / "metadata").unlink()
  before = hashes(wd)
  with pytest.raises(CheckpointMismatch, match="model config intermediate_size: checkpoint has 64, this run has 96"):
    run(load_config("tiny", f"steps={STEPS}", train__checkpoint_every=EVERY, model__intermediate_size=96), wd)
  assert hashes(wd) == before


def test_eval_falls_back_past_a_damaged_best_checkpoint(tmp_path, reference, caplog):
  from jaxformers.train import run
  from tests.train_helpers import load_config
  c = load_config("tiny", f"steps={STEPS}", train__checkpoint_every=EVERY, mode="eval")
  intact, wd = tmp_path / "intact", tmp_path / "run"
  shutil.copytree(reference / "full", intact)
  shutil.copytree(reference / "full", wd)
  (wd / "best" / str(STEPS) / "state" / "manifest.ocdbt").unlink()
  before = hashes(wd)
  want = run(c, intact)
  with caplog.at_level(logging.WARNING, logger="jaxformers.train"):
    got = run(c, wd)
  assert got["step"] == want["step"] == STEPS and got["eval"] == want["eval"]
  assert any(f"no checkpoint in {wd / 'best'} restores: step {STEPS}:" in r.getMessage() for r in caplog.records)
  after = hashes(wd)
  assert {k: v for k, v in after.items() if k != "eval.json"} == {k: v for k, v in before.items() if k != "eval.json"}


if __name__ == "__main__":
  _drive(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
