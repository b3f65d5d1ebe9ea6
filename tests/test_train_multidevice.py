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
from tests.train_helpers import ROOT, load_config, train_losses

SCRIPT = r"""
import json, sys
import jax
assert jax.device_count() == 4, jax.devices()
sys.path.insert(0, {root!r})
from tests.train_helpers import load_config, train_losses
from jaxformers.train import run
from jaxformers.train.loop import Run
from jaxformers.train import sharding
out = {{}}
for name, fsdp in (("dp", 1), ("fsdp", 4)):
  c = load_config("tiny", "steps=6", mesh__fsdp=fsdp, model__hidden_dropout=0.0)
  wd = {tmp!r} + "/" + name
  s = run(c, wd)
  r = Run(c, wd + "_probe")
  specs = sorted({{str(v.value.spec) for v in jax.tree.leaves(r.param_sh, is_leaf=lambda x: hasattr(x, "value"))}})
  out[name] = {{"losses": train_losses(wd), "mesh": s["mesh"], "specs": specs}}
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_one_device_vs_four_devices_dp_and_fsdp(tmp_path):
  one = tmp_path / "one"
  run(load_config("tiny", "steps=6"), one)
  ref = train_losses(one)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-c", SCRIPT.format(root=str(ROOT), tmp=str(tmp_path))], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  res = json.loads(p.stdout.split("RESULT", 1)[1])
  assert res["dp"]["mesh"] == {"data": 4, "fsdp": 1}
  assert res["fsdp"]["mesh"] == {"data": 1, "fsdp": 4}
  # DP replicates every parameter; FSDP shards some over the fsdp axis
  assert res["dp"]["specs"] == ["PartitionSpec()"] or all("fsdp" not in s for s in res["dp"]["specs"])
  assert any("fsdp" in s for s in res["fsdp"]["specs"])
  for name in ("dp", "fsdp"):
    got = {int(k): v for k, v in res[name]["losses"].items()}
    assert sorted(got) == sorted(ref)
    np.testing.assert_allclose([got[k] for k in sorted(ref)], [ref[k] for k in sorted(ref)], rtol=2e-4, atol=2e-5,
                               err_msg=name)


@pytest.mark.slow
def test_two_processes_with_multihost_match_one_device(tmp_path):
  """`train.py --multihost`: two processes (2 CPU devices each) joined by jax.distributed train like one device."""
  import socket
  one = tmp_path / "one"
  run(load_config("tiny", "steps=4"), one)
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
             JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2")
  multi = tmp_path / "multi"
  cmd = [sys.executable, "train.py", "--config", "configs/tiny.py:steps=4", "--workdir", str(multi), "--multihost"]
  procs = [subprocess.Popen(cmd, cwd=ROOT, env=dict(env, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  summary = json.loads((multi / "summary.json").read_text())
  assert summary["devices"] == 4 and summary["mesh"] == {"data": 4, "fsdp": 1}
  ref, got = train_losses(one), train_losses(multi)
  assert sorted(got) == sorted(ref)
  np.testing.assert_allclose([got[k] for k in sorted(ref)], [ref[k] for k in sorted(ref)], rtol=2e-4, atol=2e-5)
