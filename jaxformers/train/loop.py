"""``run(config, workdir)``: build data, model, mesh and steps; train, evaluate, checkpoint, predict."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import signal
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxformers import models
from jaxformers.checkpoints import hub
from jaxformers.checkpoints.pretrained import from_pretrained, saved_layout
from jaxformers.checkpoints.tokenizers import has_tokenizer, load_tokenizer
from jaxformers.checkpoints.workdir import Lock
from jaxformers.config import RUNTIME_FIELDS
from jaxformers.data import batching, tokenize
from jaxformers.errors import CheckpointError, DataError, Interrupted, NonFiniteLoss
from jaxformers.layout import BLOCKS, LayoutError, parse_layout
from jaxformers.mixers import MIXERS
from jaxformers.params import param_shapes
from jaxformers.quant import quantize
from jaxformers.train import checkpoint as ckpt_lib
from jaxformers.train import metrics as metrics_lib
from jaxformers.train import sharding, steps
from jaxformers.train.context import TaskContext
from jaxformers.train.defaults import ConfigError, check_keys, check_values, encoder_config, set_fields
from jaxformers.train.tasks import make_task

log = logging.getLogger("jaxformers.train")


class Run:
  """Everything a run needs, built once: tokenizer, model graph, mesh, shardings, jitted steps."""

  def __init__(self, c, workdir: str | Path, given=()):
    """``given``: the config keys set on the command line (``{"model.hidden_size", ...}``); with ``init_from`` a
    model field among them that the checkpoint fixes to another value is refused rather than dropped."""
    check_keys(c)
    check_values(c)
    self.c = c
    self.given = set(given)
    self.workdir = Path(workdir)
    self.task = make_task(c)
    self.mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp)
    self.rules = sharding.rules_from(c.mesh.rules)
    n_batch_dev = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    per_batch = (("batch_size", c.data.batch_size // c.optim.accum_steps), ("eval_batch_size", c.data.eval_batch_size))
    for name, b in per_batch:
      if b % n_batch_dev:
        raise ConfigError(f"config.data.{name} (per micro-batch {b}) must be divisible by the {n_batch_dev} "
                          f"devices of the batch axes")
    self._build_tokenizer()
    self._build_model()
    self.context = self.task_context()
    self.task.prepare(self.context)
    self.inputs = self.task.inputs()

  def task_context(self) -> TaskContext:
    """The plain, frozen values the task's hooks are given (:class:`jaxformers.train.context.TaskContext`)."""
    return TaskContext(
        workdir=self.workdir, data=ml_collections.FrozenConfigDict(self.c.data), init_from=self.c.init_from,
        model_config=self.cfg, max_length=self.max_length, tokenizer=self.tok,
        special=types.MappingProxyType(dict(self.special)), mesh=self.mesh, rules=self.rules, graphdef=self.gd_eval,
        blocks_with_attention=tuple(bool(b.has_attention) for b in models.encoder_of(self.abstract).blocks))

  # --- tokenizer and model ---------------------------------------------------------------------------------
  def _build_tokenizer(self):
    """The tokenizer: ``data.tokenizer``, else ``init_from``'s, else the run's own (DIR/tokenizer.json), else a
    WordPiece learnt from the training texts. Nothing is written here (see :meth:`save_tokenizer`)."""
    c = self.c
    saved = self.workdir / "tokenizer.json"
    init = hub.resolve(c.init_from) if c.init_from else None  # a directory, or a Hugging Face Hub id
    if c.data.tokenizer:
      try:
        self.tok = load_tokenizer(c.data.tokenizer)
      except CheckpointError as e:
        raise DataError(f"data.tokenizer: {e}") from None
    elif init is not None and has_tokenizer(init):
      self.tok = load_tokenizer(str(init))
    elif saved.is_file():
      self.tok = load_tokenizer(str(saved))
    elif init is not None:
      raise ConfigError(f"config.init_from={c.init_from}: no tokenizer there (tokenizer.json, or vocab.txt / "
                        f"vocab.json + merges.txt); its embeddings only fit the vocabulary it was trained with: set "
                        f"config.data.tokenizer to that tokenizer (a file or directory)")
    else:
      if c.mode != "train":
        raise FileNotFoundError(f"{saved} not found: mode={c.mode} needs the tokenizer of a trained run "
                                f"(or config.data.tokenizer)")
      log.info("training a WordPiece tokenizer (vocab %d) on the training texts", c.data.vocab_size)
      ex = self.task.examples("train")
      self.tok = tokenize.train_wordpiece(ex.text_a + (ex.text_b or []), c.data.vocab_size)
    self.special = tokenize.special_ids(self.tok)

  def save_tokenizer(self):
    """Write DIR/tokenizer.json, once it is known that this run may write into DIR. A different tokenizer
    already there belongs to another run: refuse rather than replace it."""
    saved = self.workdir / "tokenizer.json"
    if jax.process_index() != 0:
      return
    if saved.is_file():
      if load_tokenizer(str(saved)).get_vocab() != self.tok.get_vocab():
        raise ConfigError(f"{saved} holds another tokenizer than this run's (from "
                          f"{self.c.data.tokenizer or self.c.init_from or 'a trained WordPiece'}): the workdir "
                          f"belongs to another run; use a fresh --workdir")
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.tok.save(str(saved))

  def _build_model(self):
    """The model config, the model's abstract graph and its parameters' shardings, and (``init_from``) the
    loaded model, made the one the task trains."""
    c = self.c
    self.pretrained = None
    if c.init_from:
      self._load_init_from()
    else:
      self.cfg = encoder_config(c.model, vocab_size=self.tok.get_vocab_size(), pad_token_id=self.special["pad"])
    # int8 (config.model.quantization) is applied to the restored float model in eval / predict (see _quantized)
    self.quantize = c.model.quantization == "int8"
    if self.cfg.quantization != "none":
      if c.mode == "train":
        raise ConfigError(f"{c.init_from}: an int8 model cannot be trained; fine-tune the float model (with "
                          f"config.model.quant_aware=True for quantization-aware training) and quantize it after")
      self.quantize, self.cfg, self.pretrained = True, self.cfg.replace(quantization="none"), None
    if self.tok.get_vocab_size() > self.cfg.vocab_size:
      raise ConfigError(f"tokenizer has {self.tok.get_vocab_size()} tokens but the model's vocab_size is "
                        f"{self.cfg.vocab_size}")
    self.max_length = self._max_length()

    def make():
      return self.task.build_model(self.cfg, nnx.Rngs(params=c.seed, dropout=c.seed + 1))
    self._make = make
    self.abstract = abstract = nnx.eval_shape(make)
    abstract.train()
    self.param_filter = self.task.param_filter   # what the optimizer learns
    self.gd_train, abs_params, abs_rest = nnx.split(abstract, self.param_filter, ...)
    abstract.eval()
    self.gd_eval = nnx.split(abstract, self.param_filter, ...)[0]
    self.param_sh = sharding.param_shardings(abs_params, self.mesh, self.rules)
    self.rest_sh = jax.tree.map(lambda _: sharding.replicated(self.mesh), abs_rest)
    self.abs_params, self.abs_rest = abs_params, abs_rest
    self.num_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(abs_params)))
    self._check_packing()
    if self.pretrained is not None:
      self.pretrained = self.task.adapt_pretrained(self.pretrained)
    self.meta = {"model_config": self.cfg.to_dict(), "task": self.task.name, "model_task": self.task.model_task,
                 "num_labels": self.task.num_labels,
                 "label_names": list(self.task.label_names) if self.task.label_names else None,
                 "param_shapes": param_shapes(abs_params)}

  def _load_init_from(self):
    """``self.pretrained`` and ``self.cfg`` from ``config.init_from`` (with the config's runtime fields and
    layout), refusing command-line model fields the checkpoint fixes to other values."""
    c = self.c
    runtime = {k: v for k, v in set_fields(c.model).items() if k in RUNTIME_FIELDS}
    try:
      runtime.update(self._introduced(runtime))
      self.pretrained, report = from_pretrained(
          c.init_from, layout=c.model.layout or None, task=self.task.model_task, num_labels=self.task.head_labels,
          rngs=nnx.Rngs(params=c.seed, dropout=c.seed + 1), return_report=True, **runtime)
    except LayoutError as e:
      raise ConfigError(f"config.model.layout: {e}".replace("\n", " ")) from None
    if report is not None:
      log.info("init_from %s -> layout %s, task %s:\n  %s", c.init_from,
               self.pretrained.config.layout, self.task.model_task, report.summary().replace("\n", "\n  "))
    self.cfg = self.pretrained.config
    self._refuse_dropped_overrides()
    if c.mode == "train" and c.task != "heal" and not c.search.enabled and c.optim.lr >= 5e-4:
      log.warning("config.optim.lr=%g is a from-scratch learning rate; fine-tuning a pretrained checkpoint usually "
                  "takes 2e-5 to 5e-5 (configs/finetune.py uses 3e-5)", c.optim.lr)

  def _max_length(self) -> int:
    """``data.max_length``, or the model's positions when it is longer (``data.on_too_long``: refused or
    truncated)."""
    c = self.c
    limit = self.cfg.max_position_embeddings - self.cfg.position_offset
    if c.data.max_length <= limit:
      return c.data.max_length
    msg = (f"config.data.max_length={c.data.max_length} is longer than the model's {limit} positions "
           f"(max_position_embeddings={self.cfg.max_position_embeddings})")
    if c.data.on_too_long == "error":
      raise ConfigError(msg + "; lower data.max_length or set data.on_too_long='truncate'")
    log.warning("%s; sequences are truncated to %d tokens", msg, limit)
    return limit

  def _refuse_dropped_overrides(self):
    """With ``init_from`` the checkpoint fixes every model field but the runtime ones, ``layout`` (a re-arrangement)
    and ``quantization`` (int8 at eval): one given on the command line with another value would be dropped."""
    c, loaded = self.c, self.pretrained.config
    for key in sorted(self.given):
      section, _, name = key.partition(".")
      if section != "model" or name in RUNTIME_FIELDS or name in ("layout", "quantization") or name not in c.model:
        continue
      want, have = c.model[name], getattr(loaded, name, None)
      if want is None or _plain(want) == _plain(have):
        continue
      raise ConfigError(f"--config.model.{name}={want!r} is not what config.init_from={c.init_from} has ({name}="
                        f"{have!r}) and the checkpoint fixes it: drop the override to fine-tune the checkpoint as "
                        f"it is (config.model.layout re-arranges its blocks; runtime fields such as dropout, dtype "
                        f"and attention_impl apply), or leave config.init_from empty to train that model from scratch")

  def _introduced(self, runtime: dict) -> dict:
    """The runtime values a token mixer's spec asks for when ``model.layout`` re-arranges ``init_from`` into blocks
    with a mixer the checkpoint has none of (:attr:`jaxformers.mixers.MixerSpec.introduced`), for those the config
    leaves unset. Fourier mixing asks for ``fourier_norm='ortho'``: an unnormalised DFT of a BERT's hidden states is
    about sqrt(length x width) times larger than what the reused layers were trained on; "ortho" keeps their scale."""
    c = self.c
    if not c.model.layout:
      return {}
    target = {BLOCKS.get(b).mixer for b in parse_layout(c.model.layout, BLOCKS.names())} - {None}
    wanted = [m for m in sorted(target) if MIXERS.get(m).introduced]
    if not wanted:
      return {}
    try:
      source = {BLOCKS.get(b).mixer for b in saved_layout(c.init_from)}
    except Exception:   # unreadable metadata: from_pretrained reports it
      return {}
    out = {}
    for m in wanted:
      if m in source:
        continue
      for k, v in MIXERS.get(m).introduced.items():
        if k not in runtime and k not in out:
          out[k] = v
          log.info("model.%s=%r: init_from %s has no %r token mixer and layout %s adds it (set config.model.%s "
                   "to choose another)", k, v, c.init_from, m, c.model.layout, k)
    return out

  def _check_packing(self):
    """Packing needs every block's token mixer to handle packed rows (its spec's ``packing``)."""
    self.max_segments = min(self.c.data.pack_max_segments, self.max_length)
    if not self.c.data.packing:
      return
    for b in self.cfg.blocks:
      mixer = BLOCKS.get(b).mixer
      why = MIXERS.get(mixer).packing_refusal(self.cfg) if mixer else None
      if why:
        raise ConfigError(f"config.data.packing=True with a layout that has {b} blocks: {why}. Set "
                          f"config.data.packing=False to train it on padded batches")

  def packing(self, data: tokenize.Tokenized, batch_size: int, train: bool) -> batching.Packing | None:
    """Packed-batch shape for ``data``, or None without ``data.packing``: rows per batch is data.pack_rows (train),
    else as many rows as ``batch_size`` examples of the data's mean length fill, rounded up to a whole number
    of rows per device (and per micro-batch when training)."""
    if not self.c.data.packing:
      return None
    n_dev = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    unit = n_dev * (self.c.optim.accum_steps if train else 1)
    rows = self.c.data.pack_rows if train else 0
    if rows:
      if rows % unit:
        raise ConfigError(f"config.data.pack_rows={rows} must be divisible by {unit} (optim.accum_steps="
                          f"{self.c.optim.accum_steps} micro-batches x {n_dev} devices of the batch axes)")
    else:
      rows = math.ceil(batch_size * float(data.lengths.mean()) / self.max_length)
      rows = max(unit, -(-rows // unit) * unit)
    return batching.Packing(rows=rows, max_segments=self.max_segments)

  def init_params(self):
    """Parameters and dropout state created straight into their shardings (or loaded with from_pretrained)."""
    if self.pretrained is not None:
      _, p, r = nnx.split(self.pretrained, self.param_filter, ...)
      return jax.device_put(p, self.param_sh), jax.device_put(r, self.rest_sh)
    def create():
      _, p, r = nnx.split(self._make(), self.param_filter, ...)
      return p, r
    return jax.jit(create, out_shardings=(self.param_sh, self.rest_sh))()

  # --- data ----------------------------------------------------------------------------------------------------
  def mlm_opts(self):
    return self.task.mlm_options(self.tok, self.special)

  def tokenized(self, split: str) -> tokenize.Tokenized:
    ex = self.task.examples(split)
    n = self.c.data.max_train_examples
    if split == "train" and n > 0 and len(ex) > n:
      ex = ex.subset(np.sort(np.random.default_rng(0).permutation(len(ex))[:n]))   # a fixed random subset
    return tokenize.encode(self.tok, ex, self.max_length, self.c.data.on_too_long)

  def input_shardings(self):
    return jax.tree.map(lambda x: x.sharding, self.inputs)

  def batch_shardings(self):
    """The shardings of an eval batch's arrays."""
    return sharding.batch_shardings(self.mesh, packed=bool(self.c.data.packing), per_token=self.task.per_token)

  # --- steps -------------------------------------------------------------------------------------------------------
  def eval_step(self):
    if not hasattr(self, "_eval_step"):
      self._eval_step = jax.jit(sharding.traced_in(self.mesh, steps.make_eval_step(self.gd_eval, self.task,
                                                                                   self.max_segments)),
                                in_shardings=(self.param_sh, self.rest_sh, self.batch_shardings(),
                                              self.input_shardings()),
                                out_shardings=sharding.replicated(self.mesh))
    return self._eval_step

  def predict_split(self, params, rest, data: tokenize.Tokenized):
    """The task's eval outputs (logits) of every example in data order (None for per-token tasks), and the
    summed loss, weight and correct predictions."""
    step = self.eval_step()
    out, totals = None, np.zeros(3)
    packing = self.packing(data, self.c.data.eval_batch_size, train=False)
    for rows, batch in batching.eval_batches(data, self.c.data.eval_batch_size, self.max_length,
                                             self.special["pad"], self.mlm_opts(), seed=self.c.seed,
                                             packing=packing):
      logits, s, w, cr = step(params, rest, sharding.shard_batch(batch, self.mesh), self.inputs)
      totals += np.asarray([s, w, cr], np.float64)
      if logits is not None:
        logits = np.asarray(logits)
        if packing is not None:            # [rows, max_segments, labels] by slot -> by example
          valid = rows >= 0
          rows, logits = rows[valid], logits[valid]
        else:
          logits = logits[:len(rows)]
        if out is None:
          out = np.zeros((len(data),) + logits.shape[1:], np.float32)
        out[rows] = logits
    return out, totals

  def evaluate(self, params, rest, eval_sets: dict) -> dict:
    results = {}
    for name, data in eval_sets.items():
      outputs, sums = self.predict_split(params, rest, data)
      results.update({f"{name}/{k}": float(v) for k, v in self.task.eval_metrics(data, outputs, sums).items()})
    return results

  def padding_report(self, name: str, data: tokenize.Tokenized, batches: batching.TrainBatches | None = None) -> dict:
    """Share of padding in ``data``'s batches on the padded path (length buckets) and packed; logged."""
    if batches is not None:   # training: the first epoch's batches, both ways
      c = self.c

      def other(packing):
        return batching.TrainBatches(data, c.data.batch_size, c.seed, self.max_length, self.special["pad"],
                                     packing=packing)
      if batches.packing is not None:
        packed, padded = batches, other(None)
      else:
        padded, packed = batches, other(self.packing_for_report(data, c.data.batch_size))
      out = {"padded": padded.padding_fraction(), "packed": packed.padding_fraction(),
             "rows_per_batch": packed.packing.rows}
    else:
      b = self.c.data.eval_batch_size
      packing = self.packing(data, b, train=False) or self.packing_for_report(data, b)
      out = {"padded": batching.eval_padding_fraction(data, b, self.max_length),
             "packed": batching.eval_padding_fraction(data, b, self.max_length, packing),
             "rows_per_batch": packing.rows}
    out["removed"] = out["padded"] - out["packed"]
    out["packing"] = bool(self.c.data.packing)
    log.info("%s: padding %.1f%% padded (length buckets) -> %.1f%% packed (%d rows of %d a batch, <= %d examples a "
             "row)%s", name, 100 * out["padded"], 100 * out["packed"], out["rows_per_batch"], self.max_length,
             self.max_segments, "" if self.c.data.packing else "; set data.packing=True to use it")
    return out

  def packing_for_report(self, data: tokenize.Tokenized, batch_size: int) -> batching.Packing:
    rows = max(1, math.ceil(batch_size * float(data.lengths.mean()) / self.max_length))
    return batching.Packing(rows=rows, max_segments=self.max_segments)

  def best_metric(self) -> tuple[str, str]:
    t, mode = self.c.train.best_metric, self.c.train.best_mode
    if not t:
      t, default = self.task.best_metric()
    else:
      default = "min" if t.endswith(("loss", "perplexity", "mse")) else "max"
    return t, mode or default


def _plain(v):
  return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def _abstract_with(sh_tree, abs_tree):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_tree, sh_tree)


def train(r: Run) -> dict:
  """Train the run from its latest checkpoint (or from the start) to ``train.num_steps`` (or ``train.stop_after``),
  evaluating and saving on the way; its summary, also written to DIR/summary.json."""
  c = r.c
  train_data, eval_sets, batches, padding = _training_data(r)
  total = _run_length(c, batches.batches_per_epoch)
  tx, lr_fn = r.task.optimizer(c, total)
  abs_state = {"params": r.abs_params, "opt_state": jax.eval_shape(tx.init, r.abs_params), "rngs": r.abs_rest,
               "step": jax.ShapeDtypeStruct((), jnp.int32)}
  state_sh = sharding.state_shardings(abs_state, r.param_sh, r.mesh)
  best_name, best_mode = r.best_metric()
  ckpts = ckpt_lib.Checkpoints(r.workdir, keep=c.train.keep, best_metric=best_name, best_mode=best_mode,
                               async_save=c.train.async_checkpoint)
  meta = dict(r.meta, config=json.loads(c.to_json()))
  stop_at = min(total, c.train.stop_after) if c.train.stop_after > 0 else total
  restored = ckpts.restore_latest(_abstract_with(state_sh, abs_state), meta)
  r.save_tokenizer()
  if restored is None:
    state, start = _initial_state(r, tx, state_sh), 0
  else:
    state, saved, start = restored
    try:
      batches.restore(saved["data_state"])
    except ValueError as e:
      raise ConfigError(str(e)) from None
    if start >= stop_at and (r.workdir / "summary.json").is_file():
      ckpts.close()
      return dict(json.loads((r.workdir / "summary.json").read_text()), already_done=True)
    log.info("resumed from %s at step %d", ckpts.dir, start)
  train_step = _compile_train_step(r, tx, lr_fn, state_sh)
  writer = metrics_lib.Writer(r.workdir, enabled=jax.process_index() == 0)
  progress = _Progress(r, ckpts, writer, batches, start=start, total=total, stop_at=stop_at)
  t0 = time.time()
  state, step, eval_results = _train_steps(r, state, train_step, batches, eval_sets, ckpts, meta, progress,
                                           start=start, total=total, stop_at=stop_at)
  wall = time.time() - t0
  summary = {"mode": "train", "steps": step, "total_steps": total, "steps_this_run": step - start,
             "finished": step >= total, "eval": eval_results,
             "examples_per_s": progress.totals["examples"] / wall if wall else 0.0,
             "tokens_per_s": progress.totals["tokens"] / wall if wall else 0.0,
             "num_params": r.num_params, "wall_time_s": wall, "devices": jax.device_count(),
             "mesh": dict(r.mesh.shape), "train_examples": len(train_data),
             "eval_examples": {k: len(v) for k, v in eval_sets.items()}, "best_metric": best_name,
             "padding": padding}
  summary.update(r.task.finish(r.context, state, summary))
  _write_summary(r.workdir, summary)
  return summary


def _training_data(r: Run) -> tuple:
  """``(training split, eval splits, training batches, padding report)``: the splits tokenized, the batches the
  task's (:meth:`jaxformers.train.tasks.Task.train_batches`), the report of every split's padding logged."""
  c = r.c
  train_data = r.tokenized("train")
  eval_sets = {s: r.tokenized(s) for s in r.task.eval_splits}
  packing = r.packing(train_data, c.data.batch_size, train=True)
  try:
    batches = batching.TrainBatches(train_data, c.data.batch_size, c.seed, r.max_length, r.special["pad"],
                                    mlm=r.mlm_opts(), packing=packing)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  padding = {"train": r.padding_report("train", train_data, batches)}
  batches = r.task.train_batches(r.context, batches)
  padding.update({s: r.padding_report(s, d) for s, d in eval_sets.items()})
  return train_data, eval_sets, batches, padding


def _run_length(c, steps_per_epoch: int) -> int:
  """The run's steps: ``train.num_epochs`` epochs of ``steps_per_epoch``, else ``train.num_steps`` (logged)."""
  total = int(math.ceil(c.train.num_epochs * steps_per_epoch)) if c.train.num_epochs > 0 else c.train.num_steps
  if total < 1:
    raise ConfigError("the run has no steps: raise train.num_steps or train.num_epochs")
  if c.train.num_epochs > 0:
    log.info("run length: %d steps from train.num_epochs=%g (%d steps an epoch; train.num_steps is not used)", total,
             c.train.num_epochs, steps_per_epoch)
  else:
    log.info("run length: %d steps from train.num_steps (about %.2g epochs of %d steps; train.num_epochs is not "
             "used)", total, total / max(steps_per_epoch, 1), steps_per_epoch)
  return total


def _initial_state(r: Run, tx, state_sh) -> dict:
  """The train state at step 0: the run's first parameters and the optimizer's state, in their shardings."""
  params, rest = r.init_params()
  init_opt = jax.jit(tx.init, in_shardings=(state_sh["params"],), out_shardings=state_sh["opt_state"])
  return {"params": params, "opt_state": init_opt(params), "rngs": rest,
          "step": jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(r.mesh))}


