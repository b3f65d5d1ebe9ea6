"""``jaxformers convert|export|layouts``: checkpoint conversion from the command line."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxformers import layout, models, prune
from jaxformers.blocks import BLOCKS
from jaxformers.checkpoints import runs
from jaxformers.checkpoints.files import check_destination
from jaxformers.checkpoints.pretrained import check_save_destination, export_hf, from_pretrained, save_pretrained
from jaxformers.checkpoints.tokenizers import HF_TOKENIZER_FILES, load_tokenizer
from jaxformers.checkpoints.workdir import WorkdirLocked, is_run_dir
from jaxformers.convert.io import SAFETENSORS
from jaxformers.data.sources import DataError
from jaxformers.encode import encode
from jaxformers.errors import CheckpointError
from jaxformers.flops import model_flops
from jaxformers.layout import LayoutError
from jaxformers.quant import dir_bytes, quantize, size_report
from jaxformers.train import run
from jaxformers.train.cli import _load_config_file, apply_overrides, settle_length
from jaxformers.train.defaults import base_config, fill_from
from jaxformers.train.tasks import make_task

SAFE_WRITE = ("DST must be a new or empty directory. With --overwrite a non-empty one keeps every other file and only "
              "{names} are replaced. The checkpoint is written into a temporary directory beside DST and renamed into "
              "place, so an interruption while writing leaves DST as it was; old files are removed only after all new "
              "ones are in place. An existing file is never replaced{extra}.")

def _convert(args) -> int:
  check_save_destination(args.dst, args.overwrite)   # before the (long) conversion
  t0 = time.perf_counter()
  model, report = from_pretrained(args.src, revision=args.revision, layout=args.layout, task=args.task,
                                  num_labels=args.num_labels, progress=True, return_report=True)
  if report is not None:
    print(report.summary())
  out = save_pretrained(model, args.dst, overwrite=args.overwrite, tokenizer=args.src)
  tok = [n for n in HF_TOKENIZER_FILES if (out / n).is_file()]
  print(f"wrote {out} (layout {model.config.layout}, {_count(model):,} parameters"
        + (f"; tokenizer: {', '.join(tok)}" if tok else "; no tokenizer files in the source") + ")"
        + f" in {time.perf_counter() - t0:.1f}s")
  return 0


def _export(args) -> int:
  check_destination(args.dst, ("config.json", SAFETENSORS), (), args.overwrite, "HF checkpoint", HF_TOKENIZER_FILES)
  model = from_pretrained(args.src, progress=True)
  out = export_hf(model, args.dst, tokenizer=args.src, overwrite=args.overwrite)
  tok = [n for n in HF_TOKENIZER_FILES if (out / n).is_file()]
  print(f"wrote {out}/config.json and model.safetensors ({_count(model):,} parameters)"
        + (f", tokenizer: {', '.join(tok)}" if tok else f"; {args.src} has no tokenizer, none written"))
  return 0


def read_lines(path: Path) -> list[str]:
  """The lines of a UTF-8 text file, split at ``\\n`` only (a ``\\r`` before it is dropped; U+2028, form feeds and
  other characters ``str.splitlines`` would split at stay inside their line); a final newline ends the last line."""
  try:
    text = path.read_bytes().decode("utf-8")   # not read_text: its universal newlines would split at a lone \r
  except UnicodeDecodeError as e:
    raise CheckpointError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
  lines = text.split("\n")
  if lines[-1] == "":
    lines.pop()
  return [line[:-1] if line.endswith("\r") else line for line in lines]


def _encode(args) -> int:
  src = Path(args.texts)
  if not src.is_file():
    raise CheckpointError(f"{src}: no such file (expected a UTF-8 text file, one text per line)")
  texts = read_lines(src)
  out = Path(args.out)
  if out.is_dir():
    raise CheckpointError(f"{out} is a directory: nothing was written; name a .npy file to write the vectors to")
  if out.exists() and not args.overwrite:
    raise CheckpointError(f"{out} exists: nothing was written; use --overwrite to replace it")
  if not out.parent.is_dir():
    raise CheckpointError(f"{out.parent}: no such directory to write {out.name} into; nothing was computed")
  t0 = time.perf_counter()
  vectors = encode(args.src, texts, pooling=args.pooling, normalize=args.normalize,
                   max_length=args.max_length, dtype=args.dtype, progress=True)
  tmp = out.with_name(f".{out.name}.partial.npy")
  try:
    np.save(tmp, vectors)
    tmp.replace(out)
  finally:
    tmp.unlink(missing_ok=True)
  print(f"wrote {out}: {vectors.shape[0]} vectors of {vectors.shape[1]} in {time.perf_counter() - t0:.1f}s")
  return 0


def _train_config(spec: str | None, overrides: list[str] = (), src: str | None = None):
  """``(config, where, given)``: a train.py config (``FILE[:ARG]``) with ``--config.KEY=VALUE`` overrides (``given``: the
  keys they set); without a file, the config SRC was trained with when SRC is a train.py run, else the defaults (the
  embedded data)."""
  if spec:
    if not Path(spec.partition(":")[0]).is_file():
      raise ValueError(f"--config {spec}: no such config file (expected a train.py config, e.g. "
                       f"configs/finetune.py:train=train.csv,eval=dev.csv)")
    c, where = _load_config_file(spec), f"--config {spec}"
  else:
    c, where = _run_config(src), f"{src}'s training config"
    if c is None:
      c, where = base_config(), "the default config (the embedded docstring data, 9 classes)"
  c.unlock()
  given = apply_overrides(c, list(overrides))
  settle_length(c, given)
  return c, where, given


def _run_config(src: str | None):
  """The config a train.py run directory was trained with (saved beside its states), else None."""
  if not src:
    return None
  if not is_run_dir(src):
    return None
  saved = runs.read_meta(runs.step_dir(src)).get("config")
  return fill_from(base_config(), saved) if saved else None


def check_scoring_labels(model, task, where: str, src: str) -> None:
  """A classifier is scored on data with its own classes: the task's label count (and names, when both have them)
  must be the model's, else one line naming both and the config that would fit."""
  if models.task_of(model) != "classification" or task.name not in ("classification", "regression"):
    return
  n, names = model.num_labels, getattr(model, "label_names", None)
  fmt = lambda k, v: f"{k} labels" + (f" ({', '.join(v)})" if v else "")  # noqa: E731
  if task.num_labels != n or (names and task.label_names and tuple(names) != tuple(task.label_names)):
    raise ValueError(f"{where} has {fmt(task.num_labels, task.label_names)} but {src}'s classifier has "
                     f"{fmt(n, names)}: score a classifier on its own task, e.g. --config configs/finetune.py:"
                     f"train=YOUR.csv,text=COLUMN,label=COLUMN" + ("" if where.endswith("training config") else
                                                                   " (a train.py run directory is scored on its own "
                                                                   "config's data when --config is left out)"))


