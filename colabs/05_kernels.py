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
# # Attention kernels: Pallas flash and block-sparse attention against XLA and cuDNN
#
# `jaxformers.kernels.attention.attention(q, k, v, impl=...)` has several implementations of the same function:
#
# * `xla`: the plain-jnp reference. It materialises the `[length, length]` score matrix per head, so its memory
#   grows with the square of the length;
# * `pallas`: flash attention written in Pallas (Triton on GPU, Mosaic on TPU). It walks over blocks of keys with a
#   running softmax and never stores the score matrix: memory linear in the length, and a Pallas backward pass;
# * `pallas` with a `block_mask`: block-sparse attention (sliding window + global tokens) that visits only the
#   (query block, key block) pairs the pattern needs: work linear in the length too;
# * `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, on GPUs, in float16 / bfloat16.
#
# This notebook checks that they agree (outputs and gradients), then measures their throughput (TFLOP/s) and the
# memory their compiled programs need as the length grows, on the attached accelerator.
#
# **On a CPU** (`cpu_tiny`) the Pallas kernels run in *interpret mode*: the same kernel code, executed tile by tile
# as ordinary XLA operations. That is what the correctness checks need, but its timings and memory say nothing about
# the kernels on a GPU or TPU, so `cpu_tiny` runs tiny sizes only; read its plots as a demonstration of the
# measurement, not as results.

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
# ## The preset and the backend

# %%
import jax
import jax.numpy as jnp
import numpy as np

from jaxformers import colab
from jaxformers.kernels.attention import (attention, block_sparse_attention, block_sparse_reference,
                                          default_block_sizes, kernel_backend, local_global_mask)

