"""Architecture search as a trainer task: ``config.search.enabled`` wraps the run's task in :class:`Searched`.

The model is the task's model made a supernet (:func:`jaxformers.search.to_supernet`); its parameters are the
weights (``nnx.Param``) and the architecture logits (:class:`jaxformers.search.ArchParam`), each with its own
optimizer (the run's AdamW for the weights, Adam at ``search.arch_lr`` for the logits; their states are
``opt_state["weights"]`` and ``opt_state["arch"]``). A fixed random ``search.heldout_fraction`` of the training
examples is held out: each step updates the weights on a training batch (logits fixed), and, after
``search.warmup_steps`` and every ``search.arch_every`` steps, the logits on a held-out batch (weights fixed,
first-order bi-level updates) with the compute-aware penalties of :mod:`jaxformers.search`. Both run inside the
one jitted, sharded step; the held-out batcher's position is saved with the training batcher's, so a resumed
search is bit-identical.

Each train log line carries every position's probabilities (``arch/p{i}/{candidate}``), the expected FLOPs
ratio, the temperature and, when that step updated the architecture, the held-out loss (``arch_loss``).
At the end: ``summary.json["search"]`` (layout, probabilities, FLOPs), ``DIR/search_heatmap.png``,
``DIR/derived`` (the derived model with the chosen candidates' weights and the tokenizer, a native checkpoint)
and the ``train.py`` command that trains it; with ``search.then_train`` that training runs in
``DIR/derived_train``.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxformers import search as S
from jaxformers.checkpoints.pretrained import save_pretrained
from jaxformers.data import batching, tokenize
from jaxformers.errors import ConfigError
from jaxformers.train import optim, steps
from jaxformers.train.context import FollowUp, TaskContext
from jaxformers.train.task_base import Task, TaskWrapper

log = logging.getLogger("jaxformers.train")
HELD = "heldout/"
READ_OFFS = ("target", "argmax")


def candidates_of(c) -> tuple[str, ...]:
  return tuple(x.strip() for x in str(c.search.candidates).split(",") if x.strip())


def check_search(c) -> None:
  """Every ``config.search`` value the search would fail on or misuse, as one ConfigError line."""
  s = c.search
  cands = candidates_of(c)
  accepted = ", ".join(S.candidate_names())
  if not cands:
    raise ConfigError(f"config.search.candidates={s.candidates!r}: the search space is empty; name at least two of "
                      f"{accepted} (comma-separated)")
  for x in cands:
    try:
      S.check_candidate(x)
    except ValueError as e:
      raise ConfigError(f"config.search.candidates: {e}") from None
  if len(set(cands)) != len(cands):
    raise ConfigError(f"config.search.candidates={s.candidates!r} names a candidate twice")
  if len(cands) < 2:
    raise ConfigError(f"config.search.candidates={s.candidates!r}: a search needs at least two candidates of "
                      f"{accepted}")
  if cands == ("identity",) or all(x == "identity" for x in cands):
    raise ConfigError("config.search.candidates: identity alone is no architecture")
  if not 0.0 < s.target_flops_ratio <= 1.0:
    raise ConfigError(f"config.search.target_flops_ratio={s.target_flops_ratio}: must be in (0, 1] (the expected "
                      f"FLOPs per token relative to the source layout's)")
  if s.read_off not in READ_OFFS:
    raise ConfigError(f"config.search.read_off={s.read_off!r}: expected one of {', '.join(READ_OFFS)} ('target': the "
                      f"most probable layout within target_flops_ratio; 'argmax': each position's most probable "
                      f"candidate)")
  if not 0.0 < s.heldout_fraction < 1.0:
    raise ConfigError(f"config.search.heldout_fraction={s.heldout_fraction}: must be in (0, 1)")
  if not 0.0 <= s.max_identity < 1.0:
    raise ConfigError(f"config.search.max_identity={s.max_identity}: must be in [0, 1)")
  if not (s.tau_start > 0 and s.tau_end > 0):
    raise ConfigError(f"config.search.tau_start={s.tau_start}, tau_end={s.tau_end}: temperatures must be positive")
  for key, low in (("arch_every", 1), ("warmup_steps", 0), ("heldout_batch_size", 0), ("then_train_steps", 0)):
    if s[key] < low:
      raise ConfigError(f"config.search.{key}={s[key]}: must be at least {low}")
  for key in ("arch_lr", "cost_weight", "identity_weight"):
    if s[key] < 0:
      raise ConfigError(f"config.search.{key}={s[key]}: must be at least 0")
  if c.distill.teacher and (c.distill.attention or c.distill.value):
    raise ConfigError(f"config.distill.attention={c.distill.attention}, distill.value={c.distill.value} with "
                      f"config.search.enabled: a supernet position mixes several candidates and has no one attention "
                      f"to compare with the teacher's; distil a search with distill.logits and distill.hidden")
  if c.mode == "train" and c.data.packing:
    raise ConfigError("config.search.enabled with config.data.packing=True: the search runs on padded batches; set "
                      "data.packing=False")


class BiLevel:
  """The weights' and the architecture logits' optimizers side by side: ``init(params)`` gives
  ``{"weights": ..., "arch": ...}``; the search step updates each part with its own."""

  def __init__(self, weights: optax.GradientTransformation, arch: optax.GradientTransformation):
    self.weights, self.arch = weights, arch

  def init(self, params):
    a, w = nnx.split_state(params, S.ArchParam, ...)
    return {"weights": self.weights.init(w), "arch": self.arch.init(a)}


class _WithHeldout:
  """Training batches with a held-out batch under ``heldout/`` keys; both batchers' positions are its state."""

  def __init__(self, train, heldout):
    self.train, self.heldout = train, heldout

  @property
  def batches_per_epoch(self) -> int:
    """The training batcher's (an epoch is one of the training examples)."""
    return self.train.batches_per_epoch

  @property
  def epoch(self) -> int:
    return self.train.epoch

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    b = next(self.train)
    h = next(self.heldout)
    return {**b, **{HELD + k: v for k, v in h.items()}}

  def state(self) -> dict:
    return {"train": self.train.state(), "heldout": self.heldout.state()}

  def restore(self, state: dict) -> None:
    if "heldout" not in state:
      raise ValueError("the checkpoint's data state has no held-out batcher: it was not written by a search")
    self.train.restore(state["train"])
    self.heldout.restore(state["heldout"])


