"""Differentiable architecture search (PAR, "Pay Attention when Required", made compute-aware).

A *supernet* replaces every sublayer position of an encoder by a :class:`Choice` between candidate
sublayers: ``ffn``, ``identity`` and every token mixer whose spec says ``search=True``
(:class:`jaxformers.mixers.MixerSpec`): ``attention`` (with ``ffn`` and ``identity``, PAR's space),
``fourier`` (FNet mixing), ``sparse`` (sliding-window attention) and any mixer registered later. Each candidate
is an ordinary :class:`jaxformers.blocks.Block` with its residual and post-LayerNorm: the ``ffn`` block type,
and for a mixer its single-sublayer post-LN block type (``attention``, ``fourier_mixer``, ``sparse_attention``:
the registered block ``BlockSpec(mixer, mlp=False)``); ``identity`` passes its input on. A position's output is the
candidates' outputs weighted by a Gumbel-softmax of the position's architecture logits,
``softmax((logits + g) / tau)``, with ``tau`` annealed (:func:`temperature`) and, with ``hard``, a
straight-through one-hot sample. In eval mode the weights are ``softmax(logits)`` without noise.
Probabilities are always a softmax of logits; no log of a probability is ever taken.

Architecture logits are :class:`ArchParam` variables, not :class:`flax.nnx.Param`:
``nnx.state(model, ArchParam)`` holds them alone and ``nnx.state(model, nnx.Param)`` the weights alone.

A supernet is made from an ordinary model (:func:`to_supernet`): a block with a token mixer and a
feed-forward sublayer becomes two positions, a single-sublayer block one. Each candidate takes the
weights of the nearest source sublayer of its kind (the same sublayer mapping as a re-arrangement):
``ffn`` a feed-forward's, a mixer with parameters those of a source mixer with the same parameter names and
shapes (attention and sparse attention share theirs), a mixer without parameters only a LayerNorm (that of the
nearest block with a token mixer). At both positions of a serial block, the attention candidate starts as that
block's attention and the ``ffn`` candidate as its feed-forward, so a search from a pretrained BERT/RoBERTa
fine-tunes it.

:func:`read_off` turns the logits into a layout string of the usual grammar (a mixer position followed by an
``ffn`` one is written as the mixer's serial post-LN block, ``BlockSpec(mixer, mlp=True)``: ``attention`` +
``ffn`` is ``serial``, ``fourier_mixer`` + ``ffn`` is ``fourier``), and :func:`derive` builds that model with
exactly the chosen candidates' weights.

Cost: :func:`candidate_flops` is the forward FLOPs per token of each candidate at the run's sequence length, from
the one FLOPs model (:mod:`jaxformers.flops`: a mixer's spec ``flops``, ``ffn`` ``4 d F``, identity 0). The
search's training objective adds ``cost_weight * max(0, E[cost] / source_cost - target_flops_ratio)`` (the
expected cost under ``softmax(logits)`` relative to the source layout's, :func:`source_flops`) and, against the
known collapse of differentiable search onto parameter-free skips, ``identity_weight * max(0, mean P(identity) -
max_identity)``; the read-off also keeps at most ``max_identity`` of the positions identity.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformers import flops, models
from jaxformers.blocks import Block
from jaxformers.config import EncoderConfig
from jaxformers.layout import BLOCKS, BlockSpec, format_layout
from jaxformers.mixers import MIXERS
from jaxformers.params import param_shapes

SUBLAYERS = ("ffn", "identity")   # the candidates that are no token mixer


def candidate_names() -> tuple[str, ...]:
  """Every candidate a search may name: the registered token mixers with ``search=True``, then ``ffn`` and
  ``identity``."""
  return tuple(m for m in MIXERS if MIXERS.get(m).search) + SUBLAYERS


def _block_named(spec: BlockSpec) -> str | None:
  for name in BLOCKS:
    b = BLOCKS.get(name)
    if (b.mixer, b.mlp, b.parallel, b.pre_ln) == (spec.mixer, spec.mlp, spec.parallel, spec.pre_ln):
      return name
  return None


def check_candidate(name: str) -> None:
  """Raise ValueError (one line) unless ``name`` is a search candidate with the block types the search needs."""
  if name in SUBLAYERS:
    return
  accepted = ", ".join(candidate_names())
  if name not in MIXERS:
    raise ValueError(f"unknown candidate {name!r}; accepted: {accepted}")
  if not MIXERS.get(name).search:
    raise ValueError(f"token mixer {name!r} is not an architecture-search candidate (its MixerSpec has "
                     f"search=False); accepted: {accepted}")
  if _block_named(BlockSpec(name, False)) is None:
    raise ValueError(f"candidate {name!r} needs a registered single-sublayer post-LN block of it "
                     f"(BlockSpec({name!r}, mlp=False)) and there is none")


def candidate_block(name: str) -> str | None:
  """The single-sublayer block type candidate ``name`` is (None: identity)."""
  check_candidate(name)
  if name == "identity":
    return None
  return "ffn" if name == "ffn" else _block_named(BlockSpec(name, False))


def merged_block(mixer_block: str) -> str | None:
  """The serial post-LN block of a single-sublayer mixer block followed by ``ffn`` (``attention`` -> ``serial``),
  or None where none is registered."""
  spec = BLOCKS.get(mixer_block)
  return _block_named(BlockSpec(spec.mixer, True)) if spec.mixer else None


class ArchParam(nnx.Variable):
  """Architecture logits: learnt by the architecture optimizer only, never mixed with the weights (nnx.Param)."""


class Temperature(nnx.Variable):
  """The Gumbel-softmax temperature, set by the search step each step (not learnt)."""


def gumbel_softmax(logits: jax.Array, key: jax.Array | None, tau, hard: bool = False) -> jax.Array:
  """``softmax((logits + Gumbel noise) / tau)`` over the last axis (no noise when ``key`` is None); with
  ``hard`` the forward value is the one-hot of the largest entry and the gradient that of the soft weights."""
  logits = logits.astype(jnp.float32)
  if key is not None:
    logits = logits + jax.random.gumbel(key, logits.shape, jnp.float32)
  y = jax.nn.softmax(logits / tau, axis=-1)
  if hard:
    one = jax.nn.one_hot(jnp.argmax(y, axis=-1), y.shape[-1], dtype=y.dtype)
    y = one + y - jax.lax.stop_gradient(y)
  return y


def temperature(step, start: float, end: float, warmup: int, total: int):
  """Exponential annealing from ``start`` (up to the end of the warm-up) to ``end`` (at ``total``):
  ``start * (end / start) ** ((step - warmup) / (total - warmup))``, clipped to that interval."""
  span = max(total - warmup, 1)
  frac = jnp.clip((jnp.asarray(step, jnp.float32) - warmup) / span, 0.0, 1.0)
  return start * (end / start) ** frac


class Choice(nnx.Module):
  """One search position: the candidates' outputs mixed by the Gumbel-softmax of this position's logits."""

  def __init__(self, cfg: EncoderConfig, candidates: tuple[str, ...], *, hard: bool = False, rngs: nnx.Rngs):
    self.candidates = tuple(candidates)
    self.options = nnx.Dict({c: Block(cfg, BLOCKS.get(candidate_block(c)), rngs=rngs)
                             for c in self.candidates if c != "identity"})
    self.logits = ArchParam(jnp.zeros((len(self.candidates),), jnp.float32))
    self.tau = Temperature(jnp.ones((), jnp.float32))
    self.hard = hard
    self.deterministic = False
    self.rngs = rngs["dropout"].fork()

  has_attention = False   # a supernet position offers no single attention to distil from

  def weights(self) -> jax.Array:
    """The mixing weights: Gumbel-softmax in training, ``softmax(logits)`` in eval mode."""
    if self.deterministic:
      return jax.nn.softmax(self.logits[...].astype(jnp.float32))
    return gumbel_softmax(self.logits[...], self.rngs(), self.tau[...], self.hard)

  def __call__(self, x_BLD: jax.Array, seq, select_BS: jax.Array | None = None) -> jax.Array:
    w = self.weights()
    out = None
    for i, c in enumerate(self.candidates):
      if c == "identity":
        y = x_BLD if select_BS is None else jnp.take_along_axis(x_BLD, select_BS[..., None], axis=1)
      else:
        y = self.options[c](x_BLD, seq, select_BS=select_BS)
      y = w[i].astype(y.dtype) * y
      out = y if out is None else out + y
    return out


# --- building the supernet from a model ------------------------------------------------------------------------

def positions_of(blocks: tuple[str, ...]) -> list[tuple[int, str]]:
  """The search positions of a layout: ``(source block, "mixer" | "mlp")`` for each sublayer in order."""
  out = []
  for i, name in enumerate(blocks):
    spec = BLOCKS.get(name)
    if spec.pre_ln:
      raise ValueError(f"block {name!r} (layer {i}) is pre-LN; the search space's candidates are post-LN sublayers "
                       f"(serial, parallel, fourier, sparse, attention, ffn blocks can be searched)")
    if spec.mixer:
      out.append((i, "mixer"))
    if spec.mlp:
      out.append((i, "mlp"))
  return out


def _copy(dst, src) -> None:
  """``src``'s parameters into ``dst`` as new arrays: two positions take the same source sublayer, and the train
  step donates its parameters, so no two candidates may share a buffer."""
  state = nnx.state(src, nnx.Param)
  if jax.tree.leaves(state):        # a sublayer without parameters (Fourier mixing) has nothing to copy
    nnx.update(dst, jax.tree.map(lambda x: jnp.array(x, copy=True), state))


def _source_sublayer(blocks, i: int, kind: str, like=None):
  """The block nearest to ``i`` (itself first, then by distance, lower first) with a sublayer of ``kind``:
  ``"mlp"``, or ``"mixer"``: a token mixer whose parameters have the names and shapes of ``like``'s (any token
  mixer when ``like`` has no parameters)."""
  want = None if like is None else param_shapes(like)
  order = sorted(range(len(blocks)), key=lambda j: (abs(j - i), j))
  for j in order:
    b = blocks[j]
    if kind == "mlp" and b.mlp is not None:
      return b
    if kind == "mixer" and b.mixer is not None and (not want or param_shapes(b.mixer) == want):
      return b
  return None


def _norm_of(block, kind: str):
  if block.spec.parallel:
    return block.norm
  return block.mlp_norm if kind == "mlp" else block.mixer_norm


def to_supernet(model, candidates: tuple[str, ...], *, hard: bool = False, rngs: nnx.Rngs):
  """Replace ``model``'s encoder blocks (in place) by one :class:`Choice` per sublayer position; each candidate
  starts from the weights of the source sublayer of its kind (see the module docstring). Returns ``model``."""
  enc = models.encoder_of(model)
  cfg = enc.config
  src = list(enc.blocks)
  choices = []
  for i, _ in positions_of(cfg.blocks):
    ch = Choice(cfg, candidates, hard=hard, rngs=rngs)
    for c, block in ch.options.items():
      if c == "ffn":
        s = _source_sublayer(src, i, "mlp")
      else:
        s = _source_sublayer(src, i, "mixer", like=block.mixer)
      if s is None:
        continue                       # e.g. attention where the source has only Fourier mixing: new weights
      if c == "ffn":
        _copy(block.mlp, s.mlp)
        _copy(block.mlp_norm, _norm_of(s, "mlp"))
      else:
        if param_shapes(block.mixer):   # s's mixer has the same parameters; one without them takes the norm only
          _copy(block.mixer, s.mixer)
        _copy(block.mixer_norm, _norm_of(s, "mixer"))
    choices.append(ch)
  enc.blocks = nnx.List(choices)
  return model


def choices_of(model) -> list[Choice]:
  return [b for b in models.encoder_of(model).blocks if isinstance(b, Choice)]


# --- cost -------------------------------------------------------------------------------------------------------

def candidate_flops(cfg: EncoderConfig, length: int, name: str) -> float:
  """Forward FLOPs per token of one candidate sublayer at sequence length ``length`` (:mod:`jaxformers.flops`, at
  the config's full head count and feed-forward width)."""
  check_candidate(name)
  if name == "identity":
    return 0.0
  if name == "ffn":
    return flops.ffn_flops(cfg)
  return flops.mixer_flops(cfg, name, length)


def source_flops(cfg: EncoderConfig, length: int) -> float:
  """FLOPs per token of the source layout's blocks (the cost the search's budget is relative to)."""
  return flops.model_flops(cfg, length)


def layout_flops(cfg: EncoderConfig, layout_blocks, length: int) -> float:
  """FLOPs per token of the blocks of a layout (block names)."""
  return flops.layout_flops(cfg, layout_blocks, length)


def cost_table(cfg: EncoderConfig, candidates: tuple[str, ...], length: int) -> np.ndarray:
  return np.asarray([candidate_flops(cfg, length, c) for c in candidates], np.float64)


def probabilities(logits_PC) -> jax.Array:
  return jax.nn.softmax(jnp.asarray(logits_PC, jnp.float32), axis=-1)


def arch_logits(params) -> jax.Array:
  """``[positions, candidates]`` logits from a supernet or a params state holding its :class:`ArchParam` s."""
  state = nnx.state(params, ArchParam) if isinstance(params, nnx.Module) else nnx.filter_state(params, ArchParam)
  flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]

  def position(path) -> int:
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    return int(keys[keys.index("blocks") + 1])
  flat = sorted(flat, key=lambda kv: position(kv[0]))
  return jnp.stack([jnp.asarray(v[...] if isinstance(v, nnx.Variable) else v) for _, v in flat])


