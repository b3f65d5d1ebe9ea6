"""Writing a checkpoint directory safely: refuse a destination that holds something else, write beside it and rename
into place, so an interruption never leaves a half-written checkpoint and the previous one is removed only after the
new one is complete."""
from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from jaxformers.errors import CheckpointError

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
