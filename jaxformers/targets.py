"""The chips jaxformers compiles for, and the target that picks the code path.

A :class:`Target` names a platform (``cpu``, ``gpu``, ``tpu``) and, for an accelerator, a chip generation
from :data:`CHIPS`. The attention dispatch, the kernels' block sizes and the Fourier mixing choice read the
*current* target (:func:`current_target`): the host's own devices, unless a ``with use_target(...)`` block names
another. Tracing under ``use_target("v5e")`` on a CPU host gives exactly the program a v5e would run (Mosaic
kernels, TPU block sizes), which is how :mod:`jaxformers.aot` compiles for chips the host does not have.

:data:`CHIPS` is the one table of chip facts: public spec-sheet peaks (dense bf16 FLOP/s, fp16 where the chip has
no bf16; HBM bytes and bandwidth), what the Pallas kernels lower through on it (``mosaic``, ``triton`` or None:
XLA attention), and what the ahead-of-time compiler needs to describe it (a TPU topology; a GPU's device facts).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os

import jax

PLATFORMS = ("cpu", "gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator generation. ``onchip_bytes``: the fast memory one kernel instance may use (TPU: VMEM per
  core, as the compiler reports it when a kernel overflows it; GPU: shared memory per block, opt-in maximum)."""
  name: str
  platform: str
  label: str
  device_kinds: tuple[str, ...]       # substrings of ``jax.Device.device_kind`` that identify the chip
  peak_flops: float                   # dense bf16 (T4: fp16) FLOP/s per chip
  hbm_bytes: int
  hbm_bandwidth: float                # bytes/s
  onchip_bytes: int
  kernels: str | None                 # Pallas lowering on this chip; None: the kernels do not run, XLA attention
  topology: str | None = None         # TPU: the topology ``jaxformers aot`` compiles for by default
  has_bf16: bool = True
  # GPU facts for XLA's target description (``gpu_target_config``)
  compute_capability: tuple[int, int] | None = None
  sm_count: int = 0
  smem_per_sm: int = 0
  l2_bytes: int = 0
  clock_ghz: float = 0.0
  threads_per_sm: int = 0


_MiB, _GiB = 1 << 20, 1 << 30
CHIPS: dict[str, Chip] = {c.name: c for c in (
    Chip("v4", "tpu", "TPU v4", ("TPU v4",), 275e12, 32 * _GiB, 1.2e12, 16 * _MiB, "mosaic", "v4:2x2x1"),
    Chip("v5e", "tpu", "TPU v5e", ("TPU v5 lite", "TPU v5e"), 197e12, 16 * _GiB, 819e9, 128 * _MiB, "mosaic",
         "v5e:2x2"),
    Chip("v6e", "tpu", "TPU v6e", ("TPU v6 lite", "TPU v6e"), 918e12, 32 * _GiB, 1640e9, 32 * _MiB, "mosaic",
         "v6e:2x4"),
    Chip("h100", "gpu", "NVIDIA H100 SXM", ("H100",), 989e12, 80 * 10**9, 3.35e12, 232448, "triton",
         compute_capability=(9, 0), sm_count=132, smem_per_sm=233472, l2_bytes=50 * _MiB, clock_ghz=1.98,
         threads_per_sm=2048),
    Chip("a100", "gpu", "NVIDIA A100 SXM 40GB", ("A100",), 312e12, 40 * 10**9, 1.555e12, 166912, "triton",
         compute_capability=(8, 0), sm_count=108, smem_per_sm=167936, l2_bytes=40 * _MiB, clock_ghz=1.41,
         threads_per_sm=2048),
    Chip("l4", "gpu", "NVIDIA L4", ("L4",), 121e12, 24 * 10**9, 300e9, 101376, "triton",
         compute_capability=(8, 9), sm_count=58, smem_per_sm=102400, l2_bytes=48 * _MiB, clock_ghz=2.04,
         threads_per_sm=1536),
    # Turing: no bf16, and the Pallas Triton lowering needs compute capability 8.0 or later
    Chip("t4", "gpu", "NVIDIA T4", ("T4",), 65e12, 16 * 10**9, 320e9, 65536, None, has_bf16=False,
         compute_capability=(7, 5), sm_count=40, smem_per_sm=65536, l2_bytes=4 * _MiB, clock_ghz=1.59,
         threads_per_sm=1024),
)}