P = colab.preset(PRESET)
K = P.kernels
DTYPE = jnp.dtype(K["dtype"])
H = K["head_dim"]
N = max(1, K["width"] // H)
ON_GPU = jax.default_backend() == "gpu"
blocks = default_block_sizes(head_dim=H)
print(f"preset {P.name}: {K}")
print(f"device {jax.devices()[0].device_kind}, Pallas lowering: {kernel_backend()}, blocks {blocks}")
if kernel_backend() == "interpret":
  print("interpret mode: the kernels run as XLA operations one tile at a time; timings below are not kernel speeds")

# %% [markdown]
# ## 1. Correctness
#
# Random q, k, v at `check_length` tokens, longer than the sliding window so that the block-sparse kernel skips
# blocks, with one padded row (its last quarter is padding, segment id 0): the output and the gradients
# (dq, dk, dv of a random cotangent) of each implementation against the XLA reference. Errors are relative to the
# largest reference value; float32 agrees to about 1e-6, bfloat16 to about 1e-2 (its 8-bit mantissa).

# %%
def inputs(batch, length, dtype=DTYPE, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q, k, v, do = (jax.random.normal(kk, (batch, length, N, H), jnp.float32).astype(dtype) for kk in keys)
  seg = np.ones((batch, length), np.int32)
  seg[0, length - length // 4:] = 0          # the first row ends in padding
  return q, k, v, do, jnp.asarray(seg)


def output_and_grads(fn, q, k, v, do):
  out, vjp = jax.vjp(fn, q, k, v)
  return (out, *vjp(do))


def rel_err(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.abs(a - b).max() / np.abs(b).max())


L0 = K["check_length"]
q, k, v, do, seg = inputs(2, L0)
bmask = local_global_mask(L0, window=K["window"], num_global=1, block_q=blocks.block_q, block_k=blocks.block_k)
impls = {
    "pallas": lambda q, k, v: attention(q, k, v, segment_ids=seg, impl="pallas"),
    "block-sparse pallas": lambda q, k, v: block_sparse_attention(q, k, v, bmask, segment_ids=seg),
}
refs = {
    "pallas": lambda q, k, v: attention(q, k, v, segment_ids=seg, impl="xla"),
    "block-sparse pallas": lambda q, k, v: block_sparse_reference(q, k, v, bmask, segment_ids=seg),
}
if ON_GPU:
  impls["cudnn"] = lambda q, k, v: attention(q, k, v, segment_ids=seg, impl="cudnn")
  refs["cudnn"] = refs["pallas"]
tolerance = 1e-4 if DTYPE == jnp.float32 else 3e-2
for name, fn in impls.items():
  got = output_and_grads(jax.jit(fn), q, k, v, do)
  want = output_and_grads(jax.jit(refs[name]), q, k, v, do)
  errs = {part: rel_err(g, w) for part, g, w in zip(("out", "dq", "dk", "dv"), got, want)}
  print(f"{name:<20} length {L0}: " + "  ".join(f"{p} {e:.1e}" for p, e in errs.items()))
  assert max(errs.values()) < tolerance, (name, errs)
print(f"the block-sparse kernel visits {int(np.asarray(bmask.blocks).sum())} of {np.asarray(bmask.blocks).size} "
      f"block pairs at length {L0}")

# %% [markdown]
# ## 2. Throughput and memory vs length
#
# For each length the batch shrinks so that every configuration processes the same number of tokens
# (`tokens = batch x length`), with `width / head_dim` heads. Each implementation is compiled once; the timed calls
# run interleaved (A, B, C, A, B, C, ...) and the median counts. FLOPs: forward `4 B N L^2 H` (two matmuls),
# forward + backward 3.5 times that; block-sparse attention is credited with the same dense FLOPs, so its number
# reads as "dense-equivalent" throughput. Memory: the temporary buffers of the compiled forward + backward program
# (XLA's `memory_analysis`).

# %%
sys.path.insert(0, str(colab.repo_root()))  # benchmarks/ lives in the checkout, beside the package
from benchmarks.common import interleaved_medians


def fwd_bwd(fn):
  return jax.jit(lambda q, k, v, do: output_and_grads(fn, q, k, v, do))


def temp_mib(compiled):
  try:
    return compiled.memory_analysis().temp_size_in_bytes / 2**20
  except Exception:  # not every backend reports it
    return float("nan")


rows = []
for L in K["lengths"]:
  B = max(1, K["tokens"] // L)
  q, k, v, do, _ = inputs(B, L, seed=1)
  bm = local_global_mask(L, window=K["window"], num_global=1, block_q=blocks.block_q, block_k=blocks.block_k)
  variants = {"xla": lambda q, k, v: attention(q, k, v, impl="xla"),
              "pallas": lambda q, k, v: attention(q, k, v, impl="pallas"),
              "block-sparse": lambda q, k, v, bm=bm: block_sparse_attention(q, k, v, bm)}
  if ON_GPU:
    variants["cudnn"] = lambda q, k, v: attention(q, k, v, impl="cudnn")
  fns, mem = {}, {}
  for name, fn in variants.items():
    try:
      f = jax.jit(fn).lower(q, k, v).compile()
      fb = fwd_bwd(fn).lower(q, k, v, do).compile()
    except Exception as e:  # e.g. out of memory for xla at long lengths
      print(f"{name} at length {L}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
      continue
    fns[(name, "fwd")] = lambda f=f: jax.block_until_ready(f(q, k, v))
    fns[(name, "fwd+bwd")] = lambda fb=fb: jax.block_until_ready(fb(q, k, v, do))
    mem[name] = temp_mib(fb)
  seconds = interleaved_medians(fns, K["reps"], warmup=1)
  flops = 4.0 * B * N * L * L * H
  for (name, kind), s in seconds.items():
    rows.append(dict(length=L, batch=B, impl=name, kind=kind, ms=1e3 * s,
                     tflops=(flops if kind == "fwd" else 3.5 * flops) / s / 1e12, temp_mib=mem[name]))
  del q, k, v, do

print(f"{'length':>6} {'batch':>5} {'impl':<13} {'pass':<8} {'ms':>9} {'TFLOP/s':>8} {'temp MiB':>9}")
for r in rows:
  print(f"{r['length']:6d} {r['batch']:5d} {r['impl']:<13} {r['kind']:<8} {r['ms']:9.2f} {r['tflops']:8.3f} "
        f"{r['temp_mib']:9.1f}")

# %%
import matplotlib.pyplot as plt

names = list(dict.fromkeys(r["impl"] for r in rows))
fig, axes = plt.subplots(1, 3, figsize=(14, 4))
for name in names:
  for kind, style in (("fwd", "-"), ("fwd+bwd", "--")):
    rs = [r for r in rows if r["impl"] == name and r["kind"] == kind]
    axes[0 if kind == "fwd" else 1].plot([r["length"] for r in rs], [r["tflops"] for r in rs], style, marker="o",
                                         label=name)
  rs = [r for r in rows if r["impl"] == name and r["kind"] == "fwd"]
  axes[2].plot([r["length"] for r in rs], [r["temp_mib"] for r in rs], marker="o", label=name)
for ax, title, ylabel in ((axes[0], "forward", "TFLOP/s"), (axes[1], "forward + backward", "TFLOP/s"),
                          (axes[2], "temporary memory, forward + backward", "MiB")):
  ax.set_xscale("log", base=2)
  ax.set_xlabel("length")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
axes[2].set_yscale("log")
fig.suptitle(f"{jax.devices()[0].device_kind}, {DTYPE.name}, head_dim {H}, {N} heads, {K['tokens']} tokens per call"
             + (" (interpret mode: not kernel speeds)" if kernel_backend() == "interpret" else ""))
fig.tight_layout()
plt.show()

# %% [markdown]
# What to look at, on a GPU or TPU:
#
# * **memory**: the `xla` reference's temporary memory grows with the square of the length (the score matrix and
#   its softmax are stored for the backward pass), flash attention's and the block-sparse kernel's grow linearly;
# * **throughput**: flash attention's TFLOP/s should rise with the length as the tiles fill the chip and stay flat
#   where the reference runs out of memory bandwidth; cuDNN (GPU) is the vendor's fused kernel to compare with;
# * **block-sparse**: its time grows linearly with the length (a fixed window per query), so its dense-equivalent
#   TFLOP/s keeps rising with the length.
#
# On a CPU in interpret mode, the Pallas rows are ordinary XLA loops over tiles and are slower than the reference;
# only the correctness checks above carry over to an accelerator.
