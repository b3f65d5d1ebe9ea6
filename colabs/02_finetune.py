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
# # Fine-tune a pretrained encoder with the sharded trainer
#
# The trainer behind `python train.py --config ...` is a function, `jaxformers.train.run(config, workdir)`, so a
# notebook drives it directly. This notebook fine-tunes a pretrained BERT on a sentence classification task and
# shows what a run gives you:
#
# * one jitted training step over a `Mesh` of **all attached devices** (Colab's TPU v5e or v6e chip, a GPU, the
#   chips of a TPU VM, a CPU), data parallel, with bfloat16 compute on TPU;
# * **orbax checkpoints**, asynchronous, resumable (rerun the training cell: it resumes or says it is finished);
# * **metrics** in `metrics.jsonl` and TensorBoard event files, shown inline;
# * **predictions** on unlabelled texts, the run loaded as a model, and an **export** to a transformers checkpoint.
#
# Presets: `tpu` / `gpu` fine-tune BERT-base on GLUE SST-2 from tensorflow-datasets; `cpu_tiny` fine-tunes
# all-MiniLM-L6-v2 for a few steps on a small sentiment CSV this notebook writes, to run offline in about a minute.

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
# ## The preset and the devices

# %%
import json
import random

import jax
import numpy as np

import jaxformers
from jaxformers import colab
from jaxformers.train import base_config, run
from jaxformers.train.sharding import make_mesh

P = colab.preset(PRESET)
F = P.finetune
OUT = colab.workdir(WORKDIR, "02_finetune", P)
mesh = make_mesh()  # ("data", "fsdp") over every attached device: data parallel by default
print(f"preset {P.name}: {F}")
print(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.default_backend()} device(s): {jax.devices()}")

# %% [markdown]
# ## The data
#
# On an accelerator: GLUE SST-2 (movie review sentences, positive or negative) through tensorflow-datasets, read
# with `tfds.data_source` (array_record files; no TensorFlow needed at training time). On `cpu_tiny`: a small CSV
# of review-like sentences written here, read by the trainer's `files` source (CSV, TSV or JSONL with a column
# mapping). The evaluation sentences talk about other things than the training ones, so the score measures whether
# the model learnt the sentiment words rather than the subjects.

# %%
def review_rows(subjects, n, seed):
  good = ["was wonderful", "exceeded every expectation", "made the whole family smile", "was a real delight",
          "is excellent value", "worked perfectly", "was the best we have had", "felt warm and friendly"]
  bad = ["was a disappointment", "broke after a single day", "left everyone bored", "was truly terrible",
         "is a waste of money", "never worked properly", "was the worst we have had", "felt cold and rude"]
  tails = ["", ", honestly", " this time", ", as my friends agreed", " from start to finish"]
  rng = random.Random(seed)
  rows = []
  for _ in range(n):
    label = rng.randrange(2)
    rows.append({"sentence": f"{rng.choice(subjects)} {rng.choice(good if label else bad)}{rng.choice(tails)}.",
                 "label": ["negative", "positive"][label]})
  return rows


