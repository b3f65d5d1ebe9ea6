"""Resume equivalence: interrupted-and-resumed runs equal an uninterrupted run bit for bit on CPU."""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxformers.train import run
from jaxformers.train.checkpoint import CheckpointMismatch
from tests.train_helpers import ROOT, load_config, train_losses


def _final_params(workdir, step):
  m = ocp.CheckpointManager(workdir / "checkpoints", options=ocp.CheckpointManagerOptions(read_only=True))
  state = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  m.close()
  import jax
  return jax.tree_util.tree_flatten_with_path(state)[0]


def assert_same_runs(full, part, steps):
  lf, lp = train_losses(full), train_losses(part)
  assert sorted(lf) == list(range(1, steps + 1)) and sorted(lp) == list(range(1, steps + 1))
  assert [lf[k] for k in sorted(lf)] == [lp[k] for k in sorted(lp)]
  pf, pp = _final_params(full, steps), _final_params(part, steps)
  assert len(pf) == len(pp) and len(pf) > 10
  for (kf, a), (kp, b) in zip(pf, pp):
    assert kf == kp
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(kf))


@pytest.mark.parametrize("async_checkpoint", [False, True])
def test_resume_is_bit_identical(tmp_path, async_checkpoint):
  # dropout on, so the dropout streams must resume exactly too; accumulation exercises the scan path; the
  # trainer's default is asynchronous checkpointing
  kw = dict(model__hidden_dropout=0.1, model__attention_dropout=0.1, optim__accum_steps=2,
            optim__schedule="linear", optim__warmup_steps=3, train__async_checkpoint=async_checkpoint)
  full, part = tmp_path / "full", tmp_path / "part"
  run(load_config("tiny", "steps=10", **kw), full)
  out = run(load_config("tiny", "steps=10", train__stop_after=4, **kw), part)
  assert out["steps"] == 4 and not out["finished"]
  out = run(load_config("tiny", "steps=10", **kw), part)     # resumes from step 4
  assert out["steps"] == 10 and out["steps_this_run"] == 6
  assert_same_runs(full, part, 10)


def test_a_run_saved_before_a_field_existed_resumes_bit_identically(tmp_path):
  """The metadata of the saved step lacks model config fields (as a run saved before they existed would) and the
  resumed run names another attention implementation (a runtime field; on CPU "auto" runs "xla"): it resumes, and
  ends exactly where a run never stopped does. A change of the parameters' shapes or of the layout is refused."""
  full, part = tmp_path / "full", tmp_path / "part"
  run(load_config("tiny", "steps=8"), full)
  run(load_config("tiny", "steps=8", train__stop_after=3), part)
  path = part / "checkpoints" / "3" / "meta" / "metadata"
  meta = json.loads(path.read_text())
  for k in ("family", "use_pooler", "quantization", "quant_aware", "dropout_impl", "num_heads_per_layer"):
    del meta["model_config"][k]
  del meta["model_task"]
  path.write_text(json.dumps(meta))
  with pytest.raises(CheckpointMismatch) as e:
    run(load_config("tiny", "steps=8", model__hidden_size=64), part)
  assert "model config hidden_size: checkpoint has 32, this run has 64" in str(e.value)
  assert "\n" not in str(e.value)
  with pytest.raises(CheckpointMismatch, match=r"model config layout: checkpoint has 'serial\*2', this run has "
                                               r"'parallel\*2'"):
    run(load_config("tiny", "layout=parallel*2,steps=8"), part)
  out = run(load_config("tiny", "steps=8", model__attention_impl="xla"), part)
  assert out["steps"] == 8 and out["steps_this_run"] == 5
  assert_same_runs(full, part, 8)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resumes_bit_identically(tmp_path):
  """train.py with the default asynchronous checkpoints and dropout on, stopped by SIGTERM after a few steps,
  then resumed for 20 more: the same losses and parameters as a run never stopped. (tiny has a constant learning
  rate, so the schedule does not depend on the number of steps and the long run may stop anywhere.)"""
  wd = tmp_path / "run"
  kw = dict(model__hidden_dropout=0.1, train__async_checkpoint=True)
  cmd = [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs' / 'tiny.py'}:steps=1000000",
         "--config.model.hidden_dropout=0.1", "--config.train.async_checkpoint=True", f"--workdir={wd}"]
  p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 240
  while time.time() < deadline and p.poll() is None:
    path = wd / "metrics.jsonl"
    if path.exists() and len(path.read_text().splitlines()) >= 3:
      break
    time.sleep(0.01)
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=120)
  assert p.returncode == 128 + signal.SIGTERM, out
  assert "stopped by SIGTERM" in out
  steps = sorted(int(d.name) for d in (wd / "checkpoints").iterdir() if d.name.isdigit())
  assert steps and steps[-1] >= 3
  stopped = steps[-1]
  assert stopped == max(train_losses(wd))
  total = stopped + 20
  out = run(load_config("tiny", f"steps={total}", **kw), wd)     # the same workdir again resumes
  assert out["steps"] == total and out["steps_this_run"] == 20
  run(load_config("tiny", f"steps={total}", **kw), tmp_path / "full")
  assert_same_runs(tmp_path / "full", wd, total)
