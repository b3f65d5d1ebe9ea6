"""Compile a train.py config ahead of time for TPU and GPU chips, and print what each chip's compiler says.

  JAX_PLATFORMS=cpu python benchmarks/aot.py --config configs/glue.py --chips v5e,v6e,v4,h100,a100,l4,t4
  python benchmarks/aot.py --config configs/default.py --chips v5e,h100 --lower_only   # plain jax, no extras

Full compiles need the aot extras (``pip install -e ".[aot]"``: libtpu, the jax-cuda12 plugin and ptxas, all at
jax's version). Per chip and program (forward, train step) one table row: compiled or the compiler's one-line
reason, Pallas kernel calls, HBM per chip, FLOPs per chip and step, the roofline tokens/s per chip and the MFU
ceiling the roofline implies, all predicted from the compiled program (see jaxformers/aot.py).
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from tqdm import tqdm  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "configs/<name>.py[:arg]")
_CHIPS = flags.DEFINE_list("chips", ["v5e", "v6e", "v4", "h100", "a100", "l4", "t4"], "chips to compile for")
_BATCH = flags.DEFINE_integer("batch", 0, "global batch (0: config.data.batch_size)")
_LOWER_ONLY = flags.DEFINE_bool("lower_only", False, "trace and lower with plain jax only (count kernels)")


def main(argv):
  del argv
  from jaxformers.aot import compile_for, format_row
  from jaxformers.train.defaults import encoder_config
  c = _CONFIG.value
  task = {"classification": "classification", "regression": "regression", "mlm": "masked_lm",
          "pretrain": "masked_lm", "masked_lm": "masked_lm"}.get(c.task, "classification")
  model = dict(c.model)
  model["layout"] = model.get("layout") or "serial*12"
  import ml_collections
  cfg = encoder_config(ml_collections.ConfigDict(model), vocab_size=c.data.vocab_size or 30522, pad_token_id=0)
  batch, length = _BATCH.value or c.data.batch_size, c.data.max_length
  name = _CONFIG.value.get("name", None) or sys.argv[sys.argv.index("--config") + 1] if "--config" in sys.argv else "config"
  print(f"{name}: layout {cfg.layout}, hidden {cfg.hidden_size}, {cfg.dtype}, batch {batch} x {length}, task {task}")
  print("| config | chip | program | compiles | kernels | HBM per chip | FLOPs per chip | roofline tokens/s per chip | MFU ceiling |")
  print("|---|---|---|---|---|---|---|---|---|")
  for chip in tqdm(_CHIPS.value, desc="chips", file=sys.stderr):
    for r in compile_for(chip, cfg, task, c.data.get("num_labels", 2) if task != "masked_lm" else None, batch, length,
                         lower_only=_LOWER_ONLY.value):
      print(format_row(r, name), flush=True)


if __name__ == "__main__":
  app.run(main)
