"""Reading and writing HF PyTorch checkpoint directories: config.json plus safetensors or .bin weights."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file
from tqdm import tqdm

from jaxformers.errors import CheckpointError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


def read_hf_config(directory: str | Path) -> dict:
  directory = Path(directory)
  path = directory / "config.json"
  if not directory.is_dir():
    raise CheckpointError(f"{directory}: not a directory (expected an HF checkpoint directory with config.json "
                          f"and model.safetensors or pytorch_model.bin, or a jaxformers checkpoint)")
  if not path.is_file():
    raise CheckpointError(f"{directory}: no config.json (an HF checkpoint directory needs config.json next to "
                          f"{SAFETENSORS} or {BIN})")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def weight_files(directory: str | Path) -> list[Path]:
  """The weight files of a checkpoint, preferring safetensors, following a shard index if present."""
  directory = Path(directory)
  for index, single in ((SAFETENSORS_INDEX, SAFETENSORS), (BIN_INDEX, BIN)):
    if (directory / index).is_file():
      try:
        names = sorted(set(json.loads((directory / index).read_text())["weight_map"].values()))
      except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{directory / index}: not a valid shard index ({e})") from None
      missing = [n for n in names if not (directory / n).is_file()]
      if missing:
        raise CheckpointError(f"{directory / index}: shard files missing: {', '.join(missing)}")
      return [directory / n for n in names]
    if (directory / single).is_file():
      return [directory / single]
  raise CheckpointError(f"{directory}: no weights found (expected {SAFETENSORS}, {BIN} or a shard index)")


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
  try:
    return load_file(str(path))
  except (SafetensorError, OSError, ValueError) as e:
    raise CheckpointError(f"{path}: cannot read safetensors file, it may be truncated or corrupt ({e})") from None
  except TypeError as e:  # bfloat16 tensors have no numpy dtype in safetensors.numpy
    return _read_safetensors_via_flax(path, e)


def _read_safetensors_via_flax(path: Path, first_error: Exception) -> dict[str, np.ndarray]:
  try:
    out = {}
    with safe_open(str(path), framework="flax") as f:
      for k in f.keys():
        out[k] = np.asarray(f.get_tensor(k).astype("float32"))
    return out
  except Exception as e:  # noqa: BLE001 - report both failures with the file name
    raise CheckpointError(f"{path}: cannot read safetensors file ({first_error}; {e})") from None


def _read_bin(path: Path) -> dict[str, np.ndarray]:
  try:
    import torch   # optional: the torch extra, for .bin checkpoints only
  except ImportError:
    raise CheckpointError(f"{path}: reading .bin checkpoints needs PyTorch; install the extra "
                          f"`pip install 'jaxformers[torch]'` or convert the checkpoint to safetensors") from None
  try:
    state = torch.load(str(path), map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise CheckpointError(
        f"{path}: refused to load: the pickle holds objects other than tensors, and loading it could run code "
        f"(torch.load weights_only=True said: {first}). Only plain state dicts of tensors are accepted.") from None
  except (RuntimeError, EOFError, OSError, ValueError) as e:
    raise CheckpointError(f"{path}: cannot read PyTorch checkpoint, it may be truncated or corrupt ({e})") from None
  if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
    raise CheckpointError(f"{path}: expected a state dict mapping names to tensors, got {type(state).__name__}")
  return {k: v.detach().to(torch.float32).numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
          for k, v in state.items()}


def read_hf_weights(directory: str | Path, progress: bool = False) -> dict[str, np.ndarray]:
  files = weight_files(directory)
  state: dict[str, np.ndarray] = {}
  it = files
  if progress and len(files) > 1:
    it = tqdm(files, desc="reading shards", unit="file")
  for f in it:
    state.update(_read_safetensors(f) if f.suffix == ".safetensors" else _read_bin(f))
  return state


def write_hf_files(directory: Path, config: dict, state: dict[str, np.ndarray]) -> None:
  """``config.json`` and ``model.safetensors`` into an existing directory (no checks: callers write into write_beside's temporary directory)."""
  (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(directory / SAFETENSORS), metadata={"format": "pt"})


# What an orbax checkpoint directory holds at its top level (``params/`` of a native checkpoint).