# --- read-off and derivation -------------------------------------------------------------------------------------

def _identity_cap(candidates: tuple[str, ...], n: int, max_identity: float) -> int:
  return min(int(math.floor(max_identity * n + 1e-9)), n - 1) if "identity" in candidates else n


def choose(logits_PC, candidates: tuple[str, ...], max_identity: float = 1.0, costs=None,
           budget: float | None = None) -> list[str]:
  """One candidate per position: the largest logit (ties: the earlier candidate), with at most
  ``floor(max_identity * positions)`` identities (those with the smallest lead over their runner-up are
  replaced by it) and never all of them.

  With ``costs`` (per candidate, e.g. :func:`cost_table`) and ``budget``, the choice is also held to
  ``sum of the chosen costs <= budget``: when the pick above costs more, it is the most probable choice within the
  budget and the identity cap (the largest sum over positions of ``log softmax(logits)``, :func:`within_budget`),
  or, when nothing fits, the cheapest one allowed."""
  logits = np.asarray(logits_PC, np.float64)
  n = logits.shape[0]
  picks = [int(np.argmax(row)) for row in logits]
  cap = _identity_cap(candidates, n, max_identity)
  if "identity" in candidates:
    ident = candidates.index("identity")
    ids = [p for p in range(n) if picks[p] == ident]
    if len(ids) > cap:
      def runner_up(p):
        row = logits[p].copy()
        row[ident] = -np.inf
        return int(np.argmax(row))
      lead = sorted(ids, key=lambda p: (logits[p, ident] - logits[p, runner_up(p)], p))
      for p in lead[:len(ids) - cap]:
        picks[p] = runner_up(p)
  if costs is not None and budget is not None:
    costs = np.asarray(costs, np.float64)
    if costs[picks].sum() > budget * (1 + 1e-9):
      picks = within_budget(logits, costs, budget, candidates.index("identity") if "identity" in candidates else -1,
                            cap)
  return [candidates[k] for k in picks]


