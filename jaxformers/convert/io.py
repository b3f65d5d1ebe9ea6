"""Reading and writing HF PyTorch checkpoint directories: config.json plus safetensors or .bin weights."""
from __future__ import annotations

import json
import os
import pickle
import secrets
import shutil
from pathlib import Path

import numpy as np


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not fit the model; the message says what and where."""


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
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  try:
    return load_file(str(path))
  except (SafetensorError, OSError, ValueError) as e:
    raise CheckpointError(f"{path}: cannot read safetensors file, it may be truncated or corrupt ({e})") from None
  except TypeError as e:  # bfloat16 tensors have no numpy dtype in safetensors.numpy
    return _read_safetensors_via_flax(path, e)


def _read_safetensors_via_flax(path: Path, first_error: Exception) -> dict[str, np.ndarray]:
  from safetensors import safe_open
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
    import torch
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
    from tqdm import tqdm
    it = tqdm(files, desc="reading shards", unit="file")
  for f in it:
    state.update(_read_safetensors(f) if f.suffix == ".safetensors" else _read_bin(f))
  return state


def write_hf_files(directory: Path, config: dict, state: dict[str, np.ndarray]) -> None:
  """``config.json`` and ``model.safetensors`` into an existing directory (no checks: callers write into write_beside's temporary directory)."""
  from safetensors.numpy import save_file
  (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(directory / SAFETENSORS), metadata={"format": "pt"})


# What an orbax checkpoint directory holds at its top level (``params/`` of a native checkpoint).
ORBAX_ENTRIES = {"_CHECKPOINT_METADATA", "_METADATA", "_sharding", "commit_success.txt", "manifest.ocdbt", "d",
                 "array_metadatas", "descriptor", "checkpoint"}


def _is_orbax_dir(path: Path) -> bool:
  names = {p.name for p in path.iterdir()}
  return bool(names & {"_CHECKPOINT_METADATA", "_METADATA"}) and \
      all(n in ORBAX_ENTRIES or n.startswith("ocdbt.process_") for n in names)


def _listing(path: Path, limit: int = 4) -> str:
  names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
  return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_destination(dst: str | Path, files: tuple[str, ...], dirs: tuple[str, ...], overwrite: bool, what: str,
                      tokenizer_files: tuple[str, ...] = ()) -> Path:
  """Refuse (:class:`CheckpointError`) a destination whose writing would lose something: an existing file, a
  non-empty directory unless ``overwrite``, and even then a file entry (``files``, ``tokenizer_files``) that is
  a directory or a ``dirs`` entry that is not an orbax checkpoint. Returns the absolute path."""
  dst = Path(dst).absolute()
  hint = "use --overwrite (Python: overwrite=True) to replace them, or choose a new directory"
  if dst.exists() and not dst.is_dir():
    raise CheckpointError(f"{dst} is an existing file, not a directory: nothing was written; choose a directory "
                          f"for the {what}")
  if dst.is_dir() and any(dst.iterdir()):
    if not overwrite:
      names = list(files + tuple(d + "/" for d in dirs)) + (["tokenizer files"] if tokenizer_files else [])
      raise CheckpointError(f"{dst} is not empty ({_listing(dst)}): nothing was written; the {what} replaces "
                            f"{', '.join(names[:-1])} and {names[-1]} there; {hint}")
    for name in files + tokenizer_files:
      if (dst / name).exists() and not (dst / name).is_file():
        raise CheckpointError(f"{dst / name} is a directory, where the {what} writes a file: nothing was written; "
                              f"move it away or choose a new directory")
    for name in dirs:
      d = dst / name
      if d.exists() and not (d.is_dir() and _is_orbax_dir(d)):
        kind = f"holds files that are not an orbax checkpoint ({_listing(d)})" if d.is_dir() else "is a file"
        raise CheckpointError(f"{d} {kind}: nothing was written, even with overwrite; move them away or choose "
                              f"a new directory")
  # the temporary directory goes beside dst: the nearest existing parent must take new entries, and dst itself
  # when its entries are replaced one by one
  nearest = next(d for d in dst.parents if d.exists())
  for d in [nearest] + ([dst] if dst.is_dir() else []):
    if not d.is_dir() or not os.access(d, os.W_OK | os.X_OK):
      raise CheckpointError(f"cannot write the {what} to {dst}: {d} is "
                            + ("not a directory" if not d.is_dir() else "not writable") + "; nothing was written")
  return dst


def write_beside(dst: str | Path, write, files: tuple[str, ...], dirs: tuple[str, ...], overwrite: bool, what: str,
                 tokenizer_files: tuple[str, ...] = ()) -> Path:
  """Write a checkpoint without ever losing one: ``write(tmp)`` fills a temporary directory beside ``dst``
  (same parent), which then replaces ``dst`` by one rename when ``dst`` is new or empty. With ``overwrite``
  only the entries ``write`` made (among ``files``, ``dirs``, ``tokenizer_files``) replace their namesakes in
  ``dst``, one rename each, the first of ``files`` (the checkpoint's config) last; other files in ``dst`` are
  left alone and the replaced entries are deleted only after all new ones are in place. An interruption while
  writing leaves ``dst`` as it was."""
  dst = check_destination(dst, files, dirs, overwrite, what, tokenizer_files)
  try:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.{os.getpid()}-{secrets.token_hex(4)}.partial"
    tmp.mkdir()   # the usual permissions (mkdtemp's would be 0700)
  except OSError as e:
    raise CheckpointError(f"cannot write the {what} to {dst}: creating a directory in {dst.parent} "
                          f"failed ({e.strerror or e}); nothing was written") from None
  try:
    write(tmp)
    made = sorted(p.name for p in tmp.iterdir())
    assert set(made) <= set(files + dirs + tokenizer_files), made
    if not dst.exists() or (dst.is_dir() and not any(dst.iterdir())):
      os.replace(tmp, dst)   # atomic; replaces an empty directory
      return dst
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  old = tmp / ".replaced"
  old.mkdir()
  config = files[0]
  order = ([config] if config in made else []) + [n for n in made if n != config]
  try:
    if (dst / config).exists():        # first: a half-replaced directory never looks like a whole checkpoint
      os.replace(dst / config, old / config)
    for name in reversed(order):       # the config last
      if (dst / name).exists():
        os.replace(dst / name, old / name)
      os.replace(tmp / name, dst / name)
  except OSError as e:
    raise CheckpointError(f"replacing the {what} in {dst} failed ({e.strerror or e}); the previous files are in "
                          f"{old}, the new ones in {tmp}") from None
  shutil.rmtree(tmp)
  return dst
