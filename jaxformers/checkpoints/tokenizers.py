"""Tokenizer files beside exported and converted checkpoints, in the form transformers' ``AutoTokenizer`` reads.

A checkpoint directory that already has transformers' tokenizer files (``tokenizer_config.json``
and the vocabulary) passes them on unchanged. A training run (or native directory) with only
``tokenizer.json`` gets them written: a BERT-style WordPiece tokenizer (the trainer's learnt
vocabulary, or BERT's own) becomes ``BertTokenizer`` (``tokenizer_config.json`` with the
normaliser's lower-casing, accent and CJK options, ``vocab.txt`` in id order), anything else
``PreTrainedTokenizerFast`` over the same ``tokenizer.json``. Padding and truncation stored in
``tokenizer.json`` are dropped: transformers pads and truncates per call. A sentence-transformers directory's
encoding settings (pooling, normalisation, maximum length) are read by :func:`sentence_transformers_config`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer

from jaxformers.checkpoints import hub
from jaxformers.checkpoints.workdir import tokenizer_dir
from jaxformers.data.tokenize import special_ids
from jaxformers.errors import CheckpointError

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                      "vocab.json", "merges.txt", "added_tokens.json")
_SPECIAL_KEYS = ("pad", "unk", "cls", "sep", "mask")
# what makes a directory one with a tokenizer (a fast tokenizer, or the vocabulary transformers builds one from)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json")


def has_tokenizer(path: str | Path) -> bool:
  """Whether ``path`` is a tokenizer file, or a checkpoint or run directory (or one of a run's saved states) with
  tokenizer.json or vocab files."""
  p = tokenizer_dir(path)
  return (p.is_file() and p.suffix == ".json") or any((p / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(path: str | Path, revision: str | None = None) -> Tokenizer:
  """The ``tokenizers.Tokenizer`` of a ``tokenizer.json`` file, a checkpoint or training run directory (or one of a
  run's states: tokenizer.json, or vocab files via transformers), or a Hugging Face Hub id (resolved through its
  cache, see :mod:`jaxformers.checkpoints.hub`). :class:`CheckpointError` names the path when there is none."""
  p = tokenizer_dir(path)
  if p.is_file():
    return Tokenizer.from_file(str(p))
  p = hub.resolve(p if p.exists() else str(path), revision)
  if (p / "tokenizer.json").is_file():
    return Tokenizer.from_file(str(p / "tokenizer.json"))
  if not has_tokenizer(p):
    raise CheckpointError(f"{path}: no tokenizer found (expected a tokenizer.json file, a directory with "
                          f"tokenizer.json, vocab.txt or vocab.json, or a training run directory)")
  try:
    from transformers import AutoTokenizer  # optional: only vocab-file tokenizers need it
    return AutoTokenizer.from_pretrained(str(p)).backend_tokenizer
  except Exception as e:
    raise CheckpointError(f"{path}: no tokenizer.json and transformers could not load one ({e})") from None


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
  """Copy the tokenizer files of ``src`` (a checkpoint or run directory) into ``dst``; returns their names."""
  src_dir, dst = tokenizer_dir(src), Path(dst)
  if not src_dir.is_dir():
    return []
  names = [n for n in HF_TOKENIZER_FILES if (src_dir / n).is_file()]
  dst.mkdir(parents=True, exist_ok=True)
  for n in names:
    if (src_dir / n).resolve() != (dst / n).resolve():
      shutil.copyfile(src_dir / n, dst / n)
  return names


def write_hf_tokenizer(source, dst: str | Path, model_max_length: int | None = None) -> list[str]:
  """Write transformers tokenizer files for ``source`` (a checkpoint or run directory, a ``tokenizer.json`` or a
  ``tokenizers.Tokenizer``) into ``dst``; returns the file names, empty when ``source`` has no tokenizer."""
  if not isinstance(source, Tokenizer):
    src = tokenizer_dir(source) if Path(source).is_dir() else Path(source)
    if src.is_dir() and (src / "tokenizer_config.json").is_file():
      return copy_tokenizer_files(src, dst)
    if not has_tokenizer(src):
      return []
    source = load_tokenizer(str(src))
  files = hf_tokenizer_files(source, model_max_length)
  dst = Path(dst)
  dst.mkdir(parents=True, exist_ok=True)
  for name, text in files.items():
    (dst / name).write_text(text, encoding="utf-8")
  return sorted(files)


def hf_tokenizer_files(tok, model_max_length: int | None = None) -> dict[str, str]:
  """File name -> content of the transformers tokenizer files that reproduce ``tok`` (a ``tokenizers.Tokenizer``)."""

  spec = json.loads(tok.to_str())
  spec["padding"] = None
  spec["truncation"] = None
  ids = special_ids(tok)
  specials = {f"{k}_token": tok.id_to_token(ids[k]) for k in _SPECIAL_KEYS if ids.get(k) is not None}
  config = dict(specials)
  if model_max_length:
    config["model_max_length"] = int(model_max_length)
  files = {"tokenizer.json": json.dumps(spec, ensure_ascii=False, indent=2) + "\n",
           "special_tokens_map.json": json.dumps(specials, ensure_ascii=False, indent=2) + "\n"}
  bert = bert_options(spec, specials)
  if bert is not None:
    config.update(tokenizer_class="BertTokenizer", **bert)
    vocab = tok.get_vocab(with_added_tokens=True)
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
      raise CheckpointError("tokenizer vocabulary ids are not contiguous from 0; cannot write vocab.txt")
    files["vocab.txt"] = "".join(w + "\n" for w, _ in by_id)
  else:
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
  files["tokenizer_config.json"] = json.dumps(config, ensure_ascii=False, indent=2) + "\n"
  return files


def bert_options(spec: dict, specials: dict) -> dict | None:
  """``BertTokenizer`` arguments that rebuild the tokenizer ``spec`` (tokenizer.json as a dict) exactly, or None
  when it is not a BERT WordPiece tokenizer (transformers' ``BertTokenizer`` rebuilds its pipeline from these
  options and the vocabulary, so every other part must be the one it would build)."""
  model, norm, pre, post = (spec.get(k) or {} for k in ("model", "normalizer", "pre_tokenizer", "post_processor"))
  if model.get("type") != "WordPiece" or model.get("continuing_subword_prefix") != "##" or \
      model.get("max_input_chars_per_word") != 100 or model.get("unk_token") != specials.get("unk_token"):
    return None
  if norm.get("type") != "BertNormalizer" or not norm.get("clean_text") or pre.get("type") != "BertPreTokenizer":
    return None
  cls, sep = specials.get("cls_token"), specials.get("sep_token")

  def special(t, type_id):
    return {"SpecialToken": {"id": t, "type_id": type_id}}

  def seq(s, type_id):
    return {"Sequence": {"id": s, "type_id": type_id}}
  if post.get("type") != "TemplateProcessing" or \
      post.get("single") != [special(cls, 0), seq("A", 0), special(sep, 0)] or \
      post.get("pair") != [special(cls, 0), seq("A", 0), special(sep, 0), seq("B", 1), special(sep, 1)]:
    return None
  return {"do_lower_case": bool(norm.get("lowercase")), "strip_accents": norm.get("strip_accents"),
          "tokenize_chinese_chars": bool(norm.get("handle_chinese_chars"))}


POOLINGS = ("cls", "mean", "max")


def sentence_transformers_config(path: str | Path) -> dict:
  """``{"pooling", "normalize", "max_length"}`` from a sentence-transformers directory, or the ``"encode"`` entry
  of a native checkpoint saved from one (``save_pretrained(..., tokenizer=that directory)`` carries them: convert,
  prune and quantize keep them); {} otherwise."""
  path = Path(path)
  if not (path / "modules.json").is_file():
    try:
      saved = json.loads((path / "jaxformers.json").read_text()).get("encode") if path.is_dir() else None
    except (OSError, ValueError, AttributeError):   # no or a broken jaxformers.json: from_pretrained says which
      saved = None
    return dict(saved) if isinstance(saved, dict) else {}
  modules = json.loads((path / "modules.json").read_text())
  out = {"normalize": any(m.get("type", "").endswith("Normalize") for m in modules)}
  for m in modules:
    if m.get("type", "").endswith("Pooling"):
      cfg = json.loads((path / m["path"] / "config.json").read_text())
      modes = [p for p, key in (("cls", "pooling_mode_cls_token"), ("mean", "pooling_mode_mean_tokens"),
                                ("max", "pooling_mode_max_tokens")) if cfg.get(key)]
      if len(modes) != 1:
        raise ValueError(f"{path / m['path'] / 'config.json'}: pooling modes {modes or 'none'}; jaxformers.encode "
                         f"supports exactly one of {', '.join(POOLINGS)}")
      out["pooling"] = modes[0]
  if (path / "sentence_bert_config.json").is_file():
    out["max_length"] = int(json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"])
  return out
