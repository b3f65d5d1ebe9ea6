"""The same loss trajectory on 1 device and on 4 CPU devices, data parallel and FSDP.

The 4-device runs happen in a subprocess with XLA_FLAGS set before jax is imported.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxformers.train import run
from tests.train_helpers import ROOT, checkpoint_params, load_config, records

# measured with dropout on: losses and gradient norms within 3.3e-7 relative, parameters within 1.0e-7
MULTI_RTOL = 2e-6
PARAM_ATOL = 5e-7

DROPOUT = dict(model__hidden_dropout=0.1, model__attention_dropout=0.1)
SCRIPT = r"""
import json, sys
import jax
assert jax.device_count() == 4, jax.devices()
sys.path.insert(0, {root!r})
import numpy as np
from tests.train_helpers import checkpoint_params, load_config
from jaxformers.train import run
from jaxformers.train.loop import Run
out = {{}}
for name, fsdp in (("dp", 1), ("fsdp", 4)):
  c = load_config("tiny", "steps=6", mesh__fsdp=fsdp, **{dropout!r})
  wd = {tmp!r} + "/" + name
  s = run(c, wd)
  np.savez(wd + "/params.npz", **checkpoint_params(wd, 6))   # orbax restores a 4-device checkpoint only here
  r = Run(c, wd + "_probe")
  axes = set()
  for v in jax.tree.leaves(r.param_sh, is_leaf=lambda x: hasattr(x, "value")):
    for entry in v.value.spec:
      axes |= set(entry if isinstance(entry, tuple) else (entry,)) - {{None}}
  out[name] = {{"mesh": s["mesh"], "axes": sorted(axes)}}
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_one_device_vs_four_devices_dp_and_fsdp(tmp_path):
  """Six steps with dropout on: losses, gradient norms and every final parameter agree with one device."""
  one = tmp_path / "one"
  run(load_config("tiny", "steps=6", **DROPOUT), one)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-c", SCRIPT.format(root=str(ROOT), tmp=str(tmp_path), dropout=DROPOUT)],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  res = json.loads(p.stdout.split("RESULT", 1)[1])
  assert res["dp"]["mesh"] == {"data": 4, "fsdp": 1}
  assert res["fsdp"]["mesh"] == {"data": 1, "fsdp": 4}
  # DP replicates every parameter; FSDP shards some over the fsdp axis and none over data
  assert res["dp"]["axes"] == [] and res["fsdp"]["axes"] == ["fsdp"], res
  ref = {r["step"]: r for r in records(one)}
  ref_params = checkpoint_params(one, 6)
  for name in ("dp", "fsdp"):
    got = {r["step"]: r for r in records(tmp_path / name)}
    assert sorted(got) == sorted(ref) == list(range(1, 7))
    for key in ("loss", "grad_norm"):
      np.testing.assert_allclose([got[k][key] for k in sorted(ref)], [ref[k][key] for k in sorted(ref)],
                                 rtol=MULTI_RTOL, atol=0, err_msg=f"{name} {key}")
    params = dict(np.load(tmp_path / name / "params.npz"))
    assert sorted(params) == sorted(ref_params)
    for k, v in ref_params.items():
      np.testing.assert_allclose(params[k], v, rtol=0, atol=PARAM_ATOL, err_msg=f"{name} {k}")


@pytest.mark.slow
def test_two_processes_with_multihost_match_one_device(tmp_path):
  """`train.py --multihost`: two processes (2 CPU devices each) joined by jax.distributed train like one device."""
  import socket
  one = tmp_path / "one"
  run(load_config("tiny", "steps=4"), one)
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(k, None)
  multi = tmp_path / "multi"
  cmd = [sys.executable, "train.py", "--config", "configs/tiny.py:steps=4", "--workdir", str(multi), "--multihost"]
  # process 0 is told its peers by flags, process 1 by the JAX_* variables
  flags = ["--coordinator_address", f"localhost:{port}", "--num_processes=2", "--process_id=0"]
  variables = dict(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1")
  procs = [subprocess.Popen(argv, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for argv, e in ((cmd + flags, env), (cmd, dict(env, **variables)))]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  summary = json.loads((multi / "summary.json").read_text())
  assert summary["devices"] == 4 and summary["mesh"] == {"data": 4, "fsdp": 1}
  ref, got = {r["step"]: r for r in records(one)}, {r["step"]: r for r in records(multi)}
  assert sorted(got) == sorted(ref) == [1, 2, 3, 4]
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose([got[k][key] for k in sorted(ref)], [ref[k][key] for k in sorted(ref)],
                               rtol=MULTI_RTOL, atol=0, err_msg=key)