def write_csv(path, rows, columns):
  import csv
  with open(path, "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=columns)
    w.writeheader()
    w.writerows({k: r[k] for k in columns} for r in rows)


c = base_config()
if F["data"] == "tfds":
  import tensorflow_datasets as tfds
  tfds.builder(f"glue/{F['glue_task']}", file_format="array_record").download_and_prepare()
  c.data.source, c.data.glue_task = "tfds", F["glue_task"]
else:
  data = OUT / "data"
  data.mkdir(exist_ok=True)
  train_subjects = ["The film", "This phone", "The hotel", "Our dinner", "The concert", "That novel", "The laptop"]
  eval_subjects = ["The museum tour", "This blender", "The train journey", "Her new album", "The pizza"]
  write_csv(data / "train.csv", review_rows(train_subjects, 256, seed=0), ["sentence", "label"])
  write_csv(data / "validation.csv", review_rows(eval_subjects, 64, seed=1), ["sentence", "label"])
  write_csv(data / "test.csv", review_rows(eval_subjects, 8, seed=2), ["sentence"])
  c.data.source = "files"
  c.data.train_file, c.data.eval_file, c.data.test_file = (str(data / f) for f in ("train.csv", "validation.csv",
                                                                                    "test.csv"))
  c.data.text_a_column, c.data.label_column = "sentence", "label"
  c.data.num_labels, c.data.label_names = 2, "negative,positive"
  print((data / "train.csv").read_text().splitlines()[:4])

# %% [markdown]
# ## The configuration
#
# The same keys as `python train.py --config configs/glue.py ...` (all of them, with their defaults, are in
# `jaxformers/train/defaults.py`). `init_from` names the pretrained checkpoint (a Hub id or a directory) and its
# tokenizer; an empty `model.layout` keeps the checkpoint's layout (any other re-arranges it, as in notebook 1).
# `model.dtype` is the compute dtype: bfloat16 on TPU, parameters and optimizer state stay float32.

# %%
c.init_from = F["checkpoint"]
c.task = "classification"
c.model.layout = ""
c.model.dtype = F["dtype"]
c.data.max_length = F["max_length"]
c.data.batch_size = F["batch_size"]
c.data.eval_batch_size = 64
c.optim.lr = F["lr"]
c.optim.warmup_ratio = 0.1
c.train.num_steps = F["steps"]
c.train.eval_every = max(1, F["steps"] // 4)
c.train.checkpoint_every = max(1, F["steps"] // 2)
c.train.log_every = max(1, F["steps"] // 12)
c.mesh.data, c.mesh.fsdp = -1, 1      # all devices on the data axis; fsdp=-1 would shard the parameters instead
run_dir = OUT / "run"
print(f"fine-tune {c.init_from} (its own layout), dtype {c.model.dtype}, {c.train.num_steps} steps of "
      f"{c.data.batch_size} x {c.data.max_length} tokens, lr {c.optim.lr}")

# %% [markdown]
# ## Train
#
# The first step compiles; after that each step is one call of the compiled function. Evaluations run every
# `eval_every` steps; `DIR/best` keeps the checkpoint with the best validation accuracy. Running this cell again
# resumes from the newest checkpoint, or, as here once finished, reports the finished run.

# %%
summary = run(c, run_dir)
print(json.dumps({k: summary[k] for k in ("eval", "steps", "tokens_per_s", "wall_time_s", "mesh")
                  if k in summary}, indent=1))

# %% [markdown]
# ## Checkpoints
#
# `checkpoints/<step>` holds the full training state (parameters, AdamW moments, dropout streams, the data
# position), written by orbax; `best/` the best evaluation's. Kill the run at any point and the same call continues
# from the newest complete step.

# %%
for d in ("checkpoints", "best"):
  print(d, sorted(p.name for p in (run_dir / d).iterdir()))

# %% [markdown]
# ## Metrics: TensorBoard and `metrics.jsonl`
#
# The trainer writes TensorBoard event files to `DIR/tensorboard`; on Colab they are shown inline below. Every
# record also goes to `DIR/metrics.jsonl`, plotted here with matplotlib: the training loss should fall and the
# validation accuracy rise well above chance (0.5).

# %%
if colab.in_colab():
  get_ipython().run_line_magic("load_ext", "tensorboard")
  get_ipython().run_line_magic("tensorboard", f"--logdir {run_dir / 'tensorboard'}")

# %%
import matplotlib.pyplot as plt

records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
train = [r for r in records if r["kind"] == "train"]
evals = [r for r in records if r["kind"] == "eval"]
acc_key = next(k for k in evals[-1] if k.endswith("accuracy"))
fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
a1.plot([r["step"] for r in train], [r["loss"] for r in train], marker=".")
a1.set_xlabel("step"), a1.set_ylabel("training loss"), a1.set_title("loss")
a2.plot([r["step"] for r in evals], [r[acc_key] for r in evals], marker="o", color="tab:green")
a2.axhline(0.5, color="gray", ls="--", lw=0.8, label="chance")
a2.set_xlabel("step"), a2.set_ylabel(acc_key), a2.set_title("validation"), a2.legend()
fig.tight_layout()
plt.show()
print(f"final {acc_key}: {evals[-1][acc_key]:.4f}")

# %% [markdown]
# ## Predictions
#
# `mode=predict` restores the best checkpoint and writes one prediction per test example (GLUE's submission
# format for GLUE tasks). A run directory is also a model: `from_pretrained(DIR)` loads the fine-tuned classifier,
# with its class names, in eval mode, and `load_tokenizer(DIR)` its tokenizer.

# %%
c_predict = c.copy_and_resolve_references()
c_predict.mode = "predict"
out = run(c_predict, run_dir)
for split, path in out["files"].items():
  print(split, path)
  print("\n".join(open(path).read().splitlines()[:6]))

# %%
model = jaxformers.from_pretrained(run_dir)
tok = jaxformers.load_tokenizer(run_dir)
texts = ["The museum tour was a real delight.", "This blender never worked properly.",
         "The concert felt cold and rude, honestly."]
enc = tok.encode_batch(texts)            # the tokenizer's own padding settings may already pad the batch
width = max(len(e.ids) for e in enc)
ids = np.array([e.ids + [model.config.pad_token_id] * (width - len(e.ids)) for e in enc])
mask = np.array([e.attention_mask + [0] * (width - len(e.ids)) for e in enc])
probs = jax.nn.softmax(model(ids, mask), axis=-1)
for t, p in zip(texts, np.asarray(probs)):
  print(f"{model.label_names[int(p.argmax())]:>9} {p.max():.3f}  {t}")

# %% [markdown]
# ## Export to transformers
#
# `export_hf` (or `jaxformers export DIR OUT` in a shell) writes a `BertForSequenceClassification` checkpoint with
# the run's class names and tokenizer; transformers' `pipeline` runs it as it is and gives the same scores.

# %%
import transformers

export_dir = OUT / "exported"
jaxformers.export_hf(model, export_dir, tokenizer=run_dir, overwrite=True)
classify = transformers.pipeline("text-classification", model=str(export_dir))
for t, r, p in zip(texts, classify(texts), np.asarray(probs)):
  print(f"{r['label']:>9} {r['score']:.3f}  {t}")
  assert r["label"] == model.label_names[int(p.argmax())] and abs(r["score"] - p.max()) < 1e-4, (r, p)