def _compile_train_step(r: Run, tx, lr_fn, state_sh):
  """The task's train step, jitted over the run's mesh; it donates the state it is given."""
  step = r.task.make_train_step(r.gd_train, tx, lr_fn, r.c.optim.accum_steps, r.max_segments)
  return jax.jit(sharding.traced_in(r.mesh, step),
                 in_shardings=(state_sh, r.task.batch_shardings(r.context), r.input_shardings()),
                 out_shardings=(state_sh, sharding.replicated(r.mesh)), donate_argnums=0)


@contextlib.contextmanager
def _stop_signals():
  """While inside: SIGTERM / SIGINT set ``stop["signum"]`` (the yielded dict) instead of stopping the process, so
  the loop saves a checkpoint first; the previous handlers are put back after."""
  stop = {"signum": None}
  previous = {}

  def on_signal(signum, frame):
    stop["signum"] = signum
  for s in (signal.SIGTERM, signal.SIGINT):
    try:
      previous[s] = signal.signal(s, on_signal)
    except ValueError:  # not the main thread
      pass
  try:
    yield stop
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def _train_steps(r: Run, state, train_step, batches, eval_sets: dict, ckpts, meta: dict, progress: _Progress, *,
                 start: int, total: int, stop_at: int) -> tuple:
  """Steps ``start + 1 .. stop_at``: evaluate every ``train.eval_every`` steps and at ``total``, save every
  ``train.checkpoint_every`` steps, at ``stop_at`` and on a stop signal (then raise :class:`Interrupted`).
  ``(state, last step, last eval results)``; the checkpoints and the writer are closed on the way out."""
  c = r.c
  step, eval_results = start, {}
  with _stop_signals() as stop:
    try:
      while step < stop_at:
        batch = next(batches)
        sharded = sharding.shard_batch(batch, r.mesh)
        progress.account()                          # the previous step, while this batch was prepared
        state, m = train_step(state, sharded, r.inputs)
        step += 1
        progress.add(step, m, batch)
        evaluate_now = (c.train.eval_every and step % c.train.eval_every == 0) or step == total
        save_now = step % c.train.checkpoint_every == 0 or step == stop_at or stop["signum"] is not None
        if evaluate_now or save_now:
          progress.account()
          saved_meta = dict(meta, data_state=batches.state())
        if evaluate_now:
          eval_results = r.evaluate(state["params"], state["rngs"], eval_sets)
          progress.writer.write(step, "eval", eval_results)
          log.info("step %d eval %s", step, _fmt(eval_results))
          progress.note(f"step {step}: " + _fmt(eval_results))
          ckpts.save_best(step, state, saved_meta, eval_results)
        if save_now:
          ckpts.save(step, state, saved_meta, force=True)
        if stop["signum"] is not None:
          ckpts.wait()
          raise Interrupted(stop["signum"], step)
      progress.account()
      if step == total and not eval_results:   # finished earlier, but killed before its summary was written
        eval_results = r.evaluate(state["params"], state["rngs"], eval_sets)
    finally:
      progress.close()
      ckpts.wait()
      ckpts.close()
      progress.writer.close()
  return state, step, eval_results