class Searched(TaskWrapper):
  """The run's task, searched: same data, loss, metrics and head; a supernet model and a bi-level step."""

  param_filter = (nnx.Param, S.ArchParam)

  def __init__(self, inner: Task, c):
    super().__init__(inner)
    self.c = c
    self.s = c.search
    self.candidates = candidates_of(c)

  # --- model and data ------------------------------------------------------------------------------------------
  def build_model(self, cfg, rngs):
    try:
      S.positions_of(cfg.blocks)
    except ValueError as e:
      raise ConfigError(f"config.model.layout={cfg.layout!r}: {e}") from None
    return S.to_supernet(self.inner.build_model(cfg, rngs), self.candidates, hard=bool(self.s.hard), rngs=rngs)

  def adapt_pretrained(self, model):
    """The checkpoint made a supernet: candidates take its sublayers (the same mapping as for a new model)."""
    model = self.inner.adapt_pretrained(model)
    return S.to_supernet(model, self.candidates, hard=bool(self.s.hard),
                         rngs=nnx.Rngs(params=self.c.seed, dropout=self.c.seed + 1))

  def _indices(self, n: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(self.c.seed + 7919).permutation(n)
    k = max(1, int(round(self.s.heldout_fraction * n)))
    return np.sort(perm[k:]), np.sort(perm[:k])

  def examples(self, split: str):
    if split not in ("train", "search_heldout"):
      return self.inner.examples(split)
    ex = self.inner.examples("train")
    if len(ex) < 2:
      raise ConfigError(f"the training split has {len(ex)} examples: a search needs some to hold out")
    train, held = self._indices(len(ex))
    return ex.subset(train if split == "train" else held)

  def prepare(self, ctx: TaskContext) -> None:
    self.inner.prepare(ctx)
    self.cfg = ctx.model_config
    self.length = ctx.max_length
    self.costs = S.cost_table(self.cfg, self.candidates, self.length)
    self.source_cost = S.source_flops(self.cfg, self.length)
    self.positions = len(S.positions_of(self.cfg.blocks))

  # --- the trainer's hooks ---------------------------------------------------------------------------------------
  def optimizer(self, c, total_steps: int):
    self.total = total_steps
    weights, lr = optim.adamw(c.optim, total_steps)
    return BiLevel(weights, optax.adam(self.s.arch_lr, b1=0.5, b2=0.999)), lr

  def train_batches(self, ctx: TaskContext, batches):
    """The inner task's training batches (``batches``) with a held-out batch each (:class:`_WithHeldout`)."""
    batches = self.inner.train_batches(ctx, batches)
    held = tokenize.encode(ctx.tokenizer, self.examples("search_heldout"), ctx.max_length, ctx.data.on_too_long)
    bs = self.s.heldout_batch_size or self.c.data.batch_size
    hb = batching.TrainBatches(held, bs, self.c.seed + 1, ctx.max_length, ctx.special["pad"],
                               mlm=self.mlm_options(ctx.tokenizer, ctx.special))
    # every batch padded to max_length: one compiled shape for the (large) search step instead of one per bucket
    hb.buckets = hb.buckets[-1:]
    batches.buckets = batches.buckets[-1:]
    return _WithHeldout(batches, hb)

  def batch_shardings(self, ctx: TaskContext) -> dict:
    base = self.inner.batch_shardings(ctx)
    return {**base, **{HELD + k: v for k, v in base.items()}}

  def make_train_step(self, graphdef, tx: BiLevel, lr_fn, accum_steps: int = 1, max_segments: int | None = None):
    return make_search_step(graphdef, tx, lr_fn, self.inner, accum_steps, max_segments, self)

  def follow_up(self, ctx: TaskContext, summary: dict) -> FollowUp | None:
    """With ``search.then_train``, training the derived model once the search has finished (also when a finished
    search is run again and its derived model has not been trained yet)."""
    search = summary.get("search")
    if self.s.then_train and search and "derived_train" not in search and jax.process_index() == 0:
      return FollowUp(derived_config(self.c, ctx.workdir), ctx.workdir / "derived_train")
    return None

  def record_follow_up(self, ctx: TaskContext, summary: dict, follow: FollowUp, result: dict) -> dict:
    """``summary["search"]["derived_train"]``: the derived model's training; a finished search run again also says
    what its summary.json gained (``updated``)."""
    derived = {"workdir": str(follow.workdir), "eval": result.get("eval", {}), "wall_time_s": result.get("wall_time_s")}
    summary = dict(summary, search=dict(summary["search"], derived_train=derived))
    if summary.get("already_done"):
      summary["updated"] = ["search.derived_train"]
    return summary

  def log_metrics(self, m: dict) -> dict:
    probs = np.asarray(m["arch_probs"])
    out = {"expected_flops_ratio": float(m["expected_flops_ratio"]), "temperature": float(m["temperature"])}
    if bool(m["arch_update"]):     # the held-out loss exists on architecture steps only
      out["arch_loss"] = float(m["arch_loss"])
    for p in range(probs.shape[0]):
      for k, name in enumerate(self.candidates):
        out[f"arch/p{p}/{name}"] = float(probs[p, k])
    return out

  def _flops(self, chosen: list[str]) -> float:
    """Forward FLOPs per token of the layout ``chosen`` (one candidate per position) reads off as."""
    return S.layout_flops(self.cfg, [b for b, _ in S.chosen_blocks(chosen)], self.length)

  def finish(self, ctx: TaskContext, state, summary: dict) -> dict:
    """Read off the layout, save the derived model, its train.py config and the heat-map; ``{"search": ...}`` for
    the summary. Nothing while the search is unfinished (``train.stop_after``: the resumed run does it)."""
    if jax.process_index() != 0 or not summary.get("finished"):
      return {}
    logits = np.asarray(jax.device_get(S.arch_logits(state["params"])))
    probs = np.asarray(S.probabilities(logits))
    argmax = S.choose(logits, self.candidates, self.s.max_identity)
    budget = self.s.target_flops_ratio * self.source_cost
    chosen = argmax if self.s.read_off == "argmax" else S.choose(logits, self.candidates, self.s.max_identity,
                                                                  self.costs, budget)
    found, argmax_flops = self._flops(chosen), self._flops(argmax)
    within = found <= budget * (1 + 1e-9)
    if not within:
      log.warning("search: the read-off layout costs %.1f%% of the source's FLOPs/token, above "
                  "search.target_flops_ratio=%.3g%s", 100 * found / self.source_cost, self.s.target_flops_ratio,
                  "" if self.s.read_off == "argmax" else " (no layout within the identity cap fits)")
    supernet = nnx.merge(ctx.graphdef, jax.device_get(state["params"]), jax.device_get(state["rngs"]))
    derived, layout = S.derive(supernet, self.s.max_identity, chosen=chosen,
                               rngs=nnx.Rngs(params=self.c.seed, dropout=self.c.seed + 1))
    workdir = ctx.workdir
    out_dir = workdir / "derived"
    save_pretrained(derived, out_dir, overwrite=out_dir.exists(), tokenizer=workdir)
    steps_, hist = heat_history(workdir / "metrics.jsonl", len(self.candidates), self.positions, self.candidates)
    png = workdir / "search_heatmap.png"
    if steps_:
      S.heatmap(steps_, hist, self.candidates, png, title=f"search: {layout}")
    cmd = write_derived_config(self.c, workdir)
    log.info("search found layout %s (%.1f%% of the source's FLOPs/token); derived model in %s", layout,
             100 * found / self.source_cost, out_dir)
    held = "" if chosen == argmax else (f"; each position's most probable candidate would read "
                                        f"{S.format_chosen(argmax)}, {100 * argmax_flops / self.source_cost:.1f}%")
    print(f"found layout: {layout}  ({100 * found / self.source_cost:.1f}% of {self.cfg.layout}'s FLOPs/token, target "
          f"{100 * self.s.target_flops_ratio:.1f}%{held})\n"
          f"wrote {out_dir} (the derived model), {png if steps_ else '(no heat-map: no logged steps)'}, "
          f"{workdir / 'summary.json'} (summary['search']) and {workdir / 'derived_config.py'}\n"
          f"train it: {cmd}", flush=True)
    return {"search": {
        "layout": layout, "chosen": chosen, "candidates": list(self.candidates), "source_layout": self.cfg.layout,
        "source": ctx.init_from or "", "read_off": self.s.read_off,
        "target_flops_ratio": float(self.s.target_flops_ratio), "within_target": within,
        "argmax_layout": S.format_chosen(argmax), "argmax_flops_ratio": argmax_flops / self.source_cost,
        "probabilities": probs.round(6).tolist(), "flops_per_token": found, "source_flops_per_token": self.source_cost,
        "flops_ratio": found / self.source_cost, "sequence_length": self.length,
        "expected_flops_ratio": float((probs * self.costs).sum() / self.source_cost),
        "derived_dir": str(out_dir), "heatmap": str(png) if steps_ else None, "train_command": cmd}}


def heat_history(path, n_cand: int, n_pos: int, candidates) -> tuple[list[int], np.ndarray]:
  """Steps and ``[steps, positions, candidates]`` probabilities of the train log lines in ``metrics.jsonl``
  (the last record of a step wins, so a resumed run's history has each step once)."""
  rows = {}
  if not path.is_file():
    return [], np.zeros((0, n_pos, n_cand))
  for line in path.read_text().splitlines():
    rec = json.loads(line)
    if rec.get("kind") != "train" or f"arch/p0/{candidates[0]}" not in rec:
      continue
    rows[rec["step"]] = [[rec[f"arch/p{p}/{c}"] for c in candidates] for p in range(n_pos)]
  steps_ = sorted(rows)
  return steps_, np.asarray([rows[s] for s in steps_], np.float64).reshape(len(steps_), n_pos, n_cand)


DERIVED_CONFIG = '''"""Train the model the architecture search in this directory derived (derived/), with the search's data and
settings (derived_config.json), as search.then_train does. Written by the search:

  python train.py --config {path} --workdir {workdir}
"""
import json
from pathlib import Path

from jaxformers.train.defaults import base_config, fill_from


def get_config(arg=None):
  c = fill_from(base_config(), json.loads((Path(__file__).parent / "derived_config.json").read_text()))
  c.lock()
  return c
'''


def write_derived_config(c, workdir: Path) -> str:
  """``DIR/derived_config.py`` (and the .json it reads): the train.py config that trains the derived model as
  ``search.then_train`` does (:meth:`Searched.follow_up`); the command that runs it."""
  path, out = workdir / "derived_config.py", workdir / "derived_train"
  (workdir / "derived_config.json").write_text(derived_config(c, workdir).to_json(indent=2) + "\n")
  path.write_text(DERIVED_CONFIG.format(path=path, workdir=out))
  return f"python train.py --config {path} --workdir {out}"


def derived_config(c, workdir):
  """The search's config turned into the one that trains its derived model."""
  c2 = copy.deepcopy(c)
  with c2.unlocked():
    c2.search.enabled = False
    c2.init_from = str(workdir / "derived")
    c2.model.layout = ""
    c2.data.tokenizer = ""
    if c.search.then_train_steps:
      c2.train.num_steps = c.search.then_train_steps
      c2.train.num_epochs = 0.0
  return c2


def search_penalties(logits_PC, costs_C, source_cost: float, s, ident: int | None):
  """``(penalty, expected FLOPs ratio, probabilities)`` of the architecture logits ``[positions, candidates]``:
  ``cost_weight * max(0, E[cost] / source_cost - target_flops_ratio)`` with ``E[cost]`` the sum over positions of
  ``softmax(logits) @ costs_C``, plus (``ident``: the identity candidate's index) ``identity_weight * max(0,
  mean P(identity) - max_identity)``."""
  probs = S.probabilities(logits_PC)
  ratio = jnp.sum(probs * costs_C) / source_cost
  pen = s.cost_weight * jax.nn.relu(ratio - s.target_flops_ratio)
  if ident is not None:
    pen = pen + s.identity_weight * jax.nn.relu(jnp.mean(probs[:, ident]) - s.max_identity)
  return pen, ratio, probs


def _set_temperature(rngs, tau):
  return jax.tree.map(lambda v: v.replace(jnp.asarray(tau, jnp.float32)) if isinstance(v, S.Temperature) else v,
                      rngs, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_search_step(graphdef, tx: BiLevel, lr_fn, task, accum_steps: int, max_segments: int | None, search):
  """``step(state, batch, inputs) -> (state, metrics)``: the weights' update on the training batch, then (after the
  warm-up, every ``arch_every`` steps) the logits' update on the held-out batch at the weights before this step."""
  s = search.s
  grads = steps.make_grads(graphdef, task, accum_steps, max_segments, param_filter=Searched.param_filter)
  costs = jnp.asarray(search.costs, jnp.float32)
  source_cost = float(search.source_cost)
  ident = search.candidates.index("identity") if "identity" in search.candidates else None
  warmup, every = int(s.warmup_steps), int(s.arch_every)

  def penalties(arch):
    return search_penalties(S.arch_logits(arch), costs, source_cost, s, ident)

  def arch_grads(arch, weights, rngs, held, inputs):
    def f(a):
      model = nnx.merge(graphdef, nnx.merge_state(weights, a), rngs, copy=True)
      ls, lw, _, _ = task.loss(model, held, inputs, max_segments)
      ce = ls / jnp.maximum(lw, 1.0)
      pen, _, _ = penalties(a)
      return ce + pen, (ce, nnx.split(model, Searched.param_filter, ...)[2])
    (_, (ce, rngs)), g = jax.value_and_grad(f, has_aux=True)(arch)
    return ce, rngs, g

  def step(state, batch, inputs):
    train_b = {k: v for k, v in batch.items() if not k.startswith(HELD)}
    held_b = {k[len(HELD):]: v for k, v in batch.items() if k.startswith(HELD)}
    t = state["step"]
    tau = S.temperature(t, s.tau_start, s.tau_end, warmup, search.total)
    rngs = _set_temperature(state["rngs"], tau)
    params = state["params"]
    arch, weights = nnx.split_state(params, S.ArchParam, ...)
    # weights: gradient on the training batch; the logits' part of it is dropped
    ls, lw, lc, rngs, g = grads(params, rngs, train_b, inputs)
    denom = jnp.maximum(lw, 1.0)
    _, g_w = nnx.split_state(g, S.ArchParam, ...)
    g_w = jax.tree.map(lambda x: x / denom, g_w)
    w_upd, w_opt = tx.weights.update(g_w, state["opt_state"]["weights"], weights)
    new_weights = optax.apply_updates(weights, w_upd)
    # architecture: gradient on the held-out batch, weights fixed
    do_arch = (t >= warmup) & ((t - warmup) % every == 0)

    def run_arch(rngs):
      return arch_grads(arch, weights, rngs, held_b, inputs)

    def skip(rngs):
      return jnp.zeros((), jnp.float32), rngs, jax.tree.map(jnp.zeros_like, arch)
    arch_ce, rngs, g_a = jax.lax.cond(do_arch, run_arch, skip, rngs)
    a_upd, a_opt = tx.arch.update(g_a, state["opt_state"]["arch"], arch)
    new_arch = optax.apply_updates(arch, a_upd)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(do_arch, n, o), new, old)  # noqa: E731
    new_arch, a_opt = keep(new_arch, arch), keep(a_opt, state["opt_state"]["arch"])
    _, ratio, probs = penalties(new_arch)
    new = {"params": nnx.merge_state(new_weights, new_arch), "opt_state": {"weights": w_opt, "arch": a_opt},
           "rngs": rngs, "step": t + 1}
    metrics = {"loss": ls / denom, "accuracy": lc / denom, "grad_norm": optax.global_norm(g_w), "lr": lr_fn(t),
               "weight": lw, "arch_loss": arch_ce, "expected_flops_ratio": ratio, "temperature": tau,
               "arch_probs": probs, "arch_update": do_arch}
    return new, metrics

  return step
