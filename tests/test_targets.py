"""A target, not the host, picks the code path: programs lowered for TPU and GPU on this CPU host hold the kernels.

Plain jax lowers for other platforms (``lower(lowering_platforms=...)``) without their compilers, so these tests
run in seconds on any machine. Each counts the Pallas kernel calls in the lowered program: Mosaic
(``tpu_custom_call``) for a TPU chip, Triton (``__gpu$xla.gpu.triton``) for a GPU one. A forward holds one kernel
per attention sublayer, a gradient three (forward, dk/dv, dq), so a silent fallback to XLA attention fails here.
"""
from __future__ import annotations

import logging
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxformers.blocks import BLOCKS
from jaxformers.config import EncoderConfig
from jaxformers.kernels.attention import default_block_sizes
from jaxformers.kernels.attention.dispatch import reset_logged_reasons
from jaxformers.models import Encoder
from jaxformers.targets import CHIPS, Target, as_target, current_target, host_target, use_target

KERNEL_CALL = {"tpu": "tpu_custom_call", "gpu": "@__gpu$xla.gpu.triton"}
LENGTH = 256


def lowered(layout: str, target: str, grad: bool, **overrides) -> str:
  """The lowered text of an encoder's forward (or its gradient) traced and lowered for ``target``."""
  cfg = EncoderConfig(**dict(dict(vocab_size=64, hidden_size=64, num_heads=2, intermediate_size=128, layout=layout,
                                  max_position_embeddings=LENGTH, hidden_dropout=0.0, attention_dropout=0.0,
                                  sparse_window=32), **overrides))
  model = Encoder(cfg, rngs=nnx.Rngs(0))
  model.eval()
  gd, params, rest = nnx.split(model, nnx.Param, ...)

  def forward(params, ids, mask):   # a fresh function per call: jit keeps what a function was traced for
    return nnx.merge(gd, params, rest)(ids, mask).last_hidden_state.astype(jnp.float32).sum()

  ids = jax.ShapeDtypeStruct((2, LENGTH), jnp.int32)
  t = as_target(target)
  with use_target(t):
    traced = jax.jit(jax.grad(forward) if grad else forward).trace(params, ids, ids)
  return traced.lower(lowering_platforms=(t.lowering_platform,)).as_text()


def attention_sublayers(layout: str) -> int:
  blocks = EncoderConfig(layout=layout, max_position_embeddings=LENGTH).blocks
  return sum(BLOCKS.get(b).mixer in ("attention", "sparse") for b in blocks)


@pytest.mark.parametrize("chip", ["v5e", "h100"])
@pytest.mark.parametrize("block", sorted(BLOCKS.names()))
def test_every_block_lowered_for_a_chip_holds_its_kernels(block, chip):
  layout = f"{block}*2"
  n = attention_sublayers(layout)
  call = KERNEL_CALL[CHIPS[chip].platform]
  assert lowered(layout, chip, grad=False).count(call) == n
  assert lowered(layout, chip, grad=True).count(call) == 3 * n


def test_the_host_target_is_the_cpu_and_its_program_holds_no_kernel():
  assert current_target() == host_target() == Target("cpu")
  text = lowered("serial*2", "cpu", grad=True)
  assert KERNEL_CALL["tpu"] not in text and KERNEL_CALL["gpu"] not in text


def test_the_target_is_restored_after_use_target():
  with use_target("v6e") as t:
    assert current_target() == t == Target("tpu", "v6e")
    with use_target("a100"):
      assert current_target().chip == "a100"
    assert current_target().chip == "v6e"
  assert current_target() == host_target()


def test_a_chip_the_kernels_do_not_serve_falls_back_to_xla_with_one_log_line(caplog):
  reset_logged_reasons()
  with caplog.at_level(logging.INFO, logger="jaxformers.kernels.attention"):
    text = lowered("serial*2", "t4", grad=True)
    lowered("parallel*2", "t4", grad=False)
  assert KERNEL_CALL["gpu"] not in text and "mosaic_gpu" not in text
  lines = [r.getMessage() for r in caplog.records if "NVIDIA T4" in r.getMessage()]
  assert lines == ["attention: using the XLA reference on NVIDIA T4: the Pallas kernels have no lowering for this chip"]


