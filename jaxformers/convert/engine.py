"""One conversion engine driven by tables of key rules.

A :class:`Rule` maps one HF tensor name (a template that may contain ``{i}``, the
layer index) to candidate parameter paths in a jaxformers model, with a transform.
An :class:`Ignore` names tensors that are deliberately not loaded (buffers, tied
copies, which are checked to equal what they are tied to). The engine applies a table
in both directions and collects every problem before raising once:
unknown source tensors, shape mismatches, parameters nothing fills.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable

import numpy as np
from tqdm import tqdm

from jaxformers.errors import CheckpointError

TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    # name: (HF -> jaxformers, jaxformers -> HF)
    "copy": (lambda a: a, lambda a: a),
    "transpose": (lambda a: np.ascontiguousarray(a.T), lambda a: np.ascontiguousarray(a.T)),
}


@dataclasses.dataclass(frozen=True)
class Rule:
  hf: str                      # HF name template, e.g. "encoder.layer.{i}.attention.self.query.weight"
  jax: tuple[str, ...]         # candidate jaxformers paths; the first the model has is used
  transform: str = "copy"
  group: str | None = None     # for per-layer rules: the sublayer ("mixer" or "mlp") the tensor belongs to
  base: bool = True            # True: path is inside the encoder; False: a head parameter at the model root

  @property
  def pattern(self) -> re.Pattern:
    return _compile(self.hf)


@dataclasses.dataclass(frozen=True)
class Ignore:
  hf: str
  reason: str
  tied_to: str | None = None   # the HF name this tensor must equal

  @property
  def pattern(self) -> re.Pattern:
    return _compile(self.hf)


def _compile(template: str) -> re.Pattern:
  return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


def linear(hf: str, jax: str | tuple[str, ...], **kw) -> list[Rule]:
  jax = (jax,) if isinstance(jax, str) else jax
  return [Rule(f"{hf}.weight", tuple(f"{j}.kernel" for j in jax), "transpose", **kw),
          Rule(f"{hf}.bias", tuple(f"{j}.bias" for j in jax), **kw)]


def norm(hf: str, jax: str | tuple[str, ...], **kw) -> list[Rule]:
  jax = (jax,) if isinstance(jax, str) else jax
  return [Rule(f"{hf}.weight", tuple(f"{j}.scale" for j in jax), **kw),
          Rule(f"{hf}.bias", tuple(f"{j}.bias" for j in jax), **kw)]


def embedding(hf: str, jax: str, **kw) -> list[Rule]:
  return [Rule(f"{hf}.weight", (f"{jax}.embedding",), **kw)]


@dataclasses.dataclass
class Report:
  """What a conversion did with every tensor and parameter."""

  loaded: dict[str, str] = dataclasses.field(default_factory=dict)     # jax path <- HF name
  ignored: dict[str, str] = dataclasses.field(default_factory=dict)    # HF name -> reason
  dropped: dict[str, str] = dataclasses.field(default_factory=dict)    # HF name -> reason (layout has no such sublayer)
  new: list[str] = dataclasses.field(default_factory=list)             # jax paths freshly initialised
  notes: list[str] = dataclasses.field(default_factory=list)           # other changes made while loading

  def summary(self) -> str:
    lines = [f"loaded {len(self.loaded)} parameters"]
    if self.dropped:
      lines.append(f"dropped {len(self.dropped)} tensors the layout has no place for "
                   f"(e.g. {next(iter(self.dropped))}: {next(iter(self.dropped.values()))})")
    if self.ignored:
      reasons = sorted(set(self.ignored.values()))
      lines.append(f"ignored {len(self.ignored)} tensors ({'; '.join(reasons)})")
    if self.new:
      lines.append(f"newly initialised {len(self.new)} parameters: {', '.join(self.new)}")
    lines += self.notes
    return "\n".join(lines)


def layer_map(source_blocks: list, target_blocks: list) -> dict[tuple[int, str], int | None]:
  """Which target block receives each source block's mixer (token mixer) and mlp sublayer.

  Blocks are :class:`jaxformers.blocks.BlockSpec` s (anything with ``mixer`` and ``mlp``);
  an HF checkpoint is a stack of serial layers. Same depth: block ``i`` goes to block ``i``
  (a block without that sublayer drops it). Different depth: the k-th source token mixer
  goes to the k-th block with a token mixer, and the k-th feed-forward to the k-th block
  with a feed-forward sublayer.
  """
  out: dict[tuple[int, str], int | None] = {}
  if len(target_blocks) == len(source_blocks):
    for i in range(len(source_blocks)):
      out[(i, "mixer")] = out[(i, "mlp")] = i
    return out
  for group, has in (("mixer", lambda s: bool(s.mixer)), ("mlp", lambda s: bool(s.mlp))):
    slots = [j for j, s in enumerate(target_blocks) if has(s)]
    for k, i in enumerate(i for i, s in enumerate(source_blocks) if has(s)):
      out[(i, group)] = slots[k] if k < len(slots) else None
  return out


def _resolve(rule: Rule, groups: dict, lmap: dict, prefix: str) -> tuple[list[str], int | None]:
  block = None
  fields = {}
  if "i" in groups:
    block = lmap.get((int(groups["i"]), rule.group))
    fields["i"] = block
  pre = prefix if rule.base else ""
  return [pre + c.format(**fields) for c in rule.jax], block


def load(source: dict[str, np.ndarray], rules: Iterable[Rule], ignores: Iterable[Ignore], *,
         target: dict[str, tuple], target_blocks: list, source_blocks: list, prefix: str,
         may_be_new: Callable[[str], bool], where: str, progress: bool = False,
         display: Callable[[str], str] = lambda k: k) -> tuple[dict, Report]:
  """Map source tensors (an HF state dict, or a jaxformers model's own parameters) onto a model's parameters.

  ``target`` maps each model parameter path to its shape; ``prefix`` is prepended to
  encoder paths (``"encoder."`` for head models). Parameters nothing fills are an error unless
  ``may_be_new`` accepts them or no source sublayer maps to their block's sublayer (a target
  deeper than the source); those are left as initialised and listed in ``report.new``.
  Returns ``(params, report)`` where ``params`` maps paths to arrays; raises
  :class:`CheckpointError` listing every problem.
  ``display`` turns a source name into the name printed in messages and the report.
  """
  rules, ignores = list(rules), list(ignores)
  lmap = layer_map(source_blocks, target_blocks)
  params: dict[str, np.ndarray] = {}
  report, problems, misfit = Report(), [], set()
  items = sorted(source.items())
  if progress:
    items = tqdm(items, desc="converting", unit="tensor")
  for key, value in items:
    name = display(key)
    ign = next((g for g in ignores if g.pattern.match(key)), None)
    if ign is not None:
      if ign.tied_to is not None and ign.tied_to in source:
        if source[ign.tied_to].shape != value.shape or not np.array_equal(source[ign.tied_to], value):
          problems.append(f"{name}: expected to be tied to (equal to) {display(ign.tied_to)}, but it differs; "
                          f"untied decoders are not supported")
          continue
      report.ignored[name] = ign.reason
      continue
    match = next(((r, m) for r in rules if (m := r.pattern.match(key))), None)
    if match is None:
      problems.append(f"{name}: unknown tensor (no conversion rule matches it)")
      continue
    rule, m = match
    candidates, block = _resolve(rule, m.groupdict(), lmap, prefix)
    path = next((c for c in candidates if c in target), None)
    if path is None:
      if rule.group is not None and block is None:
        report.dropped[name] = f"the layout has no {'token mixer' if rule.group == 'mixer' else 'feed-forward'} slot for source layer {m['i']}"
      elif rule.group is not None:
        report.dropped[name] = f"block {block} ({target_blocks[block].mixer or 'no'} mixer) has no such parameter"
      else:
        report.ignored[name] = "not part of this model (e.g. a head or pooler of another task)"
      continue
    array = TRANSFORMS[rule.transform][0](np.asarray(value))
    if tuple(array.shape) != tuple(target[path]):
      problems.append(f"{name}: shape {tuple(value.shape)} does not fit {path} {tuple(target[path])} "
                      f"(does the checkpoint's config.json match its weights?)")
      misfit.add(path)
      continue
    if path in params:
      problems.append(f"{name}: {path} is already filled from {report.loaded[path]}")
      continue
    params[path] = array
    report.loaded[path] = name
  unfed = _unfed_sublayers(rules, lmap, len(target_blocks), prefix)
  for path in sorted(set(target) - set(params) - misfit):
    if may_be_new(path) or unfed(path):
      report.new.append(path)
    else:
      problems.append(f"{path}: no tensor in the checkpoint fills this parameter")
  if problems:
    raise CheckpointError(f"{where}: {len(problems)} problem(s) converting the checkpoint:\n  - " + "\n  - ".join(problems))
  return params, report


def _unfed_sublayers(rules: list[Rule], lmap: dict, num_blocks: int, prefix: str) -> Callable[[str], bool]:
  """Whether a parameter lies in a sublayer that no source sublayer maps to (a deeper target's extra blocks)."""
  fed = {(j, g) for (_, g), j in lmap.items() if j is not None}
  owner = {}
  for r in rules:
    if r.group is not None:
      for c in r.jax:
        for j in range(num_blocks):
          owner[(prefix if r.base else "") + c.format(i=j)] = (j, r.group)
  return lambda path: path in owner and owner[path] not in fed


def export(params: dict[str, np.ndarray], rules: Iterable[Rule], *, num_layers: int, prefix: str,
           hf_prefix: str, where: str) -> dict[str, np.ndarray]:
  """Inverse of :func:`load` for models with one block per HF layer; every parameter must find a name."""
  out: dict[str, np.ndarray] = {}
  used: set[str] = set()
  for rule in rules:
    layers = range(num_layers) if "{i}" in rule.hf else [None]
    for i in layers:
      fields = {} if i is None else {"i": i}
      pre = prefix if rule.base else ""
      path = next((pre + c.format(**fields) for c in rule.jax if pre + c.format(**fields) in params), None)
      if path is None:
        continue
      name = (hf_prefix if rule.base else "") + rule.hf.format(**fields)
      out[name] = TRANSFORMS[rule.transform][1](np.asarray(params[path]))
      used.add(path)
  left = sorted(set(params) - used)
  if left:
    raise CheckpointError(f"{where}: no HF name for parameters: {', '.join(left)}")
  return out