class _Progress:
  """The train steps' metrics, read back one step late, so the host prepares the next batch while the device runs
  this one: the NaN check, the progress bar, the train log lines and the run's token and example counts. Every
  eval or checkpoint save reads them all first (:meth:`account`), so a non-finite loss is caught before its state
  is saved."""

  def __init__(self, r: Run, ckpts, writer, batches, *, start: int, total: int, stop_at: int):
    self.task, self.ckpts, self.writer, self.batches = r.task, ckpts, writer, batches
    self.log_every, self.stop_at = r.c.train.log_every, stop_at
    self.bar = None
    if r.c.train.progress and jax.process_index() == 0:
      self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)
    self.totals = {"tokens": 0, "examples": 0}
    self.pending = []   # (step, metrics, tokens, examples) of steps dispatched but not yet read back
    self._new_window()

  def _new_window(self):
    self.window = {"loss": 0.0, "accuracy": 0.0, "n": 0, "tokens": 0, "t": time.time()}

  def add(self, step: int, metrics: dict, batch: dict) -> None:
    """A step dispatched: its (device) metrics and the host batch it ran on."""
    self.pending.append((step, metrics, batching.num_tokens(batch), batching.num_examples(batch)))

  def account(self) -> None:
    """Read back the pending steps' metrics; raise :class:`NonFiniteLoss` at the first NaN or Inf loss."""
    while self.pending:
      at, m, n_tok, n_ex = self.pending.pop(0)
      loss = float(m["loss"])
      if not math.isfinite(loss):
        self.ckpts.wait()
        last = self.ckpts.latest_step()
        raise NonFiniteLoss(f"training loss became {loss} at step {at}; stopped without saving that state. "
                            f"The last good checkpoint is "
                            + (f"step {last} in {self.ckpts.dir}" if last is not None else "none (no save yet)")
                            + "; lower optim.lr or raise optim.warmup_steps before resuming")
      self.totals["tokens"] += n_tok
      self.totals["examples"] += n_ex
      w = self.window
      w["loss"] += loss
      w["accuracy"] += float(m["accuracy"])
      w["n"] += 1
      w["tokens"] += n_tok
      if self.bar is not None:
        dt = max(time.time() - w["t"], 1e-9)
        self.bar.set_postfix(loss=f"{w['loss'] / w['n']:.4f}", lr=f"{float(m['lr']):.2e}",
                             tok_s=f"{w['tokens'] / dt:.0f}", refresh=False)
        self.bar.update(1)
      if at % self.log_every == 0 or at == self.stop_at:
        self._log(at, m)

  def _log(self, at: int, m: dict) -> None:
    """One train log line: the window's mean loss and accuracy since the last one, the step's lr and norm."""
    w = self.window
    dt = max(time.time() - w["t"], 1e-9)
    self.writer.write(at, "train", {"loss": w["loss"] / w["n"], "accuracy": w["accuracy"] / w["n"],
                                    "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
                                    "tokens_per_s": w["tokens"] / dt, "epoch": self.batches.epoch,
                                    **self.task.log_metrics(m)})
    self._new_window()

  def note(self, text: str) -> None:
    """A line under the progress bar (none without one)."""
    if self.bar is not None:
      self.bar.write(text)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def _write_summary(workdir: Path, summary: dict) -> None:
  """DIR/summary.json (process 0), without the keys that only describe this call (``already_done``, ``updated``)."""
  if jax.process_index() == 0:
    saved = {k: v for k, v in summary.items() if k not in ("already_done", "updated")}
    (workdir / "summary.json").write_text(json.dumps(saved, indent=2) + "\n")


