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
# # Compression: prune and quantize a fine-tuned encoder, and what it buys
#
# A fine-tuned encoder is usually deployed for a long time and called many times, so its inference cost matters
# more than its training cost. There are two common ways to make it cheaper without training a new model:
#
# * **pruning** removes parts of the network. *Structured* pruning removes whole attention heads and feed-forward
#   neurons: the weight matrices get smaller, so every device runs fewer multiply-adds. *Magnitude* (unstructured)
#   pruning sets the smallest individual weights to zero: the matrices keep their shape, and dense hardware (a CPU's
#   vector units, a GPU's tensor cores, a TPU's matrix unit) multiplies the zeros like any other number;
# * **quantization** stores the weights in fewer bits. Here: post-training *dynamic* int8, each dense layer's kernel
#   as int8 with one scale per output channel, its input quantised per token at run time, int8 x int8 products
#   accumulated in int32.
#
# Both cost accuracy. This notebook fine-tunes a classifier, scores how much each attention head matters, removes
# half of the heads and 30% of the feed-forward neurons, heals the pruned model by distillation from the original,
# quantizes, and measures accuracy, inference speed and size of each variant. The last step saves the compressed
# model and loads it back.
#
# Presets: `tpu` / `gpu` fine-tune BERT-base for a few hundred steps. `cpu_tiny` (what CI runs) trains a small
# 3-layer classifier from scratch instead (600 steps, about half a minute); its numbers show that every step works,
# not how much compression costs a real model (see the caveats and the full CPU run at the end).

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

# %%
import time

import jax
import numpy as np
from flax import nnx

import jaxformers
from jaxformers import colab, models, prune
from jaxformers.quant import dir_bytes, quantize, size_report
from jaxformers.train import base_config, run

P = colab.preset(PRESET)
S = P.compression
OUT = colab.workdir(WORKDIR, "06_compression", P)
sys.path.insert(0, str(colab.repo_root()))  # benchmarks/ lives in the checkout, beside the package
from benchmarks.common import interleaved_medians, table

print(f"preset {P.name} on {jax.default_backend()}: {jax.devices()}")
print(S)

# %% [markdown]
# ## 1. The model to compress
#
# The data is the repository's embedded classification task: docstrings of nine standard-library packages,
# labelled by package (1805 training and 262 validation examples; chance is 1/9). With a checkpoint in the preset
# it is fine-tuned from that checkpoint with the trainer; on `cpu_tiny` a small encoder (and a WordPiece tokenizer)
# is trained from scratch on the same data. Either way the result, a run directory, is the float32 reference that
# everything below is compared with.