def _prune(args) -> int:
  check_save_destination(args.dst, args.overwrite)
  c, where, given = _train_config(args.config, args.overrides, args.src)
  model = from_pretrained(args.src)
  n = model.config.num_layers
  length = c.data.max_length
  if args.flops is not None:
    if args.heads != "0" or args.ffn != "0":
      raise ValueError(f"--flops={args.flops} sets the heads and ffn fractions itself; give either --flops or "
                       f"--heads / --ffn")
    args.heads, args.ffn = prune.flops_fractions(args.flops, model, length)
  prune.check_targets(model, args.heads, args.ffn, args.flops)
  if args.rounds < 1 or args.examples < 1:
    raise ValueError(f"--rounds={args.rounds} and --examples={args.examples} must be at least 1")
  task = make_task(c)
  check_scoring_labels(model, task, where, args.src)
  flops_before = model_flops(model.config, length)
  tok = load_tokenizer(args.src)
  examples = task.examples("train")
  print(f"scoring on {min(args.examples, len(examples))} of {len(examples)} training examples of {examples.origin} "
        f"({where})")
  batches = prune.sample_batches(tok, examples, args.examples, c.data.max_length,
                                 pad_id=model.config.pad_token_id, seed=c.seed)
  before = prune.count_params(model)
  work = Path(args.workdir or f"{args.dst}-rounds")
  if args.distill:
    _claim_rounds_dir(work, args)
  for k in range(1, args.rounds + 1):
    frac = lambda t: _round_target(prune.parse_target(t, n, "target"), k, args.rounds)  # noqa: E731
    model, _ = prune.prune_to(model, batches, heads=frac(args.heads), ffn=frac(args.ffn), progress=True)
    print(f"round {k}/{args.rounds}: {prune.count_params(model):,} parameters\n{prune.describe(model)}")
    if args.distill:
      saved = work / f"round{k}" / "pruned"
      if not (saved / "jaxformers.json").is_file():   # a resumed prune keeps the round's saved model as it is
        saved = save_pretrained(model, saved, tokenizer=args.src)
      c.init_from, c.distill.teacher, c.model.layout = str(saved), str(args.src), ""
      c.distill.hidden = 1.0
      if models.task_of(model) == "classification" and c.task in ("classification", "regression"):
        c.distill.logits = 1.0
      else:
        c.task = "heal"
      if args.steps:
        c.train.num_steps, c.train.num_epochs = args.steps, 0.0
      summary = run(c, work / f"round{k}" / "run", given=given)
      print(f"round {k}/{args.rounds}: distilled {summary['steps']} steps, eval " +
            " ".join(f"{key}={v:.4f}" for key, v in summary["eval"].items()))
      model = from_pretrained(work / f"round{k}" / "run")
  out = save_pretrained(model, args.dst, overwrite=args.overwrite, tokenizer=args.src)
  print(f"wrote {out}: {prune.count_params(model):,} parameters ({before:,} before), layout {model.config.layout}, "
        f"blocks' FLOPs/token at length {length}: {model_flops(model.config, length) / flops_before:.3f} of SRC's")
  return 0