def _follow_up(r: Run, summary: dict) -> dict:
  """Start the run the task asks for once training has finished (:meth:`jaxformers.train.tasks.Task.follow_up`),
  if any; the summary with its result recorded (summary.json rewritten with it)."""
  follow = r.task.follow_up(r.context, summary)
  if follow is None:
    return summary
  summary = r.task.record_follow_up(r.context, summary, follow, run(follow.config, follow.workdir))
  _write_summary(r.workdir, summary)
  return summary


def _fmt(d: dict) -> str:
  return " ".join(f"{k}={v:.4f}" for k, v in d.items())


def _restore_for_inference(r: Run):
  """Only params and dropout state are needed: restore them from the saved train state."""
  target = {"params": _abstract_with(r.param_sh, r.abs_params), "rngs": _abstract_with(r.rest_sh, r.abs_rest)}
  state, _, step = ckpt_lib.restore_for_inference(r.workdir, target, r.meta)
  if r.quantize:
    return (*_quantized(r, state["params"], state["rngs"]), step)
  return state["params"], state["rngs"], step


def _quantized(r: Run, params, rest):
  """The restored model quantized to int8 (jaxformers.quant); the run's eval step then runs the int8 graph."""
  model = quantize(nnx.merge(r.gd_eval, params, rest))
  r.gd_eval, params, rest = nnx.split(model, nnx.Param, ...)
  r.param_sh = sharding.param_shardings(params, r.mesh, r.rules)
  r.rest_sh = jax.tree.map(lambda _: sharding.replicated(r.mesh), rest)
  r.__dict__.pop("_eval_step", None)
  r.context = dataclasses.replace(r.context, graphdef=r.gd_eval)
  log.info("evaluating the int8 model (config.model.quantization='int8')")
  return jax.device_put(params, r.param_sh), jax.device_put(rest, r.rest_sh)


