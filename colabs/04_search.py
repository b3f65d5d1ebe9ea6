# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Architecture search: where does an encoder need attention?
#
# Every layer of a BERT is two sublayers: self-attention, which mixes information between tokens, then a
# feed-forward network, which transforms each token on its own. PAR (Mandava et al. 2020, "Pay Attention when
# Required") asked whether every one of those positions has to be there. It made each sublayer position a choice
# between **self-attention**, **feed-forward** and **identity** (skip the sublayer), learnt the choice by gradient
# descent, and found transformers with far fewer attention sublayers than the usual alternation, placed in the
# lower layers.
#
# `jaxformers.search` runs that search inside the trainer and adds two things:
#
# * it is **compute-aware**: it knows the FLOPs per token of every candidate and steers the expected cost of the
#   architecture towards a budget (here 65% of the source model's);
# * it can **start from a pretrained checkpoint**: each candidate starts as the checkpoint's sublayer of its kind,
#   so the search fine-tunes a BERT instead of training from nothing.
#
# This notebook runs a search, watches its probabilities move (the heat-map), reads off the layout it found and
# its FLOPs, then trains that layout and the serial baseline for the same number of steps and compares accuracy and
# step time.
#
# Presets: `tpu` / `gpu` search BERT-base's 24 sublayer positions while fine-tuning it on GLUE SST-2 (600 steps),
# then fine-tune each model for 600 steps. `cpu_tiny` searches the 6 positions of a small 3-layer encoder trained
# from scratch on the embedded data (docstrings of nine standard-library packages, labelled by package: chance is
# 1/9), a few hundred steps, to run in about a minute on two CPU cores; its numbers show the machinery at work, not
# which architecture is best (see the caveats at the end).

# %% tags=["parameters"]
PRESET = "auto"          # auto | tpu | gpu | cpu_tiny
WORKDIR = "runs/colabs"  # where the notebook writes its files
JAXFORMERS_SOURCE = ""   # git URL of this repository, or an uploaded wheel; "": an uploaded jaxformers_encoders-*.whl

# %% [markdown]
# ## Install
#
# On a fresh Colab runtime (TPU or GPU) this cell installs jaxformers from `JAXFORMERS_SOURCE`: a git URL of this
# repository (cloned into `jaxformers-src/`, installed editable, the notebook then runs from it), or a wheel built
# with `python -m build` and uploaded to the runtime's files (found without setting anything; it holds the package,
# not the checkout's `benchmarks/`). The runtime's jax, jaxlib, libtpu and CUDA libraries are pinned to the versions
# it came with, so the install cannot break the accelerator. An unrelated package also called `jaxformers` on the
# package index (this project's distribution is `jaxformers-encoders`) is recognised and replaced. Where this
# project is already importable (a local checkout, CI) the cell does nothing.

# %%
import glob
import importlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys

MARKER = '__project__ = "jaxformers-encoders"'   # jaxformers/__init__.py of this project


def this_jaxformers() -> bool:
  """Whether the importable jaxformers is this project (not the unrelated "jaxformers" of the package index)."""
  spec = importlib.util.find_spec("jaxformers")
  return bool(spec and spec.origin) and MARKER in open(spec.origin, encoding="utf-8").read()


if importlib.util.find_spec("jaxformers") is not None and not this_jaxformers():
  print("the importable jaxformers is an unrelated package of the same name: uninstalling it")
  subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", "jaxformers"], check=True)
  importlib.invalidate_caches()