def within_budget(logits_PC: np.ndarray, costs_C: np.ndarray, budget: float, identity: int, cap: int) -> list[int]:
  """The candidate indices that maximise ``sum_p log softmax(logits_p)[k_p]`` subject to ``sum_p costs[k_p] <=
  budget`` and at most ``cap`` positions choosing ``identity`` (index, -1: none); the cheapest allowed choice
  when none fits. Exact: a dynamic programme over positions keeping, per identity count, the choices not worse in
  both cost and probability than another."""
  logp = logits_PC - logits_PC.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  # states[n_identity] = list of (cost, log-probability, picks), no entry dominated by another
  states: dict[int, list] = {0: [(0.0, 0.0, ())]}
  for row in logp:
    grown: dict[int, list] = {}
    for n_id, entries in states.items():
      for k in range(len(costs_C)):
        m = n_id + (k == identity)
        if m > cap:
          continue
        bucket = grown.setdefault(m, [])
        bucket.extend((cost + costs_C[k], lp + row[k], picks + (k,)) for cost, lp, picks in entries)
    states = {m: _front(v) for m, v in grown.items()}
  every = [e for v in states.values() for e in v]
  fits = [e for e in every if e[0] <= budget * (1 + 1e-9)]
  if fits:
    return list(max(fits, key=lambda e: (e[1], [-k for k in e[2]]))[2])
  return list(min(every, key=lambda e: (e[0], -e[1]))[2])


