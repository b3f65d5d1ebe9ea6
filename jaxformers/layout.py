"""Layouts: which block sits at each depth of an encoder, written as one short string.

Grammar::

    layout := item ("," item)*
    item   := NAME ["*" COUNT] | "(" layout ")" ["*" COUNT]

``NAME`` is a registered block (:data:`BLOCKS`, below): ``serial``
(BERT/RoBERTa post-LN attention then feed-forward), ``serial_preln``, ``parallel``
(PAF-RoBERTa: attention and feed-forward read the same input, one LayerNorm),
``parallel_preln`` (PaLM / GPT-J), ``fourier`` (FNet mixing then feed-forward),
``sparse`` / ``sparse_parallel`` (sliding window + global tokens), and the
single-sublayer blocks ``attention``, ``ffn``, ``fourier_mixer`` and ``sparse_attention``. Whitespace is ignored.

Examples (12 layers)::

    serial*12                 BERT / RoBERTa
    parallel*24               PAF-RoBERTa-large
    fourier*12                FNet
    fourier*10,serial*2       FNet-hybrid: attention only in the last two layers
    serial*8,ffn*4            PAR: attention only in the first 2/3
    (attention,ffn)*12        BERT written sublayer by sublayer (24 blocks)
"""
from __future__ import annotations

import dataclasses
import re

from jaxformers.errors import LayoutError
from jaxformers.registry import Registry


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """What a block type is made of: its token mixer (a name in :data:`jaxformers.mixers.MIXERS`, or None),
  whether it has a feed-forward sublayer, whether the two read the same input (``parallel``) and whether
  its LayerNorms sit before the sublayers (``pre_ln``). :class:`jaxformers.blocks.Block` builds one."""
  mixer: str | None
  mlp: bool
  parallel: bool = False
  pre_ln: bool = False
  doc: str = ""


BLOCKS: Registry = Registry("block")
for _name, _spec in {
    "serial": BlockSpec("attention", True, doc="BERT/RoBERTa: LN(x + Attn(x)), then LN(h + FFN(h))"),
    "serial_preln": BlockSpec("attention", True, pre_ln=True, doc="x + Attn(LN(x)), then h + FFN(LN(h))"),
    "parallel": BlockSpec("attention", True, parallel=True, doc="PAF-RoBERTa: LN(x + Attn(x) + FFN(x))"),
    "parallel_preln": BlockSpec("attention", True, parallel=True, pre_ln=True,
                                doc="PaLM / GPT-J: x + Attn(LN(x)) + FFN(LN(x))"),
    "fourier": BlockSpec("fourier", True, doc="FNet: LN(x + Re(DFT(x))), then LN(h + FFN(h))"),
    "sparse": BlockSpec("sparse", True, doc="serial block with sliding-window + global-token attention"),
    "sparse_parallel": BlockSpec("sparse", True, parallel=True,
                                 doc="parallel block with sliding-window + global-token attention"),
    "ffn": BlockSpec(None, True, doc="feed-forward sublayer only: LN(x + FFN(x))"),
    "attention": BlockSpec("attention", False, doc="attention sublayer only: LN(x + Attn(x))"),
    "fourier_mixer": BlockSpec("fourier", False, doc="Fourier mixing sublayer only: LN(x + Re(DFT(x)))"),
    "sparse_attention": BlockSpec("sparse", False, doc="sparse attention sublayer only: LN(x + SparseAttn(x))"),
}.items():
  BLOCKS.register(_name)(_spec)

GRAMMAR = (
    "layout := item ('," "' item)* ; item := NAME ['*' COUNT] | '(' layout ')' ['*' COUNT]\n"
    "  e.g. 'serial*12', 'parallel*24', 'fourier*10,serial*2', 'serial*8,ffn*4', '(attention,ffn)*6'"
)

_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<num>\d+)|(?P<sym>[(),*]))")


def _tokens(text: str) -> list[tuple[str, str, int]]:
  out, pos = [], 0
  text = text.rstrip()
  while pos < len(text):
    m = _TOKEN.match(text, pos)
    if not m:
      raise LayoutError(f"invalid layout {text!r}: unexpected {text[pos:].strip()[:10]!r} at column {pos}.\n{GRAMMAR}")
    kind = m.lastgroup
    out.append((kind, m.group(kind), m.start(kind)))
    pos = m.end()
  return out


def parse_layout(text: str, known: list[str] | None = None) -> tuple[str, ...]:
  """Expand a layout string into one block name per depth; validates names against ``known``."""
  if not isinstance(text, str) or not text.strip():
    raise LayoutError(f"invalid layout {text!r}: empty.\n{GRAMMAR}")
  toks = _tokens(text)
  i = 0

  def fail(msg: str):
    raise LayoutError(f"invalid layout {text!r}: {msg}.\n{GRAMMAR}")

  def peek():
    return toks[i] if i < len(toks) else (None, None, len(text))

  def seq() -> list[str]:
    nonlocal i
    names = item()
    while peek()[1] == ",":
      i += 1
      names += item()
    return names

  def item() -> list[str]:
    nonlocal i
    kind, val, col = peek()
    if kind == "name":
      i += 1
      if known is not None and val not in known:
        fail(f"unknown block {val!r} at column {col}; known blocks: {', '.join(known)}")
      names = [val]
    elif val == "(":
      i += 1
      names = seq()
      if peek()[1] != ")":
        fail(f"expected ')' at column {peek()[2]}")
      i += 1
    else:
      fail(f"expected a block name or '(' at column {col}")
    if peek()[1] == "*":
      i += 1
      kind, val, col = peek()
      if kind != "num" or int(val) < 1:
        fail(f"expected a positive count after '*' at column {col}")
      i += 1
      names = names * int(val)
    return names

  names = seq()
  if i != len(toks):
    fail(f"unexpected {toks[i][1]!r} at column {toks[i][2]}")
  return tuple(names)


def format_layout(blocks: tuple[str, ...] | list[str]) -> str:
  """The shortest run-length form of a block sequence: ('serial',)*8 + ('ffn',)*4 -> 'serial*8,ffn*4'."""
  parts: list[str] = []
  i = 0
  while i < len(blocks):
    j = i
    while j < len(blocks) and blocks[j] == blocks[i]:
      j += 1
    parts.append(blocks[i] if j - i == 1 else f"{blocks[i]}*{j - i}")
    i = j
  return ",".join(parts)


def par_layout(num_layers: int, attention_fraction: float = 2 / 3, block: str = "serial") -> str:
  """PAR ("Pay Attention when Required"): attention only in the first ``attention_fraction`` of the depth."""
  n_attn = max(1, round(num_layers * attention_fraction))
  return format_layout((block,) * n_attn + ("ffn",) * (num_layers - n_attn))


def fnet_hybrid_layout(num_layers: int, attention_layers: int = 2) -> str:
  """FNet-hybrid: Fourier mixing everywhere except the last ``attention_layers`` layers."""
  return format_layout(("fourier",) * (num_layers - attention_layers) + ("serial",) * attention_layers)