if not this_jaxformers():
  wheels = sorted(glob.glob("jaxformers_encoders-*.whl") + glob.glob("/content/jaxformers_encoders-*.whl"))
  source = JAXFORMERS_SOURCE or (wheels[-1] if wheels else "")
  if not source:
    raise RuntimeError("jaxformers is not installed: set JAXFORMERS_SOURCE in the first cell to this repository's "
                       "git URL, or upload a wheel built from it (python -m build: dist/jaxformers_encoders-*.whl)")
  # the runtime's jax, jaxlib, libtpu and CUDA libraries stay exactly as they are: pip may not move them
  keep = sorted(f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()
                if (d.metadata["Name"] or "").lower().startswith(("jax", "libtpu", "nvidia-"))
                and not (d.metadata["Name"] or "").lower().startswith("jaxformers"))
  with open("/tmp/jaxformers-keep.txt", "w") as f:
    f.write("\n".join(keep) + "\n")
  pip = [sys.executable, "-m", "pip", "install", "-q", "-c", "/tmp/jaxformers-keep.txt"]
  if source.endswith(".whl"):    # the package only: notebooks 1, 3, 4 and 5 also need the checkout's benchmarks/
    subprocess.run(pip + [f"{source}[torch,tfds,study]"], check=True)
  else:
    if not os.path.isdir("jaxformers-src"):
      subprocess.run(["git", "clone", "--depth", "1", source.removeprefix("git+"), "jaxformers-src"], check=True)
    subprocess.run(pip + ["-e", "./jaxformers-src[torch,tfds,study]"], check=True)
    os.chdir("jaxformers-src")
    sys.path.insert(0, os.getcwd())
  importlib.invalidate_caches()
  if not this_jaxformers():
    raise RuntimeError(f"installed jaxformers from {source}, but the importable one is still not this project")

# %% [markdown]
# ## The preset
#
# `jaxformers.colab.preset` holds every notebook's settings per runtime; `P.search` is this notebook's: the source
# model, the data, the budgets of the search and of the trainings afterwards.

# %%
import json
import sys

import jax
import numpy as np

import jaxformers
from jaxformers import colab
from jaxformers.train import base_config, run

P = colab.preset(PRESET)
S = P.search
OUT = colab.workdir(WORKDIR, "04_search", P)
ROOT = colab.repo_root()
sys.path.insert(0, str(ROOT))  # benchmarks/ lives in the checkout, beside the package
from benchmarks.search import step_time_ratio

print(f"preset {P.name} on {jax.default_backend()}: {jax.devices()}")
print(json.dumps(S, indent=1))

# %% [markdown]
# ## One configuration for every run
#
# The search and the three trainings after it share data, sequence length, batch size, optimiser and seed; only the
# layout, the starting weights and the number of steps differ. The configuration has the keys of
# `python train.py --config ...` (all of them, with their defaults, are in `jaxformers/train/defaults.py`).
# With a checkpoint (`tpu` / `gpu`) every run starts from it and uses its tokenizer; without one (`cpu_tiny`) the
# model is built from the preset's shapes, and the runs after the search reuse the WordPiece vocabulary the search
# learnt, so that all of them read the same token ids.

# %%
if S["data"] == "tfds":
  import tensorflow_datasets as tfds
  tfds.builder(f"glue/{S['glue_task']}", file_format="array_record").download_and_prepare()