@dataclasses.dataclass(frozen=True)
class Target:
  """Where a program will run: ``platform`` (``cpu``, ``gpu``, ``tpu``), ``chip`` (a key of :data:`CHIPS`, or
  None for an unnamed chip of that platform) and ``interpret`` (Pallas kernels run by the interpreter)."""
  platform: str
  chip: str | None = None
  interpret: bool = False

  def __post_init__(self):
    if self.platform not in PLATFORMS:
      raise ValueError(f"target platform {self.platform!r}: expected one of {', '.join(PLATFORMS)}")
    if self.chip is not None:
      if self.chip not in CHIPS:
        raise ValueError(f"unknown chip {self.chip!r}; known chips: {', '.join(CHIPS)}")
      if CHIPS[self.chip].platform != self.platform:
        raise ValueError(f"chip {self.chip!r} is a {CHIPS[self.chip].platform} chip, not {self.platform}")

  @property
  def spec(self) -> Chip | None:
    return CHIPS.get(self.chip) if self.chip else None

  @property
  def kernel_backend(self) -> str | None:
    """How a Pallas kernel lowers here: ``triton``, ``mosaic``, an interpreter (``interpret``; ``interpret_tpu``
    and ``interpret_gpu`` run the TPU / GPU driver's code), or None (no kernels here: XLA attention)."""
    if self.platform == "cpu":
      return "interpret"
    if self.interpret:
      return "interpret_tpu" if self.platform == "tpu" else "interpret_gpu"
    if self.spec is not None:
      return self.spec.kernels
    return "mosaic" if self.platform == "tpu" else "triton"

  @property
  def lowering_platform(self) -> str:
    """The name ``jax.jit(...).lower(lowering_platforms=...)`` takes."""
    return {"gpu": "cuda"}.get(self.platform, self.platform)

  def __str__(self) -> str:
    return (self.chip or self.platform) + (" (interpret)" if self.interpret and self.platform != "cpu" else "")


def chip_of_device_kind(kind: str) -> str | None:
  """The :data:`CHIPS` key whose ``device_kinds`` match a ``jax.Device.device_kind``, else None."""
  for chip in CHIPS.values():
    if any(k.lower() in kind.lower() for k in chip.device_kinds):
      return chip.name
  return None


@functools.cache
def _host_devices() -> tuple[str, str]:
  platform = jax.default_backend()
  platform = "gpu" if platform in ("cuda", "rocm") else platform
  return (platform if platform in PLATFORMS else "cpu"), jax.devices()[0].device_kind


def host_target() -> Target:
  """The target of this process's own devices (interpret as :func:`force_interpret` or
  ``JAXFORMERS_PALLAS_INTERPRET`` says)."""
  platform, kind = _host_devices()
  chip = chip_of_device_kind(kind) if platform != "cpu" else None
  return Target(platform, chip, interpret=interpret_forced())


_current: contextvars.ContextVar[Target | None] = contextvars.ContextVar("jaxformers_target", default=None)


def current_target() -> Target:
  """The target code is traced for now: the innermost :func:`use_target`, else :func:`host_target`."""
  t = _current.get()
  return host_target() if t is None else t


def as_target(target: "Target | str") -> Target:
  """A :class:`Target` from itself, a chip name (``"v5e"``, ``"h100"``) or a platform (``"tpu"``, ``"cpu"``)."""
  if isinstance(target, Target):
    return target
  if target in CHIPS:
    return Target(CHIPS[target].platform, target)
  if target in PLATFORMS:
    return Target(target)
  if target == "cuda":
    return Target("gpu")
  raise ValueError(f"unknown target {target!r}; expected a chip ({', '.join(CHIPS)}) or a platform "
                   f"({', '.join(PLATFORMS)})")


@contextlib.contextmanager
def use_target(target: "Target | str"):
  """Trace (and so lower and compile) for ``target`` inside this block, whatever the host has.

  A function jitted once keeps what it was traced for: make a fresh ``jax.jit`` per target."""
  token = _current.set(as_target(target))
  try:
    yield _current.get()
  finally:
    _current.reset(token)


# --- the interpret switch: Pallas kernels run by the interpreter on the host's own devices ----------------------
_INTERPRET_ENV = "JAXFORMERS_PALLAS_INTERPRET"
_force_interpret: bool | None = None


def interpret_forced() -> bool:
  """True when :func:`force_interpret` or ``JAXFORMERS_PALLAS_INTERPRET=1`` asks for interpret mode."""
  if _force_interpret is not None:
    return _force_interpret
  return os.environ.get(_INTERPRET_ENV, "0") not in ("", "0", "false", "False")


def set_force_interpret(value: bool | None) -> None:
  """Force (True), forbid (False) or reset to the environment default (None) interpret mode."""
  global _force_interpret
  _force_interpret = value


@contextlib.contextmanager
def force_interpret(value: bool = True):
  """Run Pallas kernels in interpret mode on the host's devices (and let ``auto`` pick them on CPU)."""
  global _force_interpret
  old = _force_interpret
  _force_interpret = value
  try:
    yield
  finally:
    _force_interpret = old
