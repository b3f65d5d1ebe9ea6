"""Re-running a command on an existing workdir: nothing the earlier run wrote is lost or replaced."""
import hashlib
import json
import subprocess
import sys

import pytest

from jaxformers.train import ConfigError, run
from jaxformers.train.checkpoint import CheckpointMismatch
from tests.train_helpers import ROOT, load_config


def hashes(d):
  return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
          if p.is_file()}


def test_rerunning_a_finished_run_keeps_its_summary(tmp_path):
  wd = tmp_path / "run"
  args = [sys.executable, "train.py", "--config=configs/tiny.py:steps=3", f"--workdir={wd}"]
  first = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert first.returncode == 0, first.stderr
  before = hashes(wd)
  summary = json.loads((wd / "summary.json").read_text())
  assert summary["finished"] and summary["eval"]["validation/accuracy"] > 0
  again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr
  assert f"the run in {wd} is already finished; its summary.json is kept as it was" in again.stderr
  ev = summary["eval"]
  assert again.stdout.splitlines()[0] == "final eval: " + " ".join(f"{k}={v:.4f}" for k, v in ev.items())
  assert hashes(wd) == before


def test_rerunning_a_run_stopped_at_stop_after_keeps_it_and_a_larger_stop_continues(tmp_path):
  wd = tmp_path / "run"
  out = run(load_config("tiny", "steps=6", train__stop_after=2), wd)
  assert out["steps"] == 2 and not out["finished"]
  before = hashes(wd)
  again = run(load_config("tiny", "steps=6", train__stop_after=2), wd)
  assert again["already_done"] and again["steps"] == 2 and hashes(wd) == before
  more = run(load_config("tiny", "steps=6", train__stop_after=4), wd)
  assert more["steps"] == 4 and more["steps_this_run"] == 2


def test_refused_rerun_writes_nothing_and_the_run_still_resumes(tmp_path, minilm_dir):
  wd = tmp_path / "run"
  run(load_config("tiny", "steps=4", train__stop_after=2), wd)
  before = hashes(wd)
  other = load_config("tiny", "steps=4", init_from=str(minilm_dir), model__layout="")
  with pytest.raises(CheckpointMismatch, match=r"model config hidden_size: checkpoint has 32, this run has 384"):
    run(other, wd)
  assert hashes(wd) == before
  out = run(load_config("tiny", "steps=4"), wd)
  assert out["steps"] == 4 and out["steps_this_run"] == 2


def test_a_failed_run_leaves_no_empty_workdir(tmp_path):
  wd = tmp_path / "new" / "run"
  with pytest.raises(ConfigError, match=r"config.model.layout: invalid layout 'serial\*2,bogus\*1': unknown block "
                                        r"'bogus' at column 9; known blocks: attention, ffn"):
    run(load_config("tiny", "layout=serial*2,bogus*1"), wd)
  assert not wd.exists()
  existing = tmp_path / "mine"
  existing.mkdir()
  with pytest.raises(ConfigError):
    run(load_config("tiny", "layout=bogus"), existing)
  assert existing.is_dir()          # a directory the user made is never removed


def test_a_second_process_training_in_the_same_workdir_is_refused_in_one_line(tmp_path):
  """Two train.py processes on one fresh workdir used to end in an orbax error and duplicated metrics lines."""
  import os
  import socket
  from jaxformers.checkpoints.workdir import Lock
  wd, lock = tmp_path / "run", tmp_path / ".run.lock"
  with Lock(wd):                    # this process trains there (as far as the lock goes)
    holder = json.loads(lock.read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    p = subprocess.run([sys.executable, "train.py", "--config=configs/tiny.py:steps=1", f"--workdir={wd}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    assert [x for x in p.stderr.splitlines() if x.startswith("train.py")] == [   # (jax's backend notes aside)
        f"train.py: error: {wd} is in use by another training process (pid {os.getpid()} on host "
        f"{socket.gethostname()}, since {holder['started']}, {lock}): nothing was written; wait for it to end or use "
        f"another --workdir"]
    assert not wd.exists()
  assert lock.read_text() == ""          # released
  out = run(load_config("tiny", "steps=1"), wd)
  assert out["steps"] == 1 and lock.read_text() == "" and "lock" not in " ".join(x.name for x in wd.iterdir())


def test_the_stale_lock_of_a_killed_process_is_taken_over_in_one_line(tmp_path, caplog):
  import os
  import signal
  wd, lock = tmp_path / "run", tmp_path / ".run.lock"
  code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from jaxformers.checkpoints.workdir import Lock; "
          "Lock(sys.argv[2]).acquire(); print('locked', flush=True); time.sleep(300)")
  p = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(wd)], stdout=subprocess.PIPE, text=True)
  assert p.stdout.readline().strip() == "locked"
  holder = json.loads(lock.read_text())
  os.kill(p.pid, signal.SIGKILL)     # ends without releasing: the file still names it
  p.wait()
  assert json.loads(lock.read_text()) == holder
  with caplog.at_level("WARNING", logger="jaxformers.train"):
    out = run(load_config("tiny", "steps=1"), wd)
  assert out["steps"] == 1
  said = [r.getMessage() for r in caplog.records if "took over the lock" in r.getMessage()]
  assert said == [f"{wd}: took over the lock of pid {p.pid} on host {holder['host']} (since {holder['started']}), "
                  f"which ended without releasing it"]
  assert lock.read_text() == ""
