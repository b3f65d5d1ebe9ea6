"""Compile a train.py config (or a notebook preset) ahead of time for TPU and GPU chips, and print what each chip's
compiler says.

  JAX_PLATFORMS=cpu python benchmarks/aot.py --config configs/glue.py --chips v5e,v6e,v4,h100,a100,l4,t4
  JAX_PLATFORMS=cpu python benchmarks/aot.py --preset tpu --chips v5e-1,v6e-1    # a Colab TPU runtime's chip
  python benchmarks/aot.py --config configs/default.py --chips v5e,h100 --lower_only   # plain jax, no extras

Full compiles need the aot extras (``pip install -e ".[aot]"``: libtpu, the jax-cuda12 plugin and ptxas, all at
jax's version). Per chip and program (forward, train step, ``encode``'s chunk) one table row: compiled or the
compiler's one-line reason, Pallas kernel calls, HBM per chip, FLOPs per chip and step, the roofline tokens/s per
chip and the MFU ceiling the roofline implies, all predicted from the compiled program (see jaxformers/aot.py).
A chip is ``v5e`` (its default topology: 4 chips of a 2x2), ``v5e:2x4`` (a topology) or ``v5e-1`` (one chip).
``--largest_batch`` adds, per chip, the largest global batch whose train step fits HBM (two more compiles).
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
_PRESET = flags.DEFINE_string("preset", "", "a notebook preset (tpu or gpu, see jaxformers/colab.py) instead of "
                                            "--config: each notebook's model at its batch and length")
_CHIPS = flags.DEFINE_list("chips", ["v5e", "v6e", "v4", "h100", "a100", "l4", "t4"], "chips to compile for")
_BATCH = flags.DEFINE_integer("batch", 0, "global batch (0: config.data.batch_size)")
_LOWER_ONLY = flags.DEFINE_bool("lower_only", False, "trace and lower with plain jax only (count kernels)")
_ENCODE = flags.DEFINE_bool("encode", True, "also compile jaxformers.encode's chunk (batch rows, mean pooling)")
_LARGEST = flags.DEFINE_bool("largest_batch", False, "find the largest global batch whose train step fits HBM")

HEADER = ("| config | chip | program | compiles | kernels | HBM per chip | FLOPs per chip | roofline tokens/s per chip "
          "| MFU ceiling |\n|---|---|---|---|---|---|---|---|---|")


def config_jobs(c, name: str, batch: int):
  """[(name, EncoderConfig, model task, num_labels, batch, length)] of a train.py config."""
  import ml_collections
  from jaxformers.train.defaults import encoder_config
  task = {"mlm": "masked_lm", "pretrain": "masked_lm", "masked_lm": "masked_lm",
          "regression": "regression"}.get(c.task, "classification")
  model = dict(c.model)
  model["layout"] = model.get("layout") or "serial*12"
  cfg = encoder_config(ml_collections.ConfigDict(model), vocab_size=c.data.vocab_size or 30522, pad_token_id=0)
  labels = None if task == "masked_lm" else (c.data.get("num_labels", 2) or 2)
  return [(name, cfg, task, labels, batch or c.data.batch_size, c.data.max_length)]


def preset_jobs(preset: str):
  """The notebooks' models at their settings: BERT-base (quickstart, finetune, compression) and MiniLM (study)."""
  from jaxformers import EncoderConfig
  from jaxformers.colab import PRESETS
  p = PRESETS[preset]
  bert = dict(layout="serial*12", hidden_size=768, num_heads=12, intermediate_size=3072, vocab_size=30522,
              max_position_embeddings=512)
  minilm = dict(layout="serial*6", hidden_size=384, num_heads=12, intermediate_size=1536, vocab_size=30522,
                max_position_embeddings=512)
  ft, st = p["finetune"], p["study"]
  drop = dict(hidden_dropout=0.1, attention_dropout=0.1)
  return [
      (f"{preset}: finetune (BERT-base)", EncoderConfig(**bert, dtype=ft["dtype"], **drop), "classification", 2,
       ft["batch_size"], ft["max_length"]),
      (f"{preset}: study (MiniLM)", EncoderConfig(**minilm, **drop), "classification", 2, st["batch_size"],
       st["max_length"]),
  ]


def main(argv):
  del argv
  from jaxformers.aot import compile_for, format_row, largest_batch
  if _PRESET.value:
    jobs = preset_jobs(_PRESET.value)
  else:
    name = os.path.basename(sys.argv[sys.argv.index("--config") + 1] if "--config" in sys.argv else "default.py")
    jobs = config_jobs(_CONFIG.value, name, _BATCH.value)
  for name, cfg, task, labels, batch, length in jobs:
    print(f"\n{name}: layout {cfg.layout}, hidden {cfg.hidden_size}, {cfg.dtype}, dropout {cfg.hidden_dropout}/"
          f"{cfg.attention_dropout}, batch {batch} x {length}, task {task}")
    print(HEADER)
    notes = []
    for chip in tqdm(_CHIPS.value, desc="chips", file=sys.stderr):
      for r in compile_for(chip, cfg, task, labels, batch, length, lower_only=_LOWER_ONLY.value,
                           encode=_ENCODE.value):
        print(format_row(r, name.split(": ", 1)[-1]), flush=True)
      if _LARGEST.value and not _LOWER_ONLY.value:
        best, how = largest_batch(chip, cfg, task, labels, length, batch)
        notes.append(f"{chip}: largest train-step batch {best if best else 'unknown'} x {length} ({how})")
    print("\n".join(notes))
  print("\n† FLOPs and bytes of the same step compiled by XLA:CPU with XLA attention (XLA:GPU reports no cost "
        "analysis), split over the chips")


if __name__ == "__main__":
  app.run(main)