ROUNDS_FILE = "prune.json"


def _claim_rounds_dir(work: Path, args) -> None:
  """Make ``work`` the rounds directory of this prune, or refuse before anything is written: ``prune.json`` there
  names the settings whose rounds it holds; the same command again resumes them, other settings are refused."""
  settings = {"src": str(Path(args.src).absolute()) if Path(args.src).exists() else args.src,
              "heads": str(args.heads), "ffn": str(args.ffn), "flops": args.flops, "rounds": args.rounds,
              "examples": args.examples, "steps": args.steps, "config": args.config}
  mine = work / ROUNDS_FILE
  if work.exists() and not work.is_dir():
    raise CheckpointError(f"--workdir {work} is a file: nothing was written; name a directory for the rounds' runs")
  if mine.is_file():
    try:
      theirs = json.loads(mine.read_text())
    except ValueError:
      theirs = {}
    diff = [k for k in settings if theirs.get(k) != settings[k]]
    if diff:
      raise CheckpointError(f"--workdir {work} holds the rounds of another prune ({diff[0]} {theirs.get(diff[0])!r} "
                            f"there, {settings[diff[0]]!r} here): nothing was written; use a fresh --workdir")
    return
  rounds = sorted(p.name for p in work.glob("round*")) if work.is_dir() else []
  if rounds:
    raise CheckpointError(f"--workdir {work} holds {', '.join(rounds)} but no {ROUNDS_FILE} naming the prune they "
                          f"belong to: nothing was written; use a fresh --workdir")
  work.mkdir(parents=True, exist_ok=True)
  tmp = work / f".{ROUNDS_FILE}.partial"
  tmp.write_text(json.dumps(settings, indent=2) + "\n")
  tmp.replace(mine)


def _round_target(target, k: int, rounds: int):
  """The fraction round ``k`` removes from what is left so that after ``k`` rounds ``target * k / rounds`` is gone."""
  def one(t):
    before, after = t * (k - 1) / rounds, t * k / rounds
    return (after - before) / (1.0 - before)
  return {i: one(t) for i, t in target.items()} if isinstance(target, dict) else one(target)


def _quantize(args) -> int:
  check_save_destination(args.dst, args.overwrite)
  model = from_pretrained(args.src, progress=True)
  q = quantize(model, args.mode)
  out = save_pretrained(q, args.dst, overwrite=args.overwrite, tokenizer=args.src)
  a, b = size_report(model), size_report(q)
  print(f"wrote {out}: {args.mode}, parameters {a['bytes'] / 1e6:.1f} MB -> {b['bytes'] / 1e6:.1f} MB in memory, "
        f"{dir_bytes(out / 'params') / 1e6:.1f} MB on disk ({b['int8_params']:,} of {b['params']:,} values int8)")
  return 0


def _layouts(args) -> int:
  print(layout.__doc__)
  for name in BLOCKS:
    print(f"  {name:16s} {BLOCKS.get(name).doc}")
  return 0


def _count(model) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def build_parser() -> argparse.ArgumentParser:
  """The ``jaxformers`` command line: one sub-command a helper."""
  p = argparse.ArgumentParser(prog="jaxformers", description="Convert and export encoder checkpoints.")
  sub = p.add_subparsers(dest="command", required=True)
  for add in (_add_convert, _add_export, _add_encode, _add_prune, _add_quantize, _add_layouts):
    add(sub)
  return p