def _front(entries: list) -> list:
  """The entries no other is at least as cheap and as probable as (ties: the earlier candidates)."""
  out, best = [], -np.inf
  for e in sorted(entries, key=lambda e: (e[0], -e[1], e[2])):
    if e[1] > best:
      out.append(e)
      best = e[1]
  return out


def chosen_blocks(chosen: list[str]) -> list[tuple[str, list[int]]]:
  """``(block name, positions it takes its sublayers from)`` of the derived model: identities dropped, a mixer
  followed by ``ffn`` merged into one serial-style block."""
  out, p = [], 0
  while p < len(chosen):
    c = chosen[p]
    name = candidate_block(c)
    if name is None:
      p += 1
      continue
    merged = merged_block(name) if c != "ffn" else None
    if merged is not None and p + 1 < len(chosen) and chosen[p + 1] == "ffn":
      out.append((merged, [p, p + 1]))
      p += 2
      continue
    out.append((name, [p]))
    p += 1
  return out


def format_chosen(chosen: list[str]) -> str:
  """The layout string of one candidate per position (identities dropped, mixer + ``ffn`` merged)."""
  return format_layout(tuple(b for b, _ in chosen_blocks(chosen)))


def read_off(logits_PC, candidates: tuple[str, ...], max_identity: float = 1.0, costs=None,
             budget: float | None = None) -> str:
  """The found layout as a layout string (e.g. ``serial*2,ffn*3``); ``costs`` and ``budget`` as in :func:`choose`."""
  return format_chosen(choose(logits_PC, candidates, max_identity, costs, budget))