def config(steps, layout="", init_from=S["checkpoint"], tokenizer=""):
  """A training run of ``steps`` steps: from ``init_from`` (its layout unless ``layout`` is given), or from scratch
  with the preset's model (``layout`` or the preset's)."""
  c = base_config()
  c.init_from = init_from
  if not init_from:
    for key, value in S["model"].items():
      c.model[key] = value
    c.data.vocab_size = S["vocab_size"]
  c.model.layout = layout or ("" if init_from else S["model"]["layout"])
  c.model.dtype = S["dtype"]
  if S["data"] == "tfds":
    c.data.source, c.data.glue_task = "tfds", S["glue_task"]
  else:
    c.data.source = "embedded"
  c.data.tokenizer = tokenizer
  c.data.max_length = S["max_length"]
  c.data.batch_size = S["batch_size"]
  c.optim.lr = S["lr"]
  c.optim.warmup_ratio = 0.1
  c.train.num_steps = steps
  c.train.eval_every = 0              # evaluate once, at the end
  c.train.checkpoint_every = steps
  c.train.log_every = max(1, steps // 20)
  return c

# %% [markdown]
# ## The search space
#
# The search turns the source model into a **supernet**: each sublayer position (a serial layer has two, its
# attention and its feed-forward) becomes a choice between the candidates `attention`, `ffn` and `identity`. Each
# candidate is an ordinary sublayer with its residual connection and LayerNorm; `identity` passes its input on.
# A position's output is the candidates' outputs weighted by a **Gumbel-softmax** of that position's architecture
# logits, `softmax((logits + Gumbel noise) / tau)`: noisy, so that every candidate keeps getting trained, and
# sharper as the temperature `tau` anneals. From a checkpoint, the attention candidate at both positions of layer *i*
# starts as layer *i*'s attention and the `ffn` candidate as layer *i*'s feed-forward.
#
# **Bi-level optimisation.** The weights and the architecture are learnt on different data. A fixed random 20% of
# the training examples is held out. Every step updates the weights (AdamW) on a training batch with the logits
# fixed; after a warm-up with the architecture frozen (the candidates first learn something worth choosing between),
# every `arch_every` steps the logits (their own Adam) are updated on a held-out batch with the weights fixed. The
# architecture is chosen for what generalises, not for what fits the training batch. Both updates run in one
# jitted, sharded train step, and an interrupted search resumes exactly where it stopped.
#
# **Compute-aware objective.** Each candidate's forward FLOPs per token are counted from the model's shapes at the
# run's sequence length *L* (hidden size *d*, feed-forward size *F*): attention `8d² + 4Ld`, ffn `4dF`, identity 0.
# The architecture loss is the held-out loss plus `cost_weight * max(0, E[FLOPs] / FLOPs(source) - target)`, the
# expected cost under the current probabilities relative to the source layout's.
#
# **Identity guard.** Differentiable searches are known to collapse onto parameter-free skips: they cost nothing,
# and they need no training to be as good as they will ever be. A second penalty,
# `identity_weight * max(0, mean P(identity) - max_identity)`, and the read-off at the end keep at most
# `max_identity` (half) of the positions identity.

# %%
sc = config(S["search_steps"])
sc.train.log_every = 1                # every step's probabilities, for the heat-map
s = sc.search
s.enabled = True
s.candidates = S["candidates"]
s.target_flops_ratio = S["target"]
s.warmup_steps = S["warmup_steps"]
s.arch_every = S["arch_every"]
s.arch_lr = S["arch_lr"]
s.heldout_batch_size = S["heldout_batch_size"]
print(f"source: {S['checkpoint'] or S['model']['layout'] + ' from scratch'}; {sc.train.num_steps} steps")
print(s)

# %% [markdown]
# ## Run the search
#
# `jaxformers.train.run(config, workdir)` is what `python train.py` calls. A search writes, besides the usual
# checkpoints and `metrics.jsonl`: `summary.json["search"]` (the found layout, the final probabilities, the FLOPs),
# `search_heatmap.png`, and `derived/`, the found layout as an ordinary checkpoint holding exactly the chosen
# candidates' weights. Running the cell again resumes an unfinished search or reports the finished one.

# %%
search_dir = OUT / "search"
summary = run(sc, search_dir)
found = summary["search"]
print(f"found {found['layout']}: {100 * found['flops_ratio']:.1f}% of {found['source_layout']}'s FLOPs per token")

# %% [markdown]
# ## Watching it: expected cost, temperature, losses
#
# Every log line in `metrics.jsonl` carries the expected FLOPs ratio, the temperature, every position's
# probabilities (`arch/p{i}/{candidate}`) and, on steps that updated the architecture, the held-out loss
# (`arch_loss`). During the warm-up the probabilities are uniform and the expected cost sits where uniform
# probabilities put it. Once the architecture learns, the cost penalty pushes the expected cost down towards the
# target (dashed); it acts only above the target, so below it the held-out loss (and the identity guard) alone
# decides.

# %%
import matplotlib.pyplot as plt

records = [json.loads(line) for line in (search_dir / "metrics.jsonl").read_text().splitlines()]
train_recs = [r for r in records if r["kind"] == "train"]
steps = [r["step"] for r in train_recs]
fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(13, 3.4))
a1.plot(steps, [r["expected_flops_ratio"] for r in train_recs])
a1.axhline(S["target"], color="gray", ls="--", lw=0.8, label="target")
a1.axvline(S["warmup_steps"], color="gray", ls=":", lw=0.8, label="end of warm-up")
a1.set_xlabel("step"), a1.set_ylabel("E[FLOPs] / FLOPs(source)"), a1.set_title("expected cost"), a1.legend()
a2.plot(steps, [r["temperature"] for r in train_recs], color="tab:purple")
a2.set_xlabel("step"), a2.set_title("Gumbel-softmax temperature"), a2.set_yscale("log")
a3.plot(steps, [r["loss"] for r in train_recs], lw=0.8, label="weights: training batch")
arch = [r for r in train_recs if "arch_loss" in r]
a3.plot([r["step"] for r in arch], [r["arch_loss"] for r in arch], ".", ms=3, label="architecture: held-out batch")
a3.set_xlabel("step"), a3.set_title("loss"), a3.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## The heat-map
#
# One panel per candidate; each row is a sublayer position (the input side at the top: positions 0 and 1 are the
# first layer's attention and feed-forward slots), each column a step, the colour that candidate's probability.
# Read it across a row: a position is decided when one panel turns bright and the others dark. Uniform colour up to
# the end of the warm-up is the frozen architecture; rows that are still mid-coloured at the end are positions the
# search has not made up its mind about, and their read-off is weakly determined.