def evaluate_checkpoint(r: Run) -> dict:
  params, rest, step = _restore_for_inference(r)
  eval_sets = {s: r.tokenized(s) for s in r.task.eval_splits}
  results = r.evaluate(params, rest, eval_sets)
  out = {"mode": "eval", "step": int(step), "eval": results,
         "padding": {s: r.padding_report(s, d) for s, d in eval_sets.items()}}
  (r.workdir / "eval.json").write_text(json.dumps(out, indent=2) + "\n")
  return out


def predict(r: Run) -> dict:
  """Submission-style ``index<TAB>prediction`` TSV files, one per test split (GLUE's file names for GLUE)."""
  if not r.task.can_predict:
    raise ConfigError(f"mode=predict needs a classification or regression task; this run is task={r.task.name}")
  splits = {split: r.tokenized(split) for split in r.task.source.test_splits(r.c.data)}
  params, rest, step = _restore_for_inference(r)
  out_dir = Path(r.c.predict.output_dir or r.workdir / "predictions")
  out_dir.mkdir(parents=True, exist_ok=True)
  written = {}
  for split, data in splits.items():
    outputs, _ = r.predict_split(params, rest, data)
    path = out_dir / r.task.source.prediction_file(r.c.data, split)
    r.task.write_predictions(outputs, path)
    written[split] = str(path)
  return {"mode": "predict", "step": int(step), "files": written}


