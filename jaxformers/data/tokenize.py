"""Tokenisation with HF ``tokenizers``: encode examples, train a WordPiece, find special tokens. Loading a
checkpoint's tokenizer is :func:`jaxformers.checkpoints.tokenizers.load_tokenizer`."""
from __future__ import annotations

import collections
import dataclasses
import logging

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from jaxformers.data.sources import DataError, Examples

log = logging.getLogger(__name__)

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclasses.dataclass
class Tokenized:
  """Token ids of every example (ragged), their token types, labels and lengths."""
  ids: list[np.ndarray]
  type_ids: list[np.ndarray]
  label: np.ndarray | None
  origin: str

  @property
  def lengths(self) -> np.ndarray:
    return np.fromiter((len(x) for x in self.ids), np.int32, len(self.ids))

  def __len__(self):
    return len(self.ids)


def train_wordpiece(texts: list[str], vocab_size: int) -> Tokenizer:
  """A lower-casing BERT-style WordPiece tokenizer whose vocabulary is learnt from ``texts``.

  The vocabulary is the special tokens, every character (word-initial and ``##``
  continuation), then the most frequent words and word pieces (``##`` suffixes of
  2-4 characters) by count, ties broken alphabetically, so the same texts always give
  the same tokenizer (the ``tokenizers`` trainers break ties in hash order, which
  would make runs with the same seed differ).
  """
  normalizer = normalizers.BertNormalizer(lowercase=True)
  pre = pre_tokenizers.BertPreTokenizer()
  words = collections.Counter()
  for t in texts:
    words.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(t)))
  chars = sorted({ch for w in words for ch in w})
  pieces = collections.Counter()
  for w, n in words.items():
    for k in (2, 3, 4):
      if len(w) > k:
        pieces["##" + w[-k:]] += n
  vocab = list(SPECIALS) + chars + ["##" + ch for ch in chars]
  budget = max(0, vocab_size - len(vocab))
  ranked = sorted(list(words.items()) + list(pieces.items()), key=lambda kv: (-kv[1], kv[0]))
  seen = set(vocab)
  for w, _ in ranked:
    if budget == 0:
      break
    if w not in seen:
      vocab.append(w)
      seen.add(w)
      budget -= 1
  tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
  tok.add_special_tokens(list(SPECIALS))   # matched in raw text, as BERT's tokenizers do; ids stay 0..4
  tok.normalizer = normalizer
  tok.pre_tokenizer = pre
  tok.decoder = decoders.WordPiece()
  cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
  return tok


def special_ids(tok: Tokenizer) -> dict:
  """pad / mask / unk ids, whichever naming convention (BERT or RoBERTa) the vocabulary uses."""
  def find(*names):
    for n in names:
      i = tok.token_to_id(n)
      if i is not None:
        return i
    return None
  out = {"pad": find("[PAD]", "<pad>"), "mask": find("[MASK]", "<mask>"), "unk": find("[UNK]", "<unk>"),
         "cls": find("[CLS]", "<s>"), "sep": find("[SEP]", "</s>")}
  if out["pad"] is None:
    raise DataError("tokenizer has no padding token ([PAD] or <pad>)")
  return out


def encode(tok: Tokenizer, ex: Examples, max_length: int, on_too_long: str = "truncate") -> Tokenized:
  """Encode pairs or singles with the tokenizer's own special-token template, truncated to ``max_length``."""
  tok = Tokenizer.from_str(tok.to_str())  # a private copy: truncation settings are per object
  tok.no_padding()
  tok.enable_truncation(max_length, strategy="longest_first")
  encs = tok.encode_batch(list(zip(ex.text_a, ex.text_b)) if ex.text_b is not None else ex.text_a)
  long_rows = [i for i, e in enumerate(encs) if e.overflowing]
  if long_rows:
    msg = (f"{ex.origin}: {len(long_rows)} of {len(encs)} examples are longer than {max_length} tokens "
           f"(first: example {long_rows[0]})")
    if on_too_long == "error":
      raise DataError(msg + "; set data.on_too_long='truncate' to truncate them, or raise data.max_length")
    log.warning(msg + "; truncated (data.on_too_long='error' makes this an error)")
  ids = [np.asarray(e.ids, np.int32) for e in encs]
  types = [np.asarray(e.type_ids, np.int32) for e in encs]
  return Tokenized(ids, types, ex.label, ex.origin)