def derive(supernet, max_identity: float = 1.0, rngs: nnx.Rngs | None = None, chosen: list[str] | None = None):
  """The model of the read-off layout (same task and head) whose blocks carry exactly the chosen candidates'
  weights; embeddings, pooler and head are the supernet's. ``chosen`` (one candidate per position) overrides the
  read-off of the supernet's logits. Returns ``(model, layout)``."""
  enc = models.encoder_of(supernet)
  choices = choices_of(supernet)
  cands = choices[0].candidates
  if chosen is None:
    chosen = choose(np.asarray(arch_logits(supernet)), cands, max_identity)
  elif len(chosen) != len(choices) or any(c not in cands for c in chosen):
    raise ValueError(f"chosen={chosen}: expected one of {', '.join(cands)} for each of the {len(choices)} positions")
  plan = chosen_blocks(chosen)
  layout = format_layout(tuple(b for b, _ in plan))
  cfg = enc.config.replace(layout=layout)
  task = models.task_of(supernet)
  rngs = rngs if rngs is not None else nnx.Rngs(params=0, dropout=1)
  model = models.build(task, cfg, num_labels=getattr(supernet, "num_labels", None),
                       head=supernet.classifier.style if hasattr(supernet, "classifier") else None, rngs=rngs)
  # everything outside the blocks: same paths in both models
  new_enc = models.encoder_of(model)
  _copy(new_enc.embeddings, enc.embeddings)
  if enc.pooler is not None and new_enc.pooler is not None:
    _copy(new_enc.pooler, enc.pooler)
  for name in ("classifier", "lm_head", "nsp"):
    if hasattr(supernet, name) and getattr(supernet, name) is not None:
      _copy(getattr(model, name), getattr(supernet, name))
  for block, (_, ps) in zip(new_enc.blocks, plan):
    for p in ps:
      cand = choices[p].options[chosen[p]]
      if cand.mixer is not None:
        _copy(block.mixer, cand.mixer)
        _copy(block.mixer_norm, cand.mixer_norm)
      if cand.mlp is not None:
        _copy(block.mlp, cand.mlp)
        _copy(block.mlp_norm, cand.mlp_norm)
  return model, layout


