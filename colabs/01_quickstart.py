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
# # jaxformers quickstart: a PyTorch BERT in JAX, in every block layout
#
# This notebook takes a pretrained PyTorch checkpoint and walks through what jaxformers does with it:
#
# 1. **load** it into a JAX / Flax NNX encoder and check that it computes what transformers computes;
# 2. **re-arrange** the same weights into every block layout (serial, parallel, Fourier, sparse, PAR, ...) and time them;
# 3. **encode** a handful of texts with padding-free packed batches;
# 4. **export** the model back to a PyTorch checkpoint that transformers loads.
#
# Run it top to bottom on whatever runtime is attached (Runtime > Change runtime type): a TPU or GPU picks the
# `tpu` / `gpu` preset (BERT-base from the Hugging Face Hub), a CPU picks `cpu_tiny` (all-MiniLM-L6-v2, a 6-layer
# BERT, read offline when its weights package is installed). CI runs this notebook on `cpu_tiny`.

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
# `jaxformers.colab.preset` decides, in one place for all notebooks, which checkpoint, batch and budget fit the
# attached devices.

# %%
import jax
import numpy as np

import jaxformers
from jaxformers import colab

P = colab.preset(PRESET)
S = P.quickstart
OUT = colab.workdir(WORKDIR, "01_quickstart", P)
CKPT = S["checkpoint"]
print(f"preset {P.name} on {jax.default_backend()}: {jax.devices()}")
print(f"checkpoint {CKPT}")

# %% [markdown]
# ## 1. Load the checkpoint and check it against transformers
#
# `from_pretrained` reads `config.json` and the safetensors (or `.bin`) weights, maps every tensor to its place in
# the JAX model and refuses anything it cannot place. The same checkpoint loaded by transformers (PyTorch) must
# give the same hidden states on the real (non-padding) tokens. Matrix products run at full float32 precision
# here, so the difference is float32 rounding, about 1e-6.

# %%
import torch
import transformers
from transformers import AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained(CKPT)
model = jaxformers.from_pretrained(CKPT)
from flax import nnx

n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
print(f"{type(model).__name__}, layout {model.config.layout}, {n_params / 1e6:.1f}M parameters")

sentences = ["JAX compiles NumPy-like programs for accelerators.",
             "A transformer encoder turns each token into a vector that depends on its context.",
             "Short one."]
batch = tokenizer(sentences, padding=True, return_tensors="np")
with jax.default_matmul_precision("highest"):
  ours = np.asarray(model(batch["input_ids"], batch["attention_mask"]).last_hidden_state)

pt = transformers.AutoModel.from_pretrained(CKPT).eval()
with torch.no_grad():
  theirs = pt(**{k: torch.from_numpy(v) for k, v in batch.items()}).last_hidden_state.numpy()

real = batch["attention_mask"].astype(bool)
diff = np.abs(ours - theirs)[real].max()
print(f"max |jaxformers - transformers| over real tokens: {diff:.2e}")
assert diff < 1e-4, diff

# %% [markdown]
# ## 2. The same weights in every block layout
#
# A **layout** lists an encoder's blocks by depth (`jaxformers layouts` prints the grammar). Passing `layout=` to
# `from_pretrained` re-arranges the checkpoint: layer *i*'s weights go to block *i*, and each block takes what it
# has a place for (a Fourier block keeps the feed-forward and the norms but has no attention weights; a parallel
# block uses one LayerNorm; `ffn` / `attention` blocks take one sublayer each). Only the serial layout computes the
# checkpoint's function; the others are starting points for fine-tuning or healing (notebook 3 measures how much
# accuracy each keeps).
#
# Below: one layout per block type, plus three mixed ones, each timed as a jit-compiled forward on the same batch
# (medians of interleaved runs, so that drift hits every layout alike). Fourier blocks replace attention's
# matmuls by a DFT, PAR layouts drop attention from the last third of the layers; on the tiny `cpu_tiny` batch the
# times are short and noisy, on a TPU or GPU with the full batch they show what each block costs.

# %%
sys.path.insert(0, str(colab.repo_root()))  # benchmarks/ lives in the checkout, beside the package
from benchmarks.common import interleaved_medians
from jaxformers.layout import BLOCKS

L = model.config.num_layers
layouts = [f"{b}*{L}" for b in BLOCKS.names()]
layouts += [f"(attention,ffn)*{L}", f"fourier*{L - 2},serial*2", f"serial*{L - L // 3},ffn*{L // 3}"]

rng = np.random.default_rng(0)
ids = rng.integers(1000, model.config.vocab_size, size=(S["batch"], S["length"])).astype(np.int32)
mask = np.ones_like(ids)

fns, params = {}, {}
for lay in layouts:
  m = jaxformers.from_pretrained(CKPT, layout=lay)
  graph, state = nnx.split(m)
  fwd = jax.jit(lambda state, ids, mask, graph=graph: nnx.merge(graph, state)(ids, mask).last_hidden_state)
  compiled = fwd.lower(state, ids, mask).compile()
  fns[lay] = lambda c=compiled, s=state: jax.block_until_ready(c(s, ids, mask))
  params[lay] = sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
