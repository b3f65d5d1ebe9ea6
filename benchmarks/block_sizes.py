"""Choose the flash kernels' default block sizes per chip: compile every candidate, keep the roofline's best.

  JAX_PLATFORMS=cpu python benchmarks/block_sizes.py            # print the table (needs the aot extra)
  JAX_PLATFORMS=cpu python benchmarks/block_sizes.py --write    # and write jaxformers/kernels/attention/block_table.py

For each chip with kernels (jaxformers.targets.CHIPS) and head dimension (64, 128), every candidate
(block_q, block_k) of jaxformers.kernels.attention.block_choice.CANDIDATES is compiled, forward and backward in
bfloat16, by that chip's own compiler (Mosaic for TPU, Triton + ptxas for GPU); one line per failure with the
compiler's reason (VMEM or shared memory). Among the blocks that compile, block_choice.choose takes the roofline's
fastest per sequence length. tests/test_targets.py checks the written table against that choice.
"""
from __future__ import annotations

import argparse
import os
import pprint
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402
from tqdm import tqdm  # noqa: E402

from jaxformers.aot import chip_devices, one_line  # noqa: E402
from jaxformers.kernels.attention import BlockSizes, flash_attention  # noqa: E402
from jaxformers.kernels.attention.block_choice import CANDIDATES, HEAD_DIMS, choose  # noqa: E402
from jaxformers.targets import CHIPS, use_target  # noqa: E402

TABLE_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxformers", "kernels",
                          "attention", "block_table.py")


def compiles(chip_name: str, device, head_dim: int, bq: int, bk: int) -> str | None:
  """None when forward + backward compile for the chip, else the compiler's one-line reason."""
  length = 2 * max(bq, bk)
  x = jax.ShapeDtypeStruct((1, length, 2, head_dim), jnp.bfloat16, sharding=SingleDeviceSharding(device))

  def loss(q, k, v):
    return flash_attention(q, k, v, block_sizes=BlockSizes(bq, bk)).astype(jnp.float32).sum()

  try:
    with use_target(chip_name):
      jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x).lower().compile()
    return None
  except Exception as e:  # the compiler's verdict is the result
    return one_line(e)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--chips", default=",".join(c.name for c in CHIPS.values() if c.kernels), help="chips (default: %(default)s)")
  p.add_argument("--write", action="store_true", help="write block_table.py")
  a = p.parse_args()
  table, compiled_sets = {}, {}
  jobs = [(c, h) for c in a.chips.split(",") for h in HEAD_DIMS]
  for chip_name, hd in tqdm(jobs, desc="chips x head dims", file=sys.stderr):
    device = chip_devices(CHIPS[chip_name])[0]
    ok = []
    for bq, bk in CANDIDATES[CHIPS[chip_name].platform]:
      t = time.perf_counter()
      reason = compiles(chip_name, device, hd, bq, bk)
      if reason is None:
        ok.append((bq, bk))
      else:
        print(f"{chip_name} head_dim {hd} blocks ({bq}, {bk}): {reason}", flush=True)
      print(f"  {chip_name} hd {hd} ({bq}, {bk}) {'ok' if reason is None else 'fails'} {time.perf_counter() - t:.1f}s",
            file=sys.stderr, flush=True)
    compiled_sets.setdefault(chip_name, {})[hd] = tuple(ok)
    table.setdefault(chip_name, {})[hd] = choose(chip_name, hd, ok)
    print(f"{chip_name} head_dim {hd}: {table[chip_name][hd]}", flush=True)
  if a.write:
    old = open(TABLE_FILE).read()
    header = old[:old.index('"""', 3) + 3] + "\n"
    with open(TABLE_FILE, "w") as f:
      f.write(header)
      f.write(f"# jax {jax.__version__}\nTABLE: dict[str, dict[int, tuple[tuple[int, int, int], ...]]] = "
              f"{pprint.pformat(table, width=110)}\n")
      f.write("# the candidate blocks that compiled, per chip and head dimension\nCOMPILED: dict[str, dict[int, "
              f"tuple[tuple[int, int], ...]]] = {pprint.pformat(compiled_sets, width=110)}\n")
    print(f"wrote {TABLE_FILE}")


if __name__ == "__main__":
  main()