def arrange_as_searched(model, candidates: tuple[str, ...], chosen: list[str], rngs: nnx.Rngs | None = None):
  """``model``, the source a search started from, in the layout ``chosen`` reads off as, each block holding the
  source sublayers the chosen candidates started from in the search (:func:`to_supernet`), not those a
  re-arrangement by depth would give it; candidates without a source sublayer are initialised from ``rngs``.
  ``model`` itself becomes a supernet. Returns ``(model, layout)``."""
  rngs = rngs if rngs is not None else nnx.Rngs(params=0, dropout=1)
  return derive(to_supernet(model, tuple(candidates), rngs=rngs), rngs=rngs, chosen=list(chosen))


# --- plots ------------------------------------------------------------------------------------------------------

def heatmap(steps: list[int], probs_TPC: np.ndarray, candidates: tuple[str, ...], path, title: str = ""):
  """One panel per candidate: its probability at each position (rows, first layer on top) over steps, each column
  centred on its step. Drawn on a figure of its own, without pyplot, so the process's matplotlib backend (a
  notebook's inline one) is left alone. Returns the figure."""
  from matplotlib.figure import Figure   # optional: the study extra, for plots only
  probs = np.asarray(probs_TPC)
  n_c = len(candidates)
  fig = Figure(figsize=(3.2 * n_c + 1, 0.35 * probs.shape[1] + 2))
  first, last = (steps[0], steps[-1]) if steps else (0, probs.shape[0] - 1)
  half = (last - first) / (2 * (probs.shape[0] - 1)) if probs.shape[0] > 1 and last > first else 0.5  # column centres
  axes = fig.subplots(1, n_c, squeeze=False, sharey=True)
  for k, c in enumerate(candidates):
    ax = axes[0, k]
    im = ax.imshow(probs[:, :, k].T, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest",
                   extent=(first - half, last + half, probs.shape[1] - 0.5, -0.5))
    ax.set_title(f"P({c})")
    ax.set_xlabel("step")
    if k == 0:
      ax.set_ylabel("position (sublayer, input side at the top)")
  fig.colorbar(im, ax=axes[0, :].tolist(), shrink=0.8)
  if title:
    fig.suptitle(title)
  fig.savefig(path, dpi=110)
  return fig