seconds = interleaved_medians(fns, S["repeats"], warmup=1)

tokens = ids.size
print(f"{'layout':<24} {'ms/batch':>9} {'tokens/s':>10} {'vs serial':>9} {'params (M)':>10}")
for lay in layouts:
  print(f"{lay:<24} {1e3 * seconds[lay]:9.1f} {tokens / seconds[lay]:10.0f} "
        f"{seconds[f'serial*{L}'] / seconds[lay]:8.2f}x {params[lay] / 1e6:10.2f}")

# %%
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(8, 4))
speed = [seconds[f"serial*{L}"] / seconds[lay] for lay in layouts]
ax.barh(layouts, speed, color=["tab:orange" if lay == f"serial*{L}" else "tab:blue" for lay in layouts])
ax.axvline(1.0, color="black", lw=0.8)
ax.invert_yaxis()
ax.set_xlabel(f"forward speed vs serial*{L} (batch {S['batch']}x{S['length']}, {jax.default_backend()})")
ax.set_title("the same checkpoint in every block layout")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 3. Encode texts with packing
#
# Real texts have very different lengths; padding every row to the longest wastes the compute spent on padding.
# `jaxformers.packing.pack` puts several texts into one fixed-size row, told apart by segment ids that every block
# honours (attention never crosses sequences, Fourier mixing transforms each sequence alone).
# `jaxformers.encode` packs, runs one compiled function over fixed-size chunks of rows and pools each text's tokens
# (for a sentence-transformers checkpoint with its own pooling and normalisation settings).

# %%
from jaxformers.packing import pack, padded_fraction

texts = [
    "The cat sat on the warm windowsill all afternoon.",
    "A kitten slept in the sun by the window.",
    "Dogs love to chase balls in the park.",
    "The stock market fell sharply after the announcement.",
    "Shares dropped as investors reacted to the central bank's decision on interest rates.",
    "Bond yields rose while equities slid.",
    "Compile the program once, then run it many times on the accelerator.",
    "XLA fuses operations to reduce memory traffic.",
    "Cats spend most of the day asleep, waking at dusk to hunt, groom themselves and ask loudly for dinner.",
]
token_ids = [tokenizer(t)["input_ids"] for t in texts]
lengths = [len(t) for t in token_ids]
packed = pack(token_ids, row_length=64)
print(f"{len(texts)} texts, lengths {lengths}")
print(f"padded: {len(texts)} rows x {max(lengths)}, {100 * padded_fraction(lengths):.0f}% padding; "
      f"packed: {packed.input_ids.shape[0]} rows x 64, {100 * packed.padding_fraction:.0f}% padding")

vectors = jaxformers.encode(CKPT, texts)
unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
similarity = unit @ unit.T
print("vectors", vectors.shape)

fig, ax = plt.subplots(figsize=(6, 5))
im = ax.imshow(similarity, cmap="viridis")
ax.set_xticks(range(len(texts)), [t[:18] + "..." for t in texts], rotation=60, ha="right", fontsize=7)
ax.set_yticks(range(len(texts)), [t[:18] + "..." for t in texts], fontsize=7)
fig.colorbar(im, ax=ax, label="cosine similarity")
ax.set_title("texts on one topic are closest")
fig.tight_layout()
plt.show()

# %% [markdown]
# The three topics (animals, markets, compilers) show up as blocks on the diagonal: each text is closest to a text
# on its own topic. The long text made padding expensive; packing fills the rows with other texts instead.

# %%
for i, t in enumerate(texts):
  j = max((k for k in range(len(texts)) if k != i), key=lambda k: similarity[i, k])
  print(f"{t[:45]:<45} -> {texts[j][:45]}")

# %% [markdown]
# ## 4. Export back to PyTorch
#
# `export_hf` writes `config.json`, `model.safetensors` and the tokenizer files, so transformers loads the model
# with nothing else. Serial and parallel layouts can be exported; Fourier, sparse and PAR layouts have no
# transformers counterpart and stay native (`save_pretrained`). The exported model must give the outputs the JAX
# model gives.

# %%
export_dir = OUT / "exported"
jaxformers.export_hf(model, export_dir, tokenizer=CKPT, overwrite=True)
print(sorted(p.name for p in export_dir.iterdir()))

back = transformers.AutoModel.from_pretrained(export_dir).eval()
with torch.no_grad():
  again = back(**{k: torch.from_numpy(v) for k, v in batch.items()}).last_hidden_state.numpy()
diff = np.abs(ours - again)[real].max()
print(f"max |exported (PyTorch) - jaxformers| over real tokens: {diff:.2e}")
assert diff < 1e-4, diff

# %% [markdown]
# ## Where next
#
# * `02_finetune.ipynb`: fine-tune a checkpoint on a classification task with the sharded trainer (checkpoints,
#   TensorBoard, predictions, export).
# * `03_layout_study.ipynb`: how much accuracy each layout keeps after fine-tuning, and how healing by distillation
#   helps.
# * `05_kernels.ipynb`: the Pallas attention kernels against XLA and cuDNN.