def test_attention_dropout_in_training_takes_xla_attention_on_a_tpu():
  """The kernels have no dropout: a training forward with attention dropout holds no kernel (logged)."""
  cfg = EncoderConfig(vocab_size=64, hidden_size=64, num_heads=2, intermediate_size=128, layout="serial*2",
                      max_position_embeddings=LENGTH, attention_dropout=0.1)
  model = Encoder(cfg, rngs=nnx.Rngs(0))
  model.train()
  gd, state = nnx.split(model)
  ids = jax.ShapeDtypeStruct((2, LENGTH), jnp.int32)

  def forward(state, ids):
    return nnx.merge(gd, state)(ids, ids).last_hidden_state.sum()

  with use_target("v5e"):
    text = jax.jit(forward).trace(state, ids).lower(lowering_platforms=("tpu",)).as_text()
  assert KERNEL_CALL["tpu"] not in text


def test_block_sizes_follow_the_target():
  assert default_block_sizes(Target("cpu"), 64) == default_block_sizes("cpu", 64)
  tpu, gpu = default_block_sizes("tpu", 64), default_block_sizes("gpu", 64)
  assert tpu.block_k % 128 == 0 and gpu.block_k & (gpu.block_k - 1) == 0
  with use_target("v5e"):
    assert default_block_sizes(head_dim=64) == tpu


def test_unknown_targets_are_refused_by_name():
  with pytest.raises(ValueError, match="unknown target 'v9z'.*v5e"):
    as_target("v9z")
  with pytest.raises(ValueError, match="chip 'h100' is a gpu chip, not tpu"):
    Target("tpu", "h100")


SHARDED_SCRIPT = r"""
import sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
sys.path.insert(0, {root!r})
from jaxformers.config import EncoderConfig
from jaxformers.models import Encoder
from jaxformers.targets import force_interpret, use_target
from jaxformers.train.sharding import traced_in
assert jax.device_count() == 4
cfg = EncoderConfig(vocab_size=64, hidden_size=64, num_heads=2, intermediate_size=128, layout="serial*2",
                    max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0)
model = Encoder(cfg, rngs=nnx.Rngs(0))
model.eval()
gd, state = nnx.split(model)
mesh = Mesh(np.array(jax.devices()).reshape(4, 1), ("data", "fsdp"))
rng = np.random.default_rng(0)
ids = rng.integers(1, 64, (8, 48)).astype(np.int32)
mask = (np.arange(48)[None] < rng.integers(5, 49, (8, 1))).astype(np.int32)
rows = NamedSharding(mesh, P(("data", "fsdp"), None))
forward = lambda s, i, m: nnx.merge(gd, s)(i, m).last_hidden_state
reference = jax.jit(forward)(state, ids, mask)           # XLA attention, one device
with use_target("v5e"):                                  # kernels under the mesh: one shard_map per attention
  text = jax.jit(traced_in(mesh, forward)).trace(state, jax.device_put(ids, rows), jax.device_put(mask, rows)).lower(
      lowering_platforms=("tpu",)).as_text()
print("kernels", text.count("tpu_custom_call"), "manual", text.count("manual_computation"))
with force_interpret():                                  # the same per-shard kernels, run by the interpreter here
  out = jax.jit(traced_in(mesh, forward))(state, jax.device_put(ids, rows), jax.device_put(mask, rows))
keep = mask.astype(bool)
print("maxdiff", float(np.abs(np.asarray(out) - np.asarray(reference))[keep].max()))
"""


def test_a_batch_split_over_devices_runs_the_kernel_per_shard(tmp_path):
  """XLA cannot partition a Pallas kernel: under a mesh the attention runs it per batch shard, with the same
  outputs as one device's XLA attention (measured 2.4e-7)."""
  import os
  import subprocess
  import sys
  from pathlib import Path
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  root = str(Path(__file__).resolve().parents[1])
  out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT.format(root=root)], env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  kernels, manual = (int(w) for w in re.search(r"kernels (\d+) manual (\d+)", out.stdout).groups())
  assert kernels == 2 and manual == 2, out.stdout
  assert float(re.search(r"maxdiff (\S+)", out.stdout).group(1)) < 2e-6, out.stdout


# --- the default block sizes: generated by benchmarks/block_sizes.py from what each chip's compiler accepted ------
from jaxformers.kernels.attention import flash_attention  # noqa: E402
from jaxformers.kernels.attention.block_choice import HEAD_DIMS, LENGTHS, choose, roofline_seconds  # noqa: E402
from jaxformers.kernels.attention.block_table import COMPILED, TABLE  # noqa: E402

KERNEL_CHIPS = sorted(c.name for c in CHIPS.values() if c.kernels)


