"""Attention kernels under a 4-device mesh (fake CPU devices) in a jitted training step.

Runs in a subprocess: the device count must be set through XLA_FLAGS before jax is imported,
and other test modules import jax first in the same pytest process.
"""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_sharded_attention_on_four_cpu_devices():
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "sharded_attention_check.py")],
                       capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
  assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
  assert "dense OK" in res.stdout and "block_sparse OK" in res.stdout and "SHARDED OK" in res.stdout
