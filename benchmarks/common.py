"""Timing helpers shared by the benchmark scripts: interleaved runs, medians, markdown tables, the machine."""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
  """Run every function ``warmup`` times, then ``repeats`` rounds of one call each, in turn; median seconds."""
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}


def table(header: list[str], rows: list[list]) -> str:
  out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  return "\n".join(out)


THREAD_VARS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "XLA_FLAGS")
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def machine(threads: int | None = None) -> str:
  """One line naming the CPU model, its vector flags that matter for matmuls (present ones, and the missing
  ones after ``no``), the cores this process may use, the thread count the benchmark runs with, and the
  environment variables that change how the frameworks use threads, when set."""
  model, flags, fam_model = platform.processor() or platform.machine(), set(), []
  try:
    for line in open("/proc/cpuinfo"):
      key, _, value = line.partition(":")
      if key.strip() == "model name":
        model = value.strip()
      elif key.strip() in ("cpu family", "model"):
        fam_model.append(f"{key.strip()} {value.strip()}")
      elif key.strip() == "flags":
        flags = set(value.split())
        break
  except OSError:
    pass
  have = [f for f in FLAGS if f in flags]
  missing = [f for f in FLAGS if f not in flags]
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  if fam_model:
    model += f" ({', '.join(fam_model)})"
  return (f"CPU: {model}; flags: {' '.join(have) or 'none of ' + ' '.join(FLAGS)}"
          + (f" (no {' '.join(missing)})" if have and missing else "")
          + f"; {cores} cores; {threads or cores} threads"
          + "".join(f"; {k}={os.environ[k]}" for k in THREAD_VARS if k in os.environ))