# %%
from IPython.display import Image, Markdown, display

display(Image(filename=found["heatmap"]))

# %% [markdown]
# ## The found layout
#
# The read-off takes each position's most probable candidate (at most `max_identity` of the positions may be
# identity: beyond that the identities with the smallest lead give way to their runner-up), drops the identities,
# and writes an attention position followed by an `ffn` one as a `serial` block. Its FLOPs per token come from the
# same cost model, for the layout actually chosen rather than in expectation.

# %%
cands = found["candidates"]
probs = np.asarray(found["probabilities"])
rows = ["| position | " + " | ".join(f"P({c})" for c in cands) + " | chosen |", "|---" * (len(cands) + 2) + "|"]
for p, (row, pick) in enumerate(zip(probs, found["chosen"])):
  note = "" if pick == cands[int(row.argmax())] else " (identity cap)"
  rows.append(f"| {p} | " + " | ".join(f"{x:.2f}" for x in row) + f" | **{pick}**{note} |")
display(Markdown("\n".join(rows)))

derived_cfg = jaxformers.from_pretrained(found["derived_dir"]).config
L, d, F = found["sequence_length"], derived_cfg.hidden_size, derived_cfg.intermediate_size
print(f"cost model at L={L}, d={d}, F={F}: attention {8 * d * d + 4 * L * d:,.0f}, ffn {4 * d * F:,.0f}, "
      f"identity 0 FLOPs per token and position")
print(f"source {found['source_layout']}: {found['source_flops_per_token']:,.0f} FLOPs/token")
print(f"found  {found['layout']}: {found['flops_per_token']:,.0f} FLOPs/token = {found['flops_ratio']:.3f} of the "
      f"source (expected under the final probabilities: {found['expected_flops_ratio']:.3f}, target {S['target']})")
print("train the derived checkpoint from a shell:", found["train_command"])

# %% [markdown]
# ## Train what was found, and the serial baseline
#
# Three models, each trained for the same number of steps on all the training examples and evaluated on the
# validation split, which the search never saw:
#
# * **serial**: the source layout, from the source's starting point (the pretrained checkpoint, or a fresh
#   initialisation with the same seed);
# * **found**: the found layout from the same starting point (from a checkpoint, layer *i*'s weights re-arranged
#   into block *i*, as in notebook 1): does the architecture train as well as the serial one?
# * **derived**: `derived/`, the supernet's chosen candidates with their searched weights, trained further (what
#   `search.then_train=True` does in one run). It has had the search's steps on top of these.

# %%
tokenizer = "" if S["checkpoint"] else str(search_dir)   # from scratch: the search's vocabulary
T = S["train_steps"]
configs = {"serial": config(T, tokenizer=tokenizer),
           "found": config(T, layout=found["layout"], tokenizer=tokenizer),
           "derived": config(T, init_from=found["derived_dir"])}
results = {name: run(c, OUT / name) for name, c in configs.items()}
acc_key = next(k for k in results["serial"]["eval"] if k.endswith("accuracy"))
for name, r in results.items():
  print(f"{name:<8} {acc_key} {r['eval'][acc_key]:.4f}  ({r['wall_time_s']:.0f} s with compilation)")

