"""Ahead-of-time compilation of a ``train.py`` config for chips this host does not have.

For each target chip (:data:`jaxformers.targets.CHIPS`) the model of a config is traced under
:func:`~jaxformers.targets.use_target` and compiled by that chip's own compiler: the forward (eval mode) and a
train step (the task's loss, its gradient and an AdamW update), sharded over a data-parallel mesh of the chip's
topology. TPU chips need ``libtpu`` (``pip install "jax[tpu]"``, the ``aot-tpu`` extra); NVIDIA chips need the
``jax-cuda12-plugin`` wheels and ``ptxas`` / ``libdevice`` from ``nvidia-cuda-nvcc-cu12`` (the ``aot-gpu`` extra),
run with ``JAX_PLATFORMS=cpu``. Without them, ``lower_only=True`` still traces and lowers with plain jax and counts
the kernels. Per target it reports: compiled or the compiler's one-line reason, the number of Pallas kernel calls,
HBM per chip (arguments + outputs + temporaries) against the chip's, FLOPs and bytes per step, and a roofline step
time (``max(FLOPs / peak, bytes / bandwidth)`` per chip) with the tokens/s and the MFU ceiling it implies.
"""
from __future__ import annotations

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxformers import models
from jaxformers.encode import Pooler
from jaxformers.packing import _run_chunk
from jaxformers.targets import CHIPS, Chip, Target, use_target
from jaxformers.train import sharding

KERNEL_CALLS = ("tpu_custom_call", "@__gpu$xla.gpu.triton", "mosaic_gpu")


@dataclasses.dataclass
class Report:
  """One program compiled for one chip."""
  chip: str
  program: str
  ok: bool
  reason: str = ""
  kernels: int = 0
  hbm_bytes: int | None = None       # per chip: arguments + outputs + temporaries
  flops: float | None = None         # per chip
  bytes_accessed: float | None = None
  tokens: int = 0                    # tokens per step over all chips
  num_chips: int = 1
  cost_from_host: bool = False       # FLOPs and bytes from host_cost (the chip's compiler reports none)

  def roofline_s(self, chip: Chip) -> float | None:
    if self.flops is None or self.bytes_accessed is None:
      return None
    return max(self.flops / chip.peak_flops, self.bytes_accessed / chip.hbm_bandwidth)


def count_kernels(text: str) -> int:
  return sum(text.count(c) for c in KERNEL_CALLS)


def one_line(e: BaseException) -> str:
  """The compiler's reason in one line (the first line that says something)."""
  msg = str(e)
  for pattern in (r"Ran out of memory in memory space (\w+)[^\n]*", r"Shared memory size limit exceeded[^\n]*",
                  r"RESOURCE_EXHAUSTED:[^\n]*", r"INTERNAL:[^\n]*"):
    m = re.search(pattern, msg)
    if m:
      return m.group(0)[:300]
  return next((line.strip() for line in msg.splitlines() if line.strip()), type(e).__name__)[:300]


def gpu_target_config(chip: Chip) -> str:
  """An XLA ``GpuTargetConfigProto`` (text) describing ``chip`` from :data:`CHIPS`'s facts."""
  major, minor = chip.compute_capability
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {chip.smem_per_sm}
  threads_per_core_limit: {chip.threads_per_sm}
  core_count: {chip.sm_count}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(chip.hbm_bandwidth)}
  l2_cache_size: {chip.l2_bytes}
  clock_rate_ghz: {chip.clock_ghz}
  device_memory_size: {chip.hbm_bytes}
  shared_memory_per_block_optin: {chip.onchip_bytes}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 patch: 0 }}
