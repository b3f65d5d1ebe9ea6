"""Attention throughput: Pallas flash vs cuDNN vs the XLA reference, forward and forward+backward.

Usage (GPU or TPU)::

  python benchmarks/attention.py                       # lengths 512..8192, head dims 64 and 128, bf16
  python benchmarks/attention.py --lengths 1024 4096 --head-dims 128 --reps 20

For each (length, head_dim) it builds bf16 q/k/v of shape ``[batch, length, heads, head_dim]``
with ``batch * length = --tokens`` and ``heads * head_dim = --width``, compiles every
implementation, then runs them interleaved (impl A, B, C, A, B, C, ...) and reports the median
time as TFLOP/s. FLOPs counted: forward ``4 * B * N * L^2 * D`` (two matmuls), forward+backward
3.5x that (the backward does five L^2 matmuls). Memory: the compiled program's temporary bytes
(``memory_analysis()``) per implementation and the device's ``memory_stats()['peak_bytes_in_use']``
after each configuration (a running peak). Prints a markdown table headed by the device name.
On CPU it times nothing (interpret-mode Pallas timings would be meaningless) and exits 0.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import jax
import jax.numpy as jnp
from benchmarks.common import machine

from jaxformers.kernels.attention import attention


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
  p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
  p.add_argument("--impls", nargs="+", default=["pallas", "cudnn", "xla"], choices=["pallas", "cudnn", "xla"])
  p.add_argument("--tokens", type=int, default=16384, help="batch * length per step")
  p.add_argument("--width", type=int, default=1024, help="heads * head_dim")
  p.add_argument("--reps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--allow-cpu", action="store_true", help="time on CPU anyway (smoke test of this script only)")
  return p.parse_args(argv)


def _fns(impl):
  def fwd(q, k, v):
    return attention(q, k, v, impl=impl)

  def fwd_bwd(q, k, v, do):
    out, vjp = jax.vjp(fwd, q, k, v)
    return out, vjp(do)

  return jax.jit(fwd), jax.jit(fwd_bwd)


def _time(fn, args):
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


def _temp_mib(fn, args):
  try:
    ma = fn.lower(*args).compile().memory_analysis()
    return f"{ma.temp_size_in_bytes / 2**20:.0f}"
  except Exception:  # memory analysis is not available on every backend
    return "?"


def main(argv=None) -> int:
  args = _parse(argv)
  platform = jax.default_backend()
  device = jax.devices()[0]
  if platform not in ("gpu", "tpu") and not args.allow_cpu:
    print(f"attention benchmark: backend is {platform} ({device.device_kind}); no accelerator, so it times "
          "nothing (Pallas would run in interpret mode). Run it on a GPU or TPU.")
    return 0

  rows = []
  for D in args.head_dims:
    for L in args.lengths:
      B, N = max(1, args.tokens // L), max(1, args.width // D)
      keys = jax.random.split(jax.random.key(0), 4)
      q, k, v, do = (jax.random.normal(kk, (B, L, N, D), jnp.bfloat16) for kk in keys)
      flops_fwd = 4.0 * B * N * L * L * D
      runs = {}
      for impl in args.impls:
        fwd, fwd_bwd = _fns(impl)
        try:
          for _ in range(args.warmup):
            _time(fwd, (q, k, v)), _time(fwd_bwd, (q, k, v, do))
          runs[impl] = {"fwd": fwd, "fwd_bwd": fwd_bwd, "t_fwd": [], "t_fb": [],
                        "mem": f"{_temp_mib(fwd, (q, k, v))}/{_temp_mib(fwd_bwd, (q, k, v, do))}"}
        except Exception as e:  # e.g. cuDNN unavailable, out of memory
          rows.append((D, L, B, N, impl, "n/a", "n/a", f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"))
      for _ in range(args.reps):  # interleave implementations so drift hits them alike
        for r in runs.values():
          r["t_fwd"].append(_time(r["fwd"], (q, k, v)))
        for r in runs.values():
          r["t_fb"].append(_time(r["fwd_bwd"], (q, k, v, do)))
      peak = (device.memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30
      for impl, r in runs.items():
        tf = flops_fwd / statistics.median(r["t_fwd"]) / 1e12
        tfb = 3.5 * flops_fwd / statistics.median(r["t_fb"]) / 1e12
        rows.append((D, L, B, N, impl, f"{tf:.1f}", f"{tfb:.1f}", f"temp MiB fwd/fwd+bwd {r['mem']}; peak {peak:.1f} GiB"))
      del q, k, v, do

  print(f"## Attention benchmark on {device.device_kind} ({platform}), bf16, medians of {args.reps}\n")
  print(machine() + "\n")
  print("| head_dim | length | batch | heads | impl | fwd TFLOP/s | fwd+bwd TFLOP/s | memory |")
  print("|---|---|---|---|---|---|---|---|")
  for row in rows:
    print("| " + " | ".join(str(x) for x in row) + " |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