# %%
def train_config(steps, lr):
  c = base_config()
  c.task = "classification"
  c.data.max_length, c.data.batch_size = S["max_length"], S["batch_size"]
  c.optim.lr, c.train.num_steps = lr, steps
  c.train.checkpoint_every, c.train.keep, c.train.log_every = steps, 1, max(1, steps // 5)
  c.train.progress, c.train.async_checkpoint = False, False
  return c


c = train_config(S["finetune_steps"], S["lr"])
if S["checkpoint"]:
  c.init_from = S["checkpoint"]
  c.model.layout = ""                         # keep the checkpoint's layout
else:
  src = S["scratch"]
  c.model.layout = src["layout"]
  c.model.hidden_size, c.model.num_heads, c.model.intermediate_size = (src["hidden_size"], src["num_heads"],
                                                                       src["intermediate_size"])
  c.model.max_position_embeddings = S["max_length"] + 2
  c.data.vocab_size = src["vocab_size"]
ref_dir = OUT / "reference"
t0 = time.time()
summary = run(c, ref_dir)
print(f"trained {S['finetune_steps']} steps in {time.time() - t0:.0f} s: {summary['eval']}")
fp32 = jaxformers.from_pretrained(ref_dir)
tok = jaxformers.load_tokenizer(ref_dir)
print(fp32.config.layout, f"{prune.count_params(fp32) / 1e6:.2f} M parameters")

# %% [markdown]
# ### Measuring a model
#
# Every variant is measured the same way: accuracy on the validation set, and inference examples/s on one fixed
# batch (`infer_batch` x `max_length` tokens, the validation set's first examples padded to the full length), the
# compiled forward passes of all variants timed in interleaved rounds (medians), so that a change in the machine's
# load hits them all alike. The batches have one shape, so each model compiles once.

# %%
from jaxformers.data import tokenize
from jaxformers.train.tasks import make_task

val = tokenize.encode(tok, make_task(c).examples("validation"), S["max_length"])
labels, B, L, pad = np.asarray(val.label), S["infer_batch"], S["max_length"], fp32.config.pad_token_id
val_batches = []
for s in range(0, len(val.ids), B):
  ids, types, mask = np.full((B, L), pad, np.int32), np.zeros((B, L), np.int32), np.zeros((B, L), np.int32)
  for r, i in enumerate(range(s, min(s + B, len(val.ids)))):  # the last batch is filled up with padding rows
    n = len(val.ids[i])
    ids[r, :n], types[r, :n], mask[r, :n] = val.ids[i], val.type_ids[i], 1
  val_batches.append((ids, mask, types))


def forward(model):
  """The model's compiled forward pass on one [B, L] batch."""
  graph, state = nnx.split(model)
  f = jax.jit(lambda state, ids, mask, types: nnx.merge(graph, state)(ids, mask, types))
  return lambda batch: f(state, *batch)


def accuracy(model):
  f = forward(model)
  pred = np.concatenate([np.asarray(f(b)).argmax(-1) for b in val_batches])[:len(labels)]
  return float(np.mean(pred == labels))


print(f"{len(labels)} validation examples in {len(val_batches)} batches of {B} x {L}; "
      f"reference accuracy {accuracy(fp32):.4f}")

# %% [markdown]
# ## 2. Which heads matter? Taylor importance
#
# Michel et al. ("Are Sixteen Heads Really Better than One?", 2019) put a gate `g_h` on each head's output and score
# the head by `|dL/dg_h|` at `g = 1`, summed over a sample of training data: a first-order (Taylor) estimate of how
# much the loss changes when the head is removed. No gate has to be built: a head's output enters the attention's
# output projection through its own rows, so `dL/dg_h = sum(W_out[rows of h] * dL/dW_out[rows of h])`, and one
# gradient of the loss with respect to the parameters scores every head (and, with the down projection, every
# feed-forward neuron). `prune.importance` does this over a few batches of labelled training examples.
#
# Head scores are normalised per layer and then ranked over the whole model, so a layer can lose more heads than
# another: `heads=0.5` removes the lower-scoring half of all heads. Feed-forward neurons are ranked within each
# layer (`ffn=0.3` removes 30% of every layer's).

# %%
train_examples = make_task(c).examples("train")
score_batches = prune.sample_batches(tok, train_examples, n=S["score_examples"], max_length=L, batch_size=32,
                                     pad_id=pad)
t0 = time.time()
scores = prune.importance(fp32, score_batches)
keep_heads, keep_ffn = prune.plan(fp32, scores, heads=S["heads"], ffn=S["ffn"])
print(f"scored {scores.examples} examples in {time.time() - t0:.1f} s")

# %%
import matplotlib.pyplot as plt

layers = sorted(scores.heads)
H = max(len(scores.heads[i]) for i in layers)
grid = np.full((len(layers), H), np.nan)
for r, i in enumerate(layers):
  s = scores.heads[i]
  grid[r, :len(s)] = s / (np.linalg.norm(s) or 1.0)          # per-layer L2 normalisation, as the ranking does
fig, ax = plt.subplots(figsize=(min(12, 2 + 0.6 * H), 1 + 0.45 * len(layers)))
im = ax.imshow(grid, cmap="viridis", aspect="auto")
for r, i in enumerate(layers):
  for h in sorted(set(range(len(scores.heads[i]))) - set(keep_heads[i].tolist())):
    ax.text(h, r, "x", ha="center", va="center", color="white", fontsize=12, fontweight="bold")
ax.set_xticks(range(H)), ax.set_yticks(range(len(layers)), [f"layer {i}" for i in layers])
ax.set_xlabel("head"), ax.set_title(f"head importance (normalised per layer); x = removed at heads={S['heads']}")
fig.colorbar(im, ax=ax, shrink=0.8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 3. Prune: heads -50%, feed-forward -30%
#
# `prune.prune` cuts the removed heads' columns out of the query, key and value projections and their rows out of
# the output projection, and the removed neurons out of the up and down projections. The config records the new
# per-layer head counts and widths (`num_heads_per_layer`, `intermediate_sizes`): the result is an ordinary, smaller
# model that saves, loads and trains like any other. (`prune.prune_to(model, batches, heads=0.5, ffn=0.3)` does
# scoring, planning and cutting in one call.) Nothing was trained yet, so the accuracy drops.

# %%
pruned = prune.prune(fp32, keep_heads, keep_ffn)
print(prune.describe(pruned))
print("num_heads_per_layer", pruned.config.num_heads_per_layer, "intermediate_sizes", pruned.config.intermediate_sizes)
print(f"parameters {prune.count_params(fp32) / 1e6:.2f} M -> {prune.count_params(pruned) / 1e6:.2f} M; "
      f"accuracy {accuracy(fp32):.4f} -> {accuracy(pruned):.4f}")

# %% [markdown]
# ## 4. Heal by distillation
#
# The pruned model is trained a few more steps with the reference as its teacher: the task's loss plus the KL
# divergence to the teacher's soft labels and the mean squared error between the two models' hidden states
# (`distill.logits`, `distill.hidden`; the layers pair up one to one, the widths are the same). It is the ordinary
# trainer, started from the pruned checkpoint. The command line does the same in one command, optionally in several
# prune -> distil rounds:
#
# ```bash
# jaxformers prune REFERENCE_RUN pruned/ --heads 0.5 --ffn 0.3 --distill --steps 100 --rounds 2
# ```
#
# The healed model has seen more training steps than the reference; the README's full run also trains the float
# model for the same extra steps, the fairer comparison.

# %%
pruned_dir = OUT / "pruned"
jaxformers.save_pretrained(pruned, pruned_dir, overwrite=True, tokenizer=ref_dir)
h = train_config(S["heal_steps"], S["heal_lr"])
h.init_from, h.model.layout = str(pruned_dir), ""
h.data.tokenizer = str(ref_dir)
h.distill.teacher, h.distill.logits, h.distill.hidden = str(ref_dir), 1.0, 1.0
t0 = time.time()
run(h, OUT / "healed")
healed = jaxformers.from_pretrained(OUT / "healed")
print(f"healed {S['heal_steps']} steps in {time.time() - t0:.0f} s: accuracy {accuracy(healed):.4f}")

# %% [markdown]
# ## 5. int8: post-training dynamic quantization
#
# `jaxformers.quantize(model)` replaces every dense layer (attention projections, feed-forward, pooler, classifier)
# with an int8 one, as PyTorch's `quantize_dynamic` does with every `nn.Linear`: kernels rounded to int8 with one
# float scale per output channel, inputs quantised per token when the model runs. No data and no training is
# needed (post-training quantization, PTQ); embeddings and LayerNorms stay float. On the command line:
# `jaxformers quantize SRC DST`. Quantization-aware fine-tuning (`model.quant_aware=True` in the trainer) recovers
# what PTQ loses, when it loses something.
#
# The last variant stacks everything: the pruned and healed model, quantized. For comparison, magnitude pruning:
# the reference with the 50% smallest weights of its blocks' dense kernels set to zero (no fine-tuning here; in the
# trainer it is `optim.sparsity=0.5`, which keeps them at zero while fine-tuning).

# %%
int8 = quantize(fp32)
compressed = quantize(healed)
up = models.encoder_of(int8).blocks[0].mlp.up
print(f"block 0 feed-forward: kernel {up.kernel[...].dtype} {up.kernel[...].shape}, scale {up.kernel_scale[...].dtype}")

magnitude = jaxformers.from_pretrained(ref_dir)
params = nnx.state(magnitude, nnx.Param)
masks = prune.magnitude_masks(params, 0.5)
nnx.update(magnitude, jax.tree.map(lambda p, m: (p * m).astype(p.dtype), params, masks))
print(f"magnitude pruning: {prune.sparsity_report(magnitude)['total']:.0%} of the block kernels are zero")

# %% [markdown]
# ## 6. Accuracy, speed and size
#
# Memory is the bytes of the parameters; disk is the saved checkpoint's `params/`.

# %%
variants = {"fp32": fp32, "int8": int8, "magnitude 50%": magnitude, "pruned": pruned, "pruned + healed": healed,
            "pruned + healed + int8": compressed}
rows, fns = {}, {}
for name, m in variants.items():
  f, batch = forward(m), val_batches[0]
  fns[name] = lambda f=f, batch=batch: jax.block_until_ready(f(batch))
  d = OUT / "saved" / name.replace(" + ", "_").replace(" ", "_").replace("%", "")
  jaxformers.save_pretrained(m, d, overwrite=True)
  rows[name] = {"accuracy": accuracy(m), "params": prune.count_params(m), "bytes": size_report(m)["bytes"],
                "disk": dir_bytes(d / "params")}
for name, sec in interleaved_medians(fns, S["repeats"]).items():
  rows[name]["examples_per_s"] = B / sec
ref = rows["fp32"]
header = ["variant", "accuracy", "vs fp32 (points)", "examples/s", "speed-up", "params (M)", "memory (MB)",
          "disk (MB)"]
md = table(header, [[name, f"{r['accuracy']:.4f}", f"{100 * (r['accuracy'] - ref['accuracy']):+.1f}",
                     f"{r['examples_per_s']:.0f}", f"{r['examples_per_s'] / ref['examples_per_s']:.2f}x",
                     f"{r['params'] / 1e6:.3f}", f"{r['bytes'] / 1e6:.2f}", f"{r['disk'] / 1e6:.2f}"]
                    for name, r in rows.items()])
from IPython.display import Markdown, display

display(Markdown(f"{jax.default_backend()}, batch {B} x {L}, medians of {S['repeats']} rounds; accuracy on "
                 f"{len(labels)} validation examples\n\n" + md))

# %%
fig, ax = plt.subplots(figsize=(7.5, 4.5))
for name, r in rows.items():
  ax.scatter(r["examples_per_s"], r["accuracy"], s=40 + 400 * r["bytes"] / ref["bytes"], alpha=0.7,
             marker="*" if name == "fp32" else "o")
  ax.annotate(f"{name}\n{r['bytes'] / 1e6:.1f} MB", (r["examples_per_s"], r["accuracy"]), fontsize=8,
              xytext=(6, 4), textcoords="offset points")
ax.set_xlabel("inference examples/s"), ax.set_ylabel("validation accuracy")
ax.set_title(f"accuracy vs speed ({P.name} on {jax.default_backend()}); marker area ~ parameter bytes")
ax.margins(0.25)
fig.tight_layout()
plt.show()

# %% [markdown]
# ### What speed to expect, and why
#
# * **Magnitude pruning gives none.** Its row has the same parameters, memory and speed as fp32: the zeros are stored
#   and multiplied (only its checkpoint on disk is a little smaller, as orbax compresses what it writes and zeros
#   compress well). Sparse formats pay only at very high sparsity or with hardware patterns (NVIDIA's 2:4 structured
#   sparsity) that XLA does not use for these matmuls. It is a research tool (how much of a network can be zero),
#   not a deployment one.
# * **Structured pruning** removes work on every device: at heads -50% the attention's projections and score
#   computations halve, at ffn -30% the feed-forward matmuls shrink by 30%. The speed-up is less than the share of
#   removed weights because embeddings, LayerNorms, the classifier and the unchanged hidden size stay.
# * **int8 on a CPU**: XLA:CPU runs an int8 x int8 -> int32 matmul about twice as fast as float32, but the per-token
#   quantization of the inputs, the float attention, LayerNorms and GELU are not cheaper. On all-MiniLM-L6-v2 the
#   README measures 1.21x over fp32, against 2.7x for PyTorch's dynamic int8, which has hand-written fbgemm kernels.
# * **int8 on a GPU or TPU** (not measured in this project): the fair baseline there is bfloat16, not float32. TPU
#   v5e and v6e matrix units do int8 at about twice their bf16 rate, and recent NVIDIA GPUs have int8 tensor cores;
#   whether XLA's lowering of this dynamic scheme reaches them, and whether the quantization steps eat the gain at
#   the batch sizes used here, is what the `tpu` / `gpu` run of this notebook shows. The memory saving (int8 kernels
#   are a quarter of float32) holds everywhere and matters when serving is bound by memory bandwidth.
#
# **Caveats at the `cpu_tiny` budget.** The model is tiny (hidden size 64), so each forward pass takes a fraction of
# a millisecond and is dominated by fixed costs (dispatch, embeddings, normalisation) rather than the matmuls that
# compression shrinks: speed-ups are small, int8 can even be slower, and the timings are noisy on a shared machine.
# One validation example is 0.4 points of accuracy; the healing has 60 steps. None of these rows says how much
# compression costs a real model.

# %% [markdown]
# ## 7. Save the compressed model and load it back
#
# The pruned, healed, int8 model is a native checkpoint like any other: its config holds the head counts, widths
# and `quantization="int8"`, so `from_pretrained` rebuilds the same smaller int8 model, `encode` and the trainer's
# evaluation run it, and `load_tokenizer` finds the tokenizer saved beside it. (Export to a PyTorch checkpoint is
# refused for int8: transformers has no such BERT; a pruned float model exports with the removed heads as zeros.)

# %%
final_dir = OUT / "compressed"
jaxformers.save_pretrained(compressed, final_dir, overwrite=True, tokenizer=ref_dir)
back = jaxformers.from_pretrained(final_dir)
cfg = back.config
print(f"{final_dir}: {dir_bytes(final_dir) / 1e6:.2f} MB on disk; quantization {cfg.quantization}, "
      f"heads per layer {cfg.num_heads_per_layer}, widths {cfg.intermediate_sizes}")
a, b = forward(compressed)(val_batches[0]), forward(back)(val_batches[0])
print("reloaded logits equal:", bool(np.array_equal(np.asarray(a), np.asarray(b))))
assert np.array_equal(np.asarray(a), np.asarray(b))

print("tokenizer saved beside it:", jaxformers.load_tokenizer(final_dir).get_vocab_size(), "entries")
names = back.label_names or [str(k) for k in range(back.num_labels)]
texts = make_task(c).examples("validation").text_a
for r in range(4):                          # the first validation examples: predicted (true) package
  k = int(np.asarray(b)[r].argmax())
  print(f"{names[k]:>12} ({names[labels[r]]}): {' '.join(texts[r].split())[:80]}")

# %% [markdown]
# ## The full run on a CPU, for comparison
#
# `benchmarks/compression.py` (README, section Compression) runs the same methods on all-MiniLM-L6-v2 fine-tuned
# 120 steps on this data, with 60 healing steps each, and also quantization-aware training, bf16, and PyTorch's
# fp32 and dynamic int8 on the same weights. On a 2-core CPU it measured: int8 PTQ -0.4 points at 1.21x and 58.6 MB
# instead of 90.9 MB (the 47 MB word-embedding table stays float); heads -50% 1.26x, and -1.5 points without
# training, -0.8 after distillation; ffn -30% 1.2x; PyTorch's dynamic int8 2.7x.