# %% [markdown]
# ## Step time
#
# FLOPs are counted; time is measured. `benchmarks/search.py`'s `step_time_ratio` compiles one train step of each
# model and times them interleaved on the same fixed batch (medians), so that drift on a shared machine hits both
# alike. The derived model has the found layout, so it has the found model's step time.

# %%
t_serial, t_found, ratio = step_time_ratio(configs["serial"], configs["found"], OUT / "timing", reps=S["reps"])
step_ms = {"serial": 1e3 * t_serial, "found": 1e3 * t_found, "derived": 1e3 * t_found}
print(f"train step: serial {step_ms['serial']:.1f} ms, found {step_ms['found']:.1f} ms ({ratio:.2f}x)")

# %%
layouts = {"serial": found["source_layout"], "found": found["layout"], "derived": found["layout"]}
flops = {"serial": 1.0, "found": found["flops_ratio"], "derived": found["flops_ratio"]}
start = {"serial": S["checkpoint"] or "fresh initialisation", "derived": "the supernet's weights"}
start["found"] = start["serial"]
table = ["| model | layout | starts from | steps | FLOPs/token vs serial | train step (ms) | " + acc_key + " |",
         "|---|---|---|---|---|---|---|"]
for name, r in results.items():
  n = f"{S['search_steps']} (search) + {T}" if name == "derived" else str(T)
  table.append(f"| {name} | `{layouts[name]}` | {start[name]} | {n} | {flops[name]:.3f} | {step_ms[name]:.1f} | "
               f"{r['eval'][acc_key]:.4f} |")
display(Markdown("\n".join(table)))

fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.2))
names = list(results)
colours = ["tab:orange", "tab:blue", "tab:green"]
a1.bar(names, [results[n]["eval"][acc_key] for n in names], color=colours)
a1.set_ylabel(acc_key), a1.set_title(f"after {T} training steps (derived: after the search's too)")
a2.bar(names, [step_ms[n] for n in names], color=colours)
a2.set_ylabel("ms per train step"), a2.set_title(f"batch {S['batch_size']} x {S['max_length']} tokens, "
                                                  f"{jax.default_backend()}")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Reading the result, honestly
#
# * **The probabilities move only part of the way in a short search.** A position whose winner has, say, 0.4
#   against 0.35 is a coin toss that a different seed or a few more steps can flip (the README's study ran three
#   seeds and found three layouts). Look at the heat-map before trusting a read-off.
# * **FLOPs are not time.** The cost model counts the sublayers' matrix products. Embeddings, the classifier, the
#   optimiser update and, on a CPU at this width, dispatch overhead are the same for every layout, so the measured
#   step shrinks less than the FLOPs.
# * **Equal steps, unequal histories.** `found` and `serial` get the same steps from the same start, which isolates
#   the architecture. `derived` has also had the search's steps, and a search step costs several serial steps (the
#   supernet runs every candidate, and the architecture update a second forward and backward pass), so its lead,
#   if any, is bought with compute that the table does not show.
# * **Few steps, small data.** After a few hundred steps none of these models has converged; the comparison says
#   which trains faster from here, not which is better when trained to the end.
# * **Not PAR's pattern.** PAR kept the feed-forward sublayers and dropped attention in the upper layers. With
#   this cost model a feed-forward sublayer (`4dF = 16d²` at `F = 4d`) costs about twice an attention sublayer at
#   short sequences (`8d² + 4Ld`), so a FLOPs budget is met most cheaply by dropping feed-forward sublayers, and at
#   small scale from scratch the searches in this repository mostly do that.

# %%
top = probs.max(axis=1)
undecided = int((top < 0.5).sum())
print(f"largest probability per position: {np.round(top, 2).tolist()}; {undecided} of {len(top)} positions below 0.5")
gap = results["found"]["eval"][acc_key] - results["serial"]["eval"][acc_key]
print(f"found vs serial after {T} steps from the same start: {100 * gap:+.1f} points of {acc_key}, "
      f"{found['flops_ratio']:.2f}x the FLOPs per token, {ratio:.2f}x the step time")
