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
# # Layout study: how much accuracy does each block layout keep, at what speed?
#
# Notebook 1 showed that one checkpoint can be re-arranged into any block layout, and that Fourier and PAR layouts
# run faster. They also compute a different function than the one the weights were trained for. This notebook runs
# the layout study (`benchmarks/study.py`) that measures the trade: for each layout and recipe it fine-tunes the
# re-arranged source model on the same labelled data, with the same steps, learning rate and seed, then measures
# every fine-tuned model in one process.
#
# * **direct**: re-arrange the checkpoint and fine-tune (the FNet-from-BERT recipe);
# * **healed**: re-arrange, first *heal* the new layout by distillation from the unchanged source on the task's
#   unlabelled texts (hidden states at every layer, plus the MiniLM attention and value relations where the
#   student has attention), then fine-tune.
#
# Measured per cell: the held-out accuracy, inference tokens/s of the fine-tuned classifier, train tokens/s,
# parameters and FLOPs per token. The source's own layout with recipe `direct` is the reference.
#
# Presets: `tpu` / `gpu` study all-MiniLM-L6-v2 (6 serial layers) in five layouts with a few hundred steps per cell.
# `cpu_tiny` trains a small 3-layer source from scratch first and studies two layouts with a few dozen steps, to
# run in about two minutes; its numbers show that the machinery works, not which layout is best (the full run's
# result is shown at the end).

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
# ## The preset and the source model

# %%
import jax

from jaxformers import colab
from jaxformers.train import base_config, run

P = colab.preset(PRESET)
S = P.study
OUT = colab.workdir(WORKDIR, "03_layout_study", P)
ROOT = colab.repo_root()
sys.path.insert(0, str(ROOT))  # benchmarks/ lives in the checkout, beside the package
from benchmarks import study

print(f"preset {P.name} on {jax.default_backend()}: {S}")

# %% [markdown]
# With a pretrained checkpoint in the preset the study starts from it. Otherwise (`cpu_tiny`) a small serial encoder
# is trained here from scratch on the embedded data (docstrings of nine standard-library packages, labelled by
# package: chance 1/9), and becomes the source whose layout the study changes.

# %%
if S["checkpoint"]:
  source = S["checkpoint"]
else:
  src = S["scratch"]
  c = base_config()
  c.model.layout = src["layout"]
  c.model.hidden_size, c.model.num_heads, c.model.intermediate_size = (src["hidden_size"], src["num_heads"],
                                                                       src["intermediate_size"])
  c.model.max_position_embeddings = S["max_length"] + 2
  c.data.vocab_size, c.data.max_length, c.data.batch_size = src["vocab_size"], S["max_length"], S["batch_size"]
  c.optim.lr, c.train.num_steps, c.train.checkpoint_every = src["lr"], src["steps"], src["steps"]
  c.train.progress, c.train.async_checkpoint = False, False
  source = str(OUT / "source")
  summary = run(c, source)
  print(f"source {src['layout']} trained for {src['steps']} steps: {summary['eval']}")
print("source:", source)

# %% [markdown]
# ## Run the study
#
# `study.main` takes the script's command-line arguments. It writes `study.json` after every cell, so rerunning
# this cell skips the finished cells (and refuses a different budget in the same directory); the fine-tuning and
# healing runs live in `cells/<layout>-<recipe>/`.

# %%
argv = ["--init_from", source, "--data", "embedded", "--workdir", str(OUT / "study"), "--layouts", S["layouts"],
        "--recipes", S["recipes"]]
for key in ("heal_steps", "finetune_steps", "max_length", "batch_size", "max_train_examples", "lr", "heal_lr",
            "infer_batch", "repeats"):
  argv += [f"--{key}", str(S[key])]
print("python benchmarks/study.py " + " ".join(argv))
result = study.main(argv)

# %% [markdown]
# ## The table
#
# `% of ref` is each cell's accuracy relative to the reference, `speed-up` its layout's inference speed (the
# median over the layout's cells: its recipes give one architecture) relative to the reference's. "Gap closed"
# says how much of the accuracy the direct recipe lost healing wins back.

# %%
from IPython.display import Image, Markdown, display

display(Markdown((OUT / "study" / "study.md").read_text()))

# %% [markdown]
# ## The plot
#
# Accuracy against inference speed: the good layouts are up and to the right of the starred reference. Circles are
# the direct recipe, triangles the healed one.

# %%
display(Image(filename=str(OUT / "study" / "study.png")))

# %%
cells = result["cells"]
ref = cells[result["reference"]]
for key, cell in cells.items():
  print(f"{key:<32} accuracy {cell['metric']:.4f} ({100 * cell['metric'] / ref['metric']:5.1f}% of ref), "
        f"{cell['speedup']:.2f}x inference speed")

# %% [markdown]
# ## The full runs, for comparison
#
# The repository's README records the study on five real tasks: all-MiniLM-L6-v2 as the source, 100 healing steps,
# 200 to 800 fine-tuning steps (`--budget auto` where marked), 3 seeds a cell, on a 2-core CPU. Keeping >= 95% of
# the source's accuracy at >= 1.5x its inference speed is met on every task: by `ffn*4,attention*2` healed and
# distilled on the two tweet tasks (97% at 1.75-1.78x), by `serial,ffn*3,attention*2` (the source's first layer
# kept whole) on Rotten Tomatoes, IMDB and the embedded set (95-97% at 1.51-1.54x); on the tweet tasks the latter
# keeps 98.6-98.7% at 1.53-1.56x. The FNet hybrid `fourier*4,serial*2` is less accurate and slower than
# `ffn*4,attention*2`.

# %%
recorded = ROOT / "docs" / "study_summary.png"
if recorded.is_file():
  display(Image(filename=str(recorded)))