def _add_convert(sub) -> None:
  """``jaxformers convert SRC DST``."""
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


def _add_export(sub) -> None:
  """``jaxformers export SRC DST``."""
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


def _add_encode(sub) -> None:
  """``jaxformers encode SRC TEXTS OUT``."""
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


def _add_prune(sub) -> None:
  """``jaxformers prune SRC DST``."""
  pr = sub.add_parser("prune", help="structured pruning: remove attention heads and feed-forward neurons",
                      description="Score SRC's heads and feed-forward neurons (Taylor importance on a sample of the "
                                  "training data of --config: SRC's own when SRC is a train.py run, else the embedded "
                                  "data), remove the least important "
                                  "and write the smaller model to DST. With --distill each of --rounds rounds is "
                                  "followed by distillation from SRC (train.py's trainer, settings from --config). "
                                  + SAFE_WRITE.format(names="jaxformers.json, params/ and tokenizer files", extra=""))
  pr.add_argument("src")
  pr.add_argument("dst")
  pr.add_argument("--heads", default="0", help="fraction of all heads to remove (global ranking), or per block "
                                                "'0:0.5,3:0.25'; in [0, 1)")
  pr.add_argument("--ffn", default="0", help="fraction of every block's feed-forward neurons to remove, or per "
                                              "block '0:0.3'; in [0, 1)")
  pr.add_argument("--flops", type=float, help="instead of --heads/--ffn: the fraction of the blocks' FLOPs per token "
                                              "to keep, in (0, 1] (removes 1 - FLOPS of the heads and neurons)")
  pr.add_argument("--config", help="a train.py config FILE[:ARG] for the scoring data and the distillation runs, "
                                   "e.g. configs/finetune.py:train=my.csv,text=sentence (default: SRC's own when SRC "
                                   "is a train.py run, else the embedded data); --config.KEY=VALUE overrides its keys "
                                   "as in train.py")
  pr.add_argument("--examples", type=int, default=256, help="training examples the importance is computed on")
  pr.add_argument("--distill", action="store_true", help="distil from SRC after each round")
  pr.add_argument("--rounds", type=int, default=1, help="prune in this many equal steps (prune -> distil -> prune)")
  pr.add_argument("--steps", type=int, default=0, help="distillation steps per round (default: the config's)")
  pr.add_argument("--workdir", help="where the rounds' runs go (default DST-rounds); the same command again resumes "
                                    "them, a prune with other settings is refused there")
  pr.add_argument("--overwrite", action="store_true", help="replace the jaxformers checkpoint in a non-empty DST")
  pr.set_defaults(fn=_prune)


def _add_quantize(sub) -> None:
  """``jaxformers quantize SRC DST``."""
  q = sub.add_parser("quantize", help="int8 post-training quantization of every dense layer",
                     description="Quantize SRC's dense layers to int8 weights with per-token int8 activations at run "
                                 "time and write the model to DST. "
                                 + SAFE_WRITE.format(names="jaxformers.json, params/ and tokenizer files", extra=""))
  q.add_argument("src")
  q.add_argument("dst")
  q.add_argument("--mode", default="int8", choices=["int8"])
  q.add_argument("--overwrite", action="store_true", help="replace the jaxformers checkpoint in a non-empty DST")
  q.set_defaults(fn=_quantize)


def _add_layouts(sub) -> None:
  """``jaxformers layouts``."""
  l = sub.add_parser("layouts", help="print the layout grammar and the registered blocks")
  l.set_defaults(fn=_layouts)


def main(argv: list[str] | None = None) -> int:
  """Run the sub-command ``argv`` names; 2 (and one ``error:`` line on stderr) for an input it refuses."""
  p = build_parser()
  args, extra = p.parse_known_args(argv)
  args.overrides = [a[len("--config."):] for a in extra if a.startswith("--config.")]
  if len(args.overrides) != len(extra) or (extra and args.command != "prune"):
    p.error(f"unrecognized arguments: {' '.join(extra)}" + (" (--config.KEY=VALUE overrides belong to prune)"
                                                            if args.command != "prune" else ""))
  try:
    return args.fn(args)
  except (CheckpointError, LayoutError, KeyError, ValueError, DataError, WorkdirLocked) as e:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    print(f"jaxformers {args.command}: error: {msg}", file=sys.stderr)
    return 2

if __name__ == "__main__":
  sys.exit(main())