device_description_str: "{chip.label}"
"""


def chip_devices(chip: Chip, topology: str | None = None) -> list:
  """Compile-only devices of ``chip`` (its default topology unless ``topology`` names another)."""
  if chip.platform == "tpu":
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    return list(topologies.get_topology_desc(topology or chip.topology, "tpu").devices)
  return list(topologies.get_topology_desc(platform="cuda", topology=topology or "1x1x1",
                                           target_config=gpu_target_config(chip)).devices)


def _loss(model_task: str):
  def loss(model, batch):
    if model_task == "masked_lm":
      logits = model(batch["input_ids"], batch["attention_mask"])
      per = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["labels"])
      return jnp.sum(per * batch["weights"]) / jnp.maximum(jnp.sum(batch["weights"]), 1.0)
    logits = model(batch["input_ids"], batch["attention_mask"]).astype(jnp.float32)
    if model_task == "regression":
      return jnp.mean(jnp.square(logits[..., 0] - batch["labels"]))
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]))
  return loss


def programs(cfg, model_task: str, num_labels: int | None, batch: int, length: int, mesh: Mesh, lr: float = 1e-4,
             encode: bool = False):
  """``{name: (jitted function, abstract arguments)}`` for the forward and the train step on ``mesh`` (and with
  ``encode``, :func:`encode_program` with ``batch`` rows on the mesh's first device).

  The functions are made anew on every call, so each is traced for the target current when it is lowered."""
  abstract = nnx.eval_shape(lambda: models.build(model_task, cfg, num_labels=num_labels,
                                                 rngs=nnx.Rngs(params=0, dropout=1)))
  abstract.train()
  gd_train, abs_params, abs_rest = nnx.split(abstract, nnx.Param, ...)
  abstract.eval()
  gd_eval = nnx.split(abstract, nnx.Param, ...)[0]
  param_sh = sharding.param_shardings(abs_params, mesh)
  rep = NamedSharding(mesh, P())
  with_sh = lambda tree, sh: jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sh)
  params = with_sh(abs_params, param_sh)
  rest = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), abs_rest)
  rows = NamedSharding(mesh, P(sharding.BATCH_AXES, None))
  ids = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=rows)
  per_token = model_task == "masked_lm"
  label_sh = rows if per_token else NamedSharding(mesh, P(sharding.BATCH_AXES))
  label_shape = (batch, length) if per_token else (batch,)
  batch_abs = {"input_ids": ids, "attention_mask": ids,
               "labels": jax.ShapeDtypeStruct(label_shape, jnp.float32 if model_task == "regression" else jnp.int32,
                                              sharding=label_sh),
               "weights": jax.ShapeDtypeStruct(label_shape, jnp.float32, sharding=label_sh)}
  tx = optax.adamw(lr)
  opt_state = jax.eval_shape(tx.init, abs_params)
  opt_sh = sharding.state_shardings({"params": abs_params, "opt_state": opt_state}, param_sh, mesh)["opt_state"]
  loss = _loss(model_task)

  def forward(params, rest, ids, mask):
    out = nnx.merge(gd_eval, params, rest)(ids, mask)
    return out if isinstance(out, jax.Array) else out.last_hidden_state

  def train_step(params, opt_state, rest, batch):
    def f(p):
      model = nnx.merge(gd_train, p, rest, copy=True)
      return loss(model, batch), nnx.split(model, nnx.Param, ...)[2]
    (value, rest), grads = jax.value_and_grad(f, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, rest, value

  progs = {
      "forward": (jax.jit(sharding.traced_in(mesh, forward)), (params, rest, ids, ids)),
      "train_step": (jax.jit(sharding.traced_in(mesh, train_step), out_shardings=(param_sh, opt_sh, jax.tree.map(lambda _: rep, abs_rest), rep),
                             donate_argnums=(0, 1)),
                     (params, with_sh(opt_state, opt_sh), rest, batch_abs)),
  }
  if encode:
    progs["encode"] = encode_program(abstract, batch, length, mesh.devices.flat[0])
  return progs


def encode_program(model, rows: int, length: int, device, pooling: str = "mean", normalize: bool = True,
                   max_segments: int = 16):
  """``jaxformers.encode``'s compiled chunk: ``rows`` packed rows of ``length`` tokens on one device, pooled and
  normalised (the function :func:`jaxformers.packing.chunk_runner` jits, with its static arguments)."""
  graphdef, state = nnx.split(models.encoder_of(model))
  one = jax.sharding.SingleDeviceSharding(device)
  state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), state)
  ids = jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=one)
  def chunk(graphdef, fn, state, input_ids, segment_ids):    # a new function: jax caches traces per function, and
    return _run_chunk(graphdef, fn, state, input_ids, segment_ids)  # this one's must belong to the current target
  fn = jax.jit(chunk, static_argnums=(0, 1))
  return fn, (graphdef, Pooler(pooling, normalize, max_segments), state, ids, ids)


def parse_chip(name: str) -> tuple[Chip, str | None, int | None]:
  """``"v5e"`` (the chip's default topology), ``"v5e:2x4"`` (a named TPU topology) or ``"v5e-1"`` (the first
  1 chip of the default topology, as a Colab TPU runtime has): the chip, the topology and a chip count."""
  base, _, topo = name.partition(":")
  count = None
  m = re.fullmatch(r"(.+)-(\d+)", base)
  if m and m.group(1) in CHIPS:
    base, count = m.group(1), int(m.group(2))
  if base not in CHIPS:
    raise ValueError(f"chip {name!r}: expected one of {', '.join(CHIPS)}, optionally with ':TOPOLOGY' "
                     f"(v5e:2x4) or '-N' for N chips (v5e-1)")
  return CHIPS[base], (f"{base}:{topo}" if topo else None), count


def _analyse(r: Report, compiled) -> None:
  m = compiled.memory_analysis()
  if m is not None:
    r.hbm_bytes = int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                      + m.temp_size_in_bytes)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if cost:
    r.flops, r.bytes_accessed = cost.get("flops"), cost.get("bytes accessed")


def host_cost(cfg, model_task: str, num_labels: int | None, batch: int, length: int, num_chips: int,
              programs_wanted=("forward", "train_step")) -> dict[str, tuple[float, float]]:
  """FLOPs and bytes per chip of each program compiled by XLA:CPU with XLA attention (no kernels), for chips whose
  compiler reports no cost analysis (XLA:GPU): the same step's arithmetic, split evenly over ``num_chips``."""
  key = (cfg, model_task, num_labels, batch, length)
  todo = [name for name in programs_wanted if (key, name) not in _HOST_COSTS]
  if todo:
    mesh = Mesh(np.asarray(jax.devices("cpu")[:1]).reshape(1, 1), ("data", "fsdp"))
    with use_target(Target("cpu")):
      progs = programs(cfg, model_task, num_labels, batch, length, mesh, encode="encode" in todo)
      for name in todo:
        fn, args = progs[name]
        r = Report("host", name, ok=True)
        _analyse(r, fn.trace(*args).lower().compile())
        _HOST_COSTS[key, name] = None if r.flops is None else (r.flops, r.bytes_accessed)
  out = {}
  for name in programs_wanted:
    if _HOST_COSTS[key, name] is not None:
      share = 1 if name == "encode" else num_chips
      out[name] = tuple(v / share for v in _HOST_COSTS[key, name])
  return out


_HOST_COSTS: dict = {}     # (config, task, labels, batch, length), program -> (FLOPs, bytes) of the whole step


def compile_for(chip_name: str, cfg, model_task: str, num_labels: int | None, batch: int, length: int, *,
                lower_only: bool = False, devices: list | None = None, encode: bool = False,
                host_costs: bool = True, which: tuple[str, ...] | None = None) -> list[Report]:
  """Lower (and, unless ``lower_only``, compile) the forward and the train step (and ``encode``'s chunk) for a chip.

  ``batch`` is the global batch, split over every device of the chip's topology (``devices``: the host's
  CPU devices with ``lower_only``, standing in for the chips' count); ``chip_name`` as :func:`parse_chip` reads it.
  Where the chip's compiler gives no cost analysis (GPUs), FLOPs and bytes come from :func:`host_cost` unless
  ``host_costs`` is False; ``which`` names the programs to compile (all by default). A program needing more than
  :func:`usable_hbm` is reported as failing, with the memory it needs."""
  chip, topo, count = parse_chip(chip_name)
  target = Target(chip.platform, chip.name)
  if devices is None:
    devices = jax.devices("cpu")[:1] if lower_only else chip_devices(chip, topo)
    devices = devices[:count] if count else devices
  mesh = Mesh(np.asarray(devices).reshape(len(devices), 1), ("data", "fsdp"))
  reports = []
  with use_target(target):
    progs = programs(cfg, model_task, num_labels, batch, length, mesh, encode=encode)
    for name, (fn, args) in progs.items():
      if which is not None and name not in which:
        continue
      r = Report(chip_name, name, ok=False, tokens=batch * length, num_chips=1 if name == "encode" else len(devices))
      try:
        lowered = fn.trace(*args).lower(lowering_platforms=(target.lowering_platform,))
        r.kernels = count_kernels(lowered.as_text())
        if not lower_only:
          _analyse(r, lowered.compile())
        r.ok = True
        if r.hbm_bytes is not None and r.hbm_bytes > usable_hbm(chip):
          r.ok, r.reason = False, (f"needs {r.hbm_bytes / 2**30:.2f} GiB of HBM per chip; {chip.label} has "
                                   f"{usable_hbm(chip) / 2**30:.1f} GiB usable")
      except Exception as e:  # the compiler's verdict is the result here
        r.reason = one_line(e)
      reports.append(r)
  missing = [r for r in reports if r.ok and r.flops is None and not lower_only]
  if missing and host_costs:
    costs = host_cost(cfg, model_task, num_labels, batch, length, len(devices), [r.program for r in missing])
    for r in missing:
      r.flops, r.bytes_accessed = costs.get(r.program, (None, None))
      r.cost_from_host = True
  return reports


def usable_hbm(chip: Chip) -> int:
  """The memory a program may use: a TPU's whole HBM (its compiler refuses more); 75% of a GPU's, what jax
  preallocates by default (``XLA_PYTHON_CLIENT_MEM_FRACTION``)."""
  return chip.hbm_bytes if chip.platform == "tpu" else int(0.75 * chip.hbm_bytes)


def largest_batch(chip_name: str, cfg, model_task: str, num_labels: int | None, length: int, batch: int,
                  program: str = "train_step", resolution: float = 1 / 32) -> tuple[int | None, str]:
  """The largest global batch (a multiple of the chip count) whose ``program`` compiles and fits
  :func:`usable_hbm`, searched by compiling: a first guess from the memory at ``batch`` and ``2 * batch`` (linear
  in the batch), then doubling or bisection until the bracket is within ``resolution`` of the answer."""
  chip = parse_chip(chip_name)[0]
  limit = usable_hbm(chip)
  seen = {}

  def measure(b: int):
    if b not in seen:
      r = next(r for r in compile_for(chip_name, cfg, model_task, num_labels, b, length, host_costs=False,
                                      which=(program,)))
      seen[b] = r
    return seen[b]

  def fits(b: int) -> bool:
    r = measure(b)
    return r.ok and r.hbm_bytes is not None and r.hbm_bytes <= limit

  first = measure(batch)
  if not fits(batch):
    return None, first.reason or "the compiler gave no memory analysis"
  n = first.num_chips
  m1, m2 = first.hbm_bytes, measure(2 * batch).hbm_bytes or first.hbm_bytes
  per_example = max((m2 - m1) / batch, 1.0)
  guess = max(batch, int(batch + (limit - m1) / per_example) // n * n)
  lo, hi = batch, None
  if fits(guess):
    lo, hi = guess, guess * 2
    while fits(hi):
      lo, hi = hi, hi * 2
  else:
    hi = guess
  while hi - lo > max(n, int(lo * resolution)):
    mid = (lo + hi) // 2 // n * n
    if mid <= lo:
      break
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  r = seen[lo]
  return lo, (f"{r.hbm_bytes / 2**30:.2f} of {limit / 2**30:.1f} GiB usable per chip; {hi} does not fit "
              f"({len(seen)} compiles)")


def format_row(r: Report, cfg_name: str) -> str:
  """One markdown row; FLOPs from :func:`host_cost` are marked with a dagger."""
  chip = parse_chip(r.chip)[0]
  n_chips = r.num_chips
  if not r.ok:
    return f"| {cfg_name} | {chip.label} x{r.num_chips} | {r.program} | fails: {r.reason} | | | | | |"
  hbm = "n/a" if r.hbm_bytes is None else f"{r.hbm_bytes / 2**30:.2f} / {chip.hbm_bytes / 2**30:.0f} GiB"
  t = r.roofline_s(chip)
  tok = "n/a" if not t else f"{r.tokens / t / n_chips:,.0f}"
  mfu = "n/a" if not t else f"{r.flops / chip.peak_flops / t:.0%}"
  flops = "n/a" if r.flops is None else f"{r.flops / 1e9:.1f} G" + (" †" if r.cost_from_host else "")
  return (f"| {cfg_name} | {chip.label} x{n_chips} | {r.program} | compiles | {r.kernels} | {hbm} | {flops} | {tok} "
          f"| {mfu} |")