def test_the_block_table_covers_every_chip_with_kernels_and_is_the_roofline_choice():
  assert sorted(TABLE) == KERNEL_CHIPS
  for chip in KERNEL_CHIPS:
    assert sorted(TABLE[chip]) == list(HEAD_DIMS)
    for hd in HEAD_DIMS:
      assert TABLE[chip][hd] == choose(chip, hd, list(COMPILED[chip][hd])), (chip, hd)
      assert all((bq, bk) in COMPILED[chip][hd] for _, bq, bk in TABLE[chip][hd])


def test_roofline_seconds_by_hand():
  """v5e, head_dim 64, length 200 in 128 x 128 blocks: padded to 256, 2 x 2 blocks."""
  flops = 18 * 96 * 256 * 256 * 64
  row = 64 * 2
  hbm = 96 * ((2 * 256 * row + 2 * 2 * 256 * row) + (4 * 256 * row + 2 * (2 * 256 * row + 2 * 256 * 4))
              + (3 * 256 * row + 2 * 2 * 256 * row))
  expected = max(flops / 197e12, hbm / 819e9) + 3 * 96 * 4 * 0.35e-6
  assert roofline_seconds("v5e", 64, 200, 128, 128) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("chip", KERNEL_CHIPS)
def test_default_blocks_lower_for_their_chip(chip):
  """Every default block size passes its chip's lowering rules (Mosaic's (8, 128) tiles, Triton's powers of two)."""
  t = as_target(chip)
  for hd in HEAD_DIMS:
    for length in (LENGTHS[0], LENGTHS[-1]):
      bs = default_block_sizes(t, hd, length)
      assert (bs.block_q, bs.block_k) in COMPILED[chip][hd]
      x = jax.ShapeDtypeStruct((1, length, 1, hd), jnp.bfloat16)

      def loss(q, k, v):
        return flash_attention(q, k, v).astype(jnp.float32).sum()

      with use_target(t):
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x).lower(
            lowering_platforms=(t.lowering_platform,)).as_text()
      assert text.count(KERNEL_CALL[t.platform]) == 3


def _aot_available(platform: str) -> bool:
  import importlib.util
  return importlib.util.find_spec("libtpu" if platform == "tpu" else "jax_cuda12_plugin") is not None


@pytest.mark.aot
@pytest.mark.parametrize("chip", KERNEL_CHIPS)
def test_default_blocks_compile_for_their_chip(chip):
  """The chip's own compiler accepts every default block size (run with the aot extra: ``pytest -m aot``)."""
  import sys
  from pathlib import Path
  sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
  from block_sizes import compiles
  from jaxformers.aot import chip_devices
  if not _aot_available(CHIPS[chip].platform):
    pytest.fail("the aot extra is not installed: pip install -e '.[aot]'")
  device = chip_devices(CHIPS[chip])[0]
  for hd in HEAD_DIMS:
    for _, bq, bk in TABLE[chip][hd]:
      assert compiles(chip, device, hd, bq, bk) is None, (chip, hd, bq, bk)


@pytest.mark.aot
@pytest.mark.parametrize("chip", ["v5e", "h100"])
def test_the_default_config_compiles_for_a_chip_with_its_kernels(chip):
  """benchmarks/aot.py's work: the forward and the train step, data parallel over the chip's topology (a v5e 2x2:
  4 chips), compile with the chip's compiler; the kernels are in them, and the memory fits the chip's HBM."""
  from jaxformers.aot import compile_for
  if not _aot_available(CHIPS[chip].platform):
    pytest.fail("the aot extra is not installed: pip install -e '.[aot]'")
  cfg = EncoderConfig(vocab_size=6000, hidden_size=128, num_heads=4, intermediate_size=512, layout="serial*2",
                      max_position_embeddings=130, attention_dropout=0.0)
  forward, step, encode = compile_for(chip, cfg, "classification", 9, batch=32, length=128, encode=True)
  for r, kernels in ((forward, 2), (step, 6), (encode, 2)):
    assert r.ok, r.reason
    assert r.kernels == kernels
    assert 0 < r.hbm_bytes < CHIPS[chip].hbm_bytes
  # the TPU compiler's cost analysis (the kernels' estimates included) drives the roofline; XLA:GPU has none, and
  # the same steps compiled by XLA:CPU stand in
  assert step.flops > forward.flops > 0 and step.roofline_s(CHIPS[chip]) > 0
  assert step.cost_from_host == forward.cost_from_host == (chip == "h100")


