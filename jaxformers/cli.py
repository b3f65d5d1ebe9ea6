"""``jaxformers convert|export|layouts``: checkpoint conversion from the command line."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


SAFE_WRITE = ("DST must be a new or empty directory. With --overwrite a non-empty one keeps every other file and only "
              "{names} are replaced. The checkpoint is written into a temporary directory beside DST and renamed into "
              "place, so an interruption while writing leaves DST as it was; old files are removed only after all new "
              "ones are in place. An existing file is never replaced{extra}.")

def _convert(args) -> int:
  import jaxformers
  from jaxformers.pretrained import check_save_destination
  check_save_destination(args.dst, args.overwrite)   # before the (long) conversion
  t0 = time.perf_counter()
  model, report = jaxformers.from_pretrained(args.src, revision=args.revision, layout=args.layout, task=args.task,
                                             num_labels=args.num_labels, progress=True, return_report=True)
  if report is not None:
    print(report.summary())
  out = jaxformers.save_pretrained(model, args.dst, overwrite=args.overwrite, tokenizer=args.src)
  from jaxformers.convert.tokenizer import HF_TOKENIZER_FILES
  tok = [n for n in HF_TOKENIZER_FILES if (out / n).is_file()]
  print(f"wrote {out} (layout {model.config.layout}, {_count(model):,} parameters"
        + (f"; tokenizer: {', '.join(tok)}" if tok else "; no tokenizer files in the source") + ")"
        + f" in {time.perf_counter() - t0:.1f}s")
  return 0


def _export(args) -> int:
  import jaxformers
  from jaxformers.convert.io import SAFETENSORS, check_destination
  from jaxformers.convert.tokenizer import HF_TOKENIZER_FILES
  check_destination(args.dst, ("config.json", SAFETENSORS), (), args.overwrite, "HF checkpoint", HF_TOKENIZER_FILES)
  model = jaxformers.from_pretrained(args.src, progress=True)
  out = jaxformers.export_hf(model, args.dst, tokenizer=args.src, overwrite=args.overwrite)
  from jaxformers.convert.tokenizer import HF_TOKENIZER_FILES
  tok = [n for n in HF_TOKENIZER_FILES if (out / n).is_file()]
  print(f"wrote {out}/config.json and model.safetensors ({_count(model):,} parameters)"
        + (f", tokenizer: {', '.join(tok)}" if tok else f"; {args.src} has no tokenizer, none written"))
  return 0


def _encode(args) -> int:
  import numpy as np
  import jaxformers
  from jaxformers.convert.io import CheckpointError
  src = Path(args.texts)
  if not src.is_file():
    raise CheckpointError(f"{src}: no such file (expected a UTF-8 text file, one text per line)")
  try:
    texts = src.read_text(encoding="utf-8").splitlines()
  except UnicodeDecodeError as e:
    raise CheckpointError(f"{src}: not UTF-8 text (byte offset {e.start})") from None
  out = Path(args.out)
  if out.exists() and not args.overwrite:
    raise CheckpointError(f"{out} exists: nothing was written; use --overwrite to replace it")
  t0 = time.perf_counter()
  vectors = jaxformers.encode(args.src, texts, pooling=args.pooling, normalize=args.normalize,
                              max_length=args.max_length, dtype=args.dtype, progress=True)
  tmp = out.with_name(f".{out.name}.partial.npy")
  np.save(tmp, vectors)
  tmp.replace(out)
  print(f"wrote {out}: {vectors.shape[0]} vectors of {vectors.shape[1]} in {time.perf_counter() - t0:.1f}s")
  return 0


def _layouts(args) -> int:
  from jaxformers.blocks import BLOCKS
  from jaxformers import layout
  print(layout.__doc__)
  for name in BLOCKS:
    print(f"  {name:16s} {BLOCKS.get(name).doc}")
  return 0


def _count(model) -> int:
  from flax import nnx
  import jax
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="jaxformers", description="Convert and export encoder checkpoints.")
  sub = p.add_subparsers(dest="command", required=True)
  c = sub.add_parser("convert", help="HF PyTorch (or native) checkpoint -> native jaxformers checkpoint",
                     description="Read SRC (an HF directory with config.json and model.safetensors or "
                                 "pytorch_model.bin, a Hugging Face Hub id such as roberta-base, or a jaxformers "
                                 "directory) and write a jaxformers checkpoint to DST. "
                                 + SAFE_WRITE.format(names="jaxformers.json, params/ and tokenizer files",
                                                     extra=", nor a params/ that is not an orbax checkpoint"))
  c.add_argument("src")
  c.add_argument("dst")
  c.add_argument("--layout", help="re-arrange into this layout, e.g. 'parallel*12' or 'fourier*10,serial*2' "
                                  "(run `jaxformers layouts` for the grammar)")
  c.add_argument("--task", choices=["base", "masked_lm", "pretraining", "classification", "token_classification"],
                 help="head to build (default: the checkpoint's own)")
  c.add_argument("--num-labels", type=int, help="labels of a new classification head")
  c.add_argument("--revision", help="branch, tag or commit of a Hub id (default: main)")
  c.add_argument("--overwrite", action="store_true",
                 help="replace the jaxformers checkpoint in a non-empty DST (its other files are kept)")
  c.set_defaults(fn=_convert)
  e = sub.add_parser("export", help="jaxformers checkpoint or training run -> HF PyTorch directory (config.json, "
                                    "model.safetensors, tokenizer files)",
                     description="Read SRC (a jaxformers directory, a train.py --workdir, WORKDIR/checkpoints/N) and "
                                 "write what transformers' from_pretrained and pipeline() load to DST. "
                                 + SAFE_WRITE.format(names="config.json, model.safetensors and tokenizer files",
                                                     extra=""))
  e.add_argument("src")
  e.add_argument("dst")
  e.add_argument("--overwrite", action="store_true",
                 help="replace config.json, model.safetensors and tokenizer files in a non-empty DST (others are kept)")
  e.set_defaults(fn=_export)
  n = sub.add_parser("encode", help="texts (one per line) -> vectors (.npy), sentence-transformers settings honoured",
                     description="Encode every line of TEXTS with the model SRC (a jaxformers, run, HF or "
                                 "sentence-transformers directory or a Hub id) and save the vectors to OUT (.npy), "
                                 "in line order.")
  n.add_argument("src")
  n.add_argument("texts")
  n.add_argument("out")
  n.add_argument("--pooling", choices=["cls", "mean", "max"], help="default: the directory's sentence-transformers "
                                                                     "pooling, else cls")
  n.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                 help="L2-normalise (default: as the sentence-transformers directory says, else no)")
  n.add_argument("--max-length", type=int, help="tokens per text (default: max_seq_length, else the model's limit)")
  n.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: the model's; "
                                                                   "parameters stay float32)")
  n.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
  n.set_defaults(fn=_encode)
  l = sub.add_parser("layouts", help="print the layout grammar and the registered blocks")
  l.set_defaults(fn=_layouts)
  args = p.parse_args(argv)
  from jaxformers.convert.io import CheckpointError
  from jaxformers.layout import LayoutError
  try:
    return args.fn(args)
  except (CheckpointError, LayoutError, KeyError, ValueError) as e:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    print(f"jaxformers {args.command}: error: {msg}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
