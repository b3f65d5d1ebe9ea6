"""Checkpoint locations: a local directory, or a Hugging Face Hub id looked up through ``huggingface_hub``.

``resolve("bert-base-uncased")`` returns the snapshot directory in the Hub cache
(``HF_HUB_CACHE``, by default ``~/.cache/huggingface/hub``), downloading the config,
weight and tokenizer files when they are not cached and the Hub can be reached;
``HF_HUB_OFFLINE=1`` looks in the cache only. An existing local directory is used as is.
"""
from __future__ import annotations

import re
from pathlib import Path

from jaxformers.errors import CheckpointError

# The files a model or tokenizer needs; READMEs, other frameworks' weights and ONNX exports are not fetched.
ALLOW_PATTERNS = ["config.json", "jaxformers.json", "params/*", "model.safetensors", "model-*.safetensors",
                  "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model-*.bin",
                  "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt"]

_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve(path_or_id: str | Path, revision: str | None = None, *, cache_dir: str | Path | None = None) -> Path:
  """The directory holding ``path_or_id``: itself if it is a local directory, else its Hub snapshot.

  ``revision`` (a branch, tag or commit) applies to Hub ids. Raises :class:`CheckpointError`
  with one line when the id is neither cached nor reachable, or the path does not exist.
  """
  local = Path(path_or_id).expanduser()
  if local.is_dir():
    if revision is not None:
      raise CheckpointError(f"{path_or_id}: revision={revision!r} applies to Hugging Face Hub ids, not local "
                            f"directories")
    return local
  name = str(path_or_id)
  if local.exists() or not _ID.match(name) or name.endswith((".json", ".safetensors", ".bin")):
    what = "is not a directory" if local.exists() else "does not exist"
    raise CheckpointError(f"{name}: {what} (expected a checkpoint directory or a Hugging Face Hub id such as "
                          f"'bert-base-uncased' or 'org/name')")
  from huggingface_hub import constants, errors, snapshot_download   # only Hub ids need it (slow to import)
  refused = tuple(getattr(errors, n) for n in ("RepositoryNotFoundError", "RevisionNotFoundError", "GatedRepoError",
                                               "HFValidationError", "HfHubHTTPError", "IncompleteSnapshotError")
                  if hasattr(errors, n))
  try:
    return Path(snapshot_download(name, revision=revision, cache_dir=cache_dir, allow_patterns=ALLOW_PATTERNS))
  except errors.LocalEntryNotFoundError as e:
    rev = f" at revision {revision!r}" if revision else ""
    cache = constants.HF_HUB_CACHE if cache_dir is None else cache_dir
    if constants.HF_HUB_OFFLINE:
      why = "HF_HUB_OFFLINE=1 forbids downloading it"
    else:
      why = f"the Hub could not be reached: {type(e.__cause__ or e).__name__}"
    raise CheckpointError(f"{name!r}{rev} is not a local directory and not in the Hugging Face cache "
                          f"({cache}; {why})") from None
  except refused as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise CheckpointError(f"{name!r}: not a local directory, and the Hugging Face Hub refused it ({first})") from None