def run(config, workdir: str | Path, given=()) -> dict:
  """Train (resuming from ``workdir`` when it holds checkpoints), evaluate, or predict, as ``config.mode`` says.
  ``given``: the config keys set on the command line (see :class:`Run`).
  Training holds ``workdir``'s lock (:class:`jaxformers.checkpoints.workdir.Lock`): a second process training there is refused.
  A run that fails leaves no workdir behind that it created and wrote nothing into."""
  workdir = Path(workdir)
  existed = workdir.exists()
  lock = None
  try:
    r = Run(config, workdir, given)     # checks the config and writes nothing
    if config.mode == "train" and jax.process_index() == 0:
      lock = Lock(workdir).acquire()
      if lock.stale:
        log.warning("%s: took over the lock of pid %s on host %s (since %s), which ended without releasing it",
                    workdir, lock.stale.get("pid"), lock.stale.get("host"), lock.stale.get("started"))
    if config.mode == "train":
      return _follow_up(r, train(r))
    if config.mode == "eval":
      return evaluate_checkpoint(r)
    return predict(r)
  except BaseException:
    if not existed and workdir.is_dir() and not any(p.is_file() for p in workdir.rglob("*")):
      shutil.rmtree(workdir, ignore_errors=True)
      if lock is not None:
        lock.path.unlink(missing_ok=True)     # no workdir, no lock beside it
    raise
  finally:
    if lock is not None:
      lock.release()