@pytest.mark.aot
@pytest.mark.parametrize("chip", ["v5e-1", "h100"])
def test_an_oversized_batch_is_refused_in_one_line_naming_hbm(chip):
  """A Colab-sized chip (one v5e) and an H100: a batch past the chip's memory fails in one line that names HBM
  (the TPU compiler's own verdict; on a GPU, the compiled program's memory against what jax may allocate)."""
  from jaxformers.aot import compile_for
  if not _aot_available(CHIPS[chip.split("-")[0]].platform):
    pytest.fail("the aot extra is not installed: pip install -e '.[aot]'")
  cfg = EncoderConfig(vocab_size=1000, hidden_size=256, num_heads=4, intermediate_size=1024, layout="serial*2",
                      max_position_embeddings=512, hidden_dropout=0.0, attention_dropout=0.0, dtype="bfloat16")
  (r,) = compile_for(chip, cfg, "classification", 2, batch=32768, length=512, which=("train_step",), host_costs=False)
  assert not r.ok and "\n" not in r.reason
  assert ("Ran out of memory on HBM" if chip == "v5e-1" else "GiB of HBM per chip") in r.reason, r.reason


@pytest.mark.aot
def test_an_oversized_block_is_refused_in_one_line_naming_the_memory():
  import sys
  from pathlib import Path
  sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
  from block_sizes import compiles
  from jaxformers.aot import chip_devices
  if not _aot_available("tpu") or not _aot_available("gpu"):
    pytest.fail("the aot extra is not installed: pip install -e '.[aot]'")
  tpu = compiles("v5e", chip_devices(CHIPS["v5e"])[0], 128, 4096, 4096)
  assert tpu.startswith("Ran out of memory in memory space vmem") and "\n" not in tpu
  gpu = compiles("h100", chip_devices(CHIPS["h100"])[0], 128, 256, 256)
  assert gpu.startswith("Shared memory size limit exceeded") and "\n" not in gpu


@pytest.mark.aot
def test_largest_batch_fits_and_the_next_step_does_not():
  """largest_batch's answer compiles within the H100's usable memory; the bracket's other end does not."""
  from jaxformers.aot import compile_for, largest_batch, usable_hbm
  if not _aot_available("gpu"):
    pytest.fail("the aot extra is not installed: pip install -e '.[aot]'")
  cfg = EncoderConfig(vocab_size=1000, hidden_size=128, num_heads=2, intermediate_size=512, layout="serial",
                      max_position_embeddings=512, hidden_dropout=0.0, attention_dropout=0.0, dtype="bfloat16")
  best, how = largest_batch("h100", cfg, "classification", 2, 512, 64, resolution=1 / 4)
  above = int(how.split("; ")[1].split()[0])
  assert best < above <= best * 5 // 4 + 1
  (fit,) = compile_for("h100", cfg, "classification", 2, best, 512, which=("train_step",), host_costs=False)
  (over,) = compile_for("h100", cfg, "classification", 2, above, 512, which=("train_step",), host_costs=False)
  assert fit.ok and fit.hbm_bytes <= usable_hbm(CHIPS["h100"]) < over.hbm_bytes and not over.ok


@pytest.mark.parametrize("chip", ["v5e-1", "v5e", "v5e:2x4", "h100"])
def test_chip_names_read_a_count_or_a_topology(chip):
  from jaxformers.aot import parse_chip
  spec, topo, count = parse_chip(chip)
  assert spec is CHIPS[chip.split("-")[0].split(":")[0]]
  assert (topo, count) == {"v5e-1": (None, 1), "v5e": (None, None), "v5e:2x4": ("v5e:2x4", None),
                           "h100": (None, None)}[chip]


def test_an_unknown_chip_names_the_known_ones():
  from jaxformers.aot import parse_chip
  with pytest.raises(ValueError, match=r"chip 'v9x-1': expected one of v4, v5e, v6e, h100"):
    parse_chip("v9x-1")


@pytest.mark.parametrize("first", ["v5e", "h100"])
def test_encode_chunk_is_traced_for_each_target_with_its_kernels(first):
  """encode's compiled chunk (packed rows, segment ids) holds one kernel call per attention block for each chip
  in turn: the function is traced anew per target, not taken from jax's trace cache of the chip before."""
  from jaxformers.aot import compile_for
  cfg = EncoderConfig(vocab_size=500, hidden_size=64, num_heads=2, intermediate_size=128,
                      layout="serial,fourier,serial", max_position_embeddings=130, hidden_dropout=0.0,
                      attention_dropout=0.0)
  for chip in (first, "h100" if first == "v5e" else "v5e"):
    (r,) = compile_for(chip, cfg, "classification", 2, 4, 128, lower_only=True, encode=True, which=("encode",))
    assert r.ok and r.kernels == 2, (chip, r.reason)
