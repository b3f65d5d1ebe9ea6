"""Structured pruning: remove attention heads and feed-forward neurons, giving a genuinely smaller model.

Importance (Michel et al., "Are Sixteen Heads Really Better than One?"): put a gate ``g_h`` on each head's output
(and ``g_j`` on each feed-forward neuron's activation) and take ``|dL/dg|`` at ``g = 1``, summed over batches of a
data sample. No gate has to be built: a head's output enters the output projection through its rows, so
``dL/dg_h = sum(W_out[rows of h] * dL/dW_out[rows of h])``, and likewise a neuron's with the row of the down
projection; one gradient of the loss w.r.t. the parameters gives every score. Head scores are normalised per
layer (L2), as Michel et al. do, before a global ranking.

The loss: a classifier's cross-entropy with the sample's labels (its own predictions when there are none, or
squared error for regression), a masked-LM model's log-likelihood of the input tokens, and for a bare encoder
half the mean squared final hidden state (how much of the output's energy runs through each head).

:func:`prune` cuts the chosen heads and neurons out of the projection matrices and writes the per-layer head
counts and widths into the config (``num_heads_per_layer``, ``intermediate_sizes``). A block that loses every head
becomes an ``ffn`` block and one that loses every neuron an ``attention`` block (a layout edit); a parallel block's
single LayerNorm becomes the remaining sublayer's (the same function as zeroing the sublayer), while a post-LN serial
block loses the removed sublayer's LayerNorm with it (a change beyond zeroing, which distillation heals). Nothing is
masked: the matrices are smaller.

:func:`magnitude_masks` / :func:`masked_updates` / :func:`sparsity_report`: unstructured magnitude pruning kept as
masks through fine-tuning (``optim.sparsity`` in the trainer). It makes no model smaller or faster on dense
hardware: the zeros are still multiplied.
"""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from jaxformers import flops as flops_model
from jaxformers import models
from jaxformers.data import tokenize
from jaxformers.errors import PruneError
from jaxformers.layout import BLOCKS, BlockSpec, format_layout
from jaxformers.mixers import MIXERS
from jaxformers.params import get_params, set_params

_BLOCK = re.compile(r"^(?P<pre>(?:encoder\.)?)blocks\.(?P<i>\d+)\.(?P<rest>.+)$")


def _without(name: str, part: str) -> str | None:
  """The registered block type ``name`` becomes when its ``part`` (``"mixer"`` or ``"mlp"``) is removed: the
  single-sublayer block of the remaining sublayer, post-LN (a parallel block's one LayerNorm becomes the remaining
  sublayer's); None when there is none (pre-LN blocks)."""
  spec = BLOCKS.get(name)
  want = BlockSpec(None, True) if part == "mixer" else BlockSpec(spec.mixer, False)
  if spec.pre_ln:
    return None
  for b in BLOCKS:
    s = BLOCKS.get(b)
    if (s.mixer, s.mlp, s.parallel, s.pre_ln) == (want.mixer, want.mlp, False, False):
      return b
  return None


def _head_units(block) -> int:
  """Prunable attention heads of a block: its mixer's heads when the mixer's spec says ``prune="heads"``."""
  spec = block.mixer_spec
  return block.mixer.num_heads if spec is not None and spec.prune == "heads" else 0


def check_prunable(model) -> None:
  """Raise :class:`PruneError` (one line) when a block's token mixer refuses pruning (its spec's
  ``prune="refuse"``), naming the block, the mixer and its reason."""
  for i, name in enumerate(model.config.blocks):
    mixer = BLOCKS.get(name).mixer
    spec = MIXERS.get(mixer) if mixer else None
    if spec is not None and spec.prune == "refuse":
      raise PruneError(f"block {i} ({name}): token mixer {mixer!r} cannot be pruned: {spec.prune_refusal}")


@dataclasses.dataclass
class Importance:
  """Scores per block index: ``heads[i]`` ``[num_heads_i]``, ``ffn[i]`` ``[width_i]`` (higher = more important)."""
  heads: dict[int, np.ndarray]
  ffn: dict[int, np.ndarray]
  examples: int = 0


# --- importance ---------------------------------------------------------------------------------------------------
def _loss(model, batch):
  task = models.task_of(model)
  kw = dict(attention_mask=batch["attention_mask"], token_type_ids=batch.get("token_type_ids"))
  if task == "classification":
    logits = model(batch["input_ids"], **kw).astype(jnp.float32)
    if model.num_labels == 1:
      target = batch.get("labels")
      return 0.5 * jnp.sum(jnp.square(logits[:, 0] - (0.0 if target is None else target)))
    labels = batch.get("labels")
    if labels is None:
      labels = jax.lax.stop_gradient(jnp.argmax(logits, -1))
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  if task in ("masked_lm", "pretraining"):
    logits = model(batch["input_ids"], **kw)
    logits = (logits[0] if isinstance(logits, tuple) else logits).astype(jnp.float32)
    per = optax.softmax_cross_entropy_with_integer_labels(logits, batch["input_ids"])
    return jnp.sum(per * batch["attention_mask"])
  enc = models.encoder_of(model)
  h = enc(batch["input_ids"], **kw).last_hidden_state.astype(jnp.float32)
  if task == "token_classification":
    h = model.head(enc(batch["input_ids"], **kw)).astype(jnp.float32)
  return 0.5 * jnp.sum(jnp.mean(jnp.square(h), -1) * batch["attention_mask"])


def importance(model, batches, progress: bool = False) -> Importance:
  """Head and neuron scores of ``model`` (float, eval mode) over ``batches``: dicts of ``input_ids``,
  ``attention_mask``, optional ``token_type_ids`` and ``labels`` (numpy or jax arrays)."""
  if model.config.quantization != "none":
    raise PruneError("prune the float model, then quantize: an int8 model has no gradients to score heads with")
  check_prunable(model)
  model.eval()
  graph, params, rest = nnx.split(model, nnx.Param, ...)
  blocks = models.encoder_of(model).blocks
  pre = "" if isinstance(model, models.Encoder) else "encoder."

  @jax.jit
  def grads(params, batch):
    return jax.grad(lambda p: _loss(nnx.merge(graph, p, rest), batch))(params)

  heads = {i: np.zeros(_head_units(b)) for i, b in enumerate(blocks) if _head_units(b)}
  ffn = {i: np.zeros(b.mlp.down.kernel.shape[0]) for i, b in enumerate(blocks) if b.mlp is not None}
  flat_w = {".".join(map(str, k)): v[...] for k, v in nnx.to_flat_state(params)}
  n = 0
  items = batches
  if progress:
    items = tqdm(batches, desc="scoring", unit="batch")
  for batch in items:
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    g = {".".join(map(str, k)): v[...] for k, v in nnx.to_flat_state(grads(params, batch))}
    n += int(batch["input_ids"].shape[0])
    for i in heads:
      key = f"{pre}blocks.{i}.mixer.out.kernel"
      wg = np.asarray(flat_w[key] * g[key], np.float64)            # [heads * head_dim, hidden]
      heads[i] += np.abs(wg.reshape(len(heads[i]), -1).sum(-1))
    for i in ffn:
      key = f"{pre}blocks.{i}.mlp.down.kernel"
      ffn[i] += np.abs(np.asarray(flat_w[key] * g[key], np.float64).sum(-1))
  if n == 0:
    raise PruneError("no data to score heads and neurons on: the sample is empty")
  return Importance(heads, ffn, n)


# --- targets ------------------------------------------------------------------------------------------------------
def parse_target(text, num_layers: int, what: str) -> float | dict[int, float]:
  """``0.5`` (a global fraction) or ``"0:0.5,3:0.25"`` (fractions per block) -> float or dict, checked."""
  def frac(v, where):
    try:
      f = float(v)
    except (TypeError, ValueError):
      raise PruneError(f"{what} {where}={v!r}: expected a fraction in [0, 1)") from None
    if not 0.0 <= f < 1.0:
      raise PruneError(f"{what} {where}={v!r}: the fraction to remove must be in [0, 1) (1 would remove everything)")
    return f
  if text is None:
    return 0.0
  if isinstance(text, dict) or (isinstance(text, str) and ":" in text):
    items = text.items() if isinstance(text, dict) else (p.split(":", 1) for p in text.split(","))
    out = {}
    for layer, v in items:
      try:
        i = int(layer)
      except ValueError:
        raise PruneError(f"{what} layer {layer!r}: expected an integer block index 0..{num_layers - 1}") from None
      if not 0 <= i < num_layers:
        raise PruneError(f"{what} layer {i}: unknown layer; the model has blocks 0..{num_layers - 1}")
      out[i] = frac(v, f"at layer {i}")
    return out
  return frac(text, "fraction")


def _select(scores: dict[int, np.ndarray], target, what: str, normalise: bool) -> dict[int, np.ndarray]:
  """Indices (sorted) each block keeps. A global fraction ranks all units together (after per-layer L2 normalisation
  when ``normalise``), per-layer fractions rank inside each block."""
  if isinstance(target, dict):
    unknown = sorted(set(target) - set(scores))
    if unknown:
      raise PruneError(f"{what} layer {unknown[0]}: that block has no {what.split()[0]} to prune; blocks with them: "
                       f"{sorted(scores)}")
    keep = {}
    for i, s in scores.items():
      drop = int(round(target.get(i, 0.0) * len(s)))
      keep[i] = np.sort(np.argsort(-s, kind="stable")[:len(s) - drop])
    return keep
  units = [(i, j, (s / (np.linalg.norm(s) or 1.0) if normalise else s)[j]) for i, s in scores.items()
           for j in range(len(s))]
  drop = int(round(target * len(units)))
  order = sorted(units, key=lambda u: (u[2], u[0], u[1]))[:drop]
  dropped = {(i, j) for i, j, _ in order}
  return {i: np.array([j for j in range(len(s)) if (i, j) not in dropped], np.int64) for i, s in scores.items()}


def plan(model, scores: Importance, heads=0.0, ffn=0.0) -> tuple[dict, dict]:
  """``(keep_heads, keep_ffn)``: for each block, the head / neuron indices that stay. ``heads`` is a global fraction
  (Michel et al.'s normalised global ranking) or ``{block: fraction}``; ``ffn`` a fraction of every block's
  neurons or ``{block: fraction}``."""
  n = model.config.num_layers
  heads, ffn = parse_target(heads, n, "heads"), parse_target(ffn, n, "ffn")
  keep_h = _select(scores.heads, heads, "heads (attention)", normalise=True)
  if not isinstance(ffn, dict):
    ffn = {i: ffn for i in scores.ffn}
  keep_f = _select(scores.ffn, ffn, "ffn (feed-forward)", normalise=False)
  for what, keep, t in (("heads", keep_h, heads), ("ffn", keep_f, ffn)):
    if keep and sum(len(k) for k in keep.values()) == 0:
      raise PruneError(f"{what}={t}: 0 {'heads' if what == 'heads' else 'neurons'} left in the whole model; lower "
                       f"the fraction")
  return keep_h, keep_f


# --- cutting ------------------------------------------------------------------------------------------------------
def _head_cols(idx: np.ndarray, head_dim: int) -> np.ndarray:
  return (idx[:, None] * head_dim + np.arange(head_dim)[None, :]).reshape(-1)


def prune(model, keep_heads: dict[int, np.ndarray] | None = None, keep_ffn: dict[int, np.ndarray] | None = None,
          rngs: nnx.Rngs | None = None):
  """A new, smaller model (eval mode) keeping, per block, the heads ``keep_heads[i]`` and the feed-forward neurons
  ``keep_ffn[i]`` (index arrays; blocks not named keep everything). Outputs equal ``model``'s with the removed heads'
  output-projection rows and the removed neurons' down-projection rows set to zero."""
  cfg = model.config
  if cfg.quantization != "none":
    raise PruneError("prune the float model, then quantize: this model is already int8")
  check_prunable(model)
  keep_heads, keep_ffn = dict(keep_heads or {}), dict(keep_ffn or {})
  new_cfg = _pruned_config(model, keep_heads, keep_ffn)
  new = models.build(models.task_of(model), new_cfg, num_labels=getattr(model, "num_labels", None),
                     head=model.classifier.style if hasattr(model, "classifier") else None, rngs=rngs)
  _copy_kept(model, new, keep_heads, keep_ffn)
  if getattr(model, "label_names", None):
    new.label_names = model.label_names
  new.eval()
  return new


def _pruned_config(model, keep_heads: dict, keep_ffn: dict):
  """The config of ``model`` pruned to ``keep_heads`` / ``keep_ffn`` (checked, and sorted in place): per-block heads
  and widths, and blocks left without heads or neurons changed to their form without that sublayer."""
  cfg = model.config
  names = list(cfg.blocks)
  heads, widths = [], []
  for i, (block, name) in enumerate(zip(models.encoder_of(model).blocks, cfg.blocks)):
    nh = _head_units(block)
    nf = block.mlp.down.kernel.shape[0] if block.mlp is not None else 0
    for what, d, full in (("heads", keep_heads, nh), ("ffn", keep_ffn, nf)):
      if i in d:
        d[i] = _checked_indices(d[i], what, i, name, full)
    kh = len(keep_heads.get(i, range(nh)))
    kf = len(keep_ffn.get(i, range(nf)))
    names[i] = name = _block_left(i, name, nh and kh == 0, nf and kf == 0)
    spec = BLOCKS.get(name)
    with_heads = bool(spec.mixer) and MIXERS.get(spec.mixer).has_heads
    heads.append((kh if nh else cfg.heads_at(i)) if with_heads else 0)
    widths.append(kf if spec.mlp else 0)
  has_att = [bool(BLOCKS.get(b).mixer) and MIXERS.get(BLOCKS.get(b).mixer).has_heads for b in names]
  has_mlp = [BLOCKS.get(b).mlp for b in names]
  uniform_h = all(h == cfg.num_heads for h, a in zip(heads, has_att) if a)
  uniform_f = all(f == cfg.intermediate_size for f, m in zip(widths, has_mlp) if m)
  return cfg.replace(layout=format_layout(names) if names != list(cfg.blocks) else cfg.layout,
                     num_heads_per_layer=None if uniform_h else tuple(heads),
                     intermediate_sizes=None if uniform_f else tuple(widths))


def _checked_indices(kept, what: str, i: int, name: str, full: int) -> np.ndarray:
  """``kept`` (the heads or neurons block ``i`` keeps) as sorted indices, checked against the ``full`` it has."""
  if full == 0:
    raise PruneError(f"{what} layer {i}: block {i} ({name}) has no {what} to prune")
  idx = np.asarray(kept, np.int64)
  if idx.ndim != 1 or len(np.unique(idx)) != len(idx) or (len(idx) and (idx.min() < 0 or idx.max() >= full)):
    raise PruneError(f"{what} layer {i}: kept indices must be distinct integers in 0..{full - 1}")
  return np.sort(idx)


def _block_left(i: int, name: str, no_heads: bool, no_neurons: bool) -> str:
  """The block type block ``i`` (a ``name`` block) becomes without its heads and / or feed-forward neurons."""
  if no_heads and no_neurons:
    raise PruneError(f"block {i} ({name}): removing every head and every feed-forward neuron leaves no sublayer; "
                     f"keep at least one head or neuron")
  if no_heads:
    if _without(name, "mixer") is None:
      raise PruneError(f"heads layer {i}: 0 heads left in a {name} block, which has no attention-free form; keep at "
                       f"least one head")
    name = _without(name, "mixer")
  if no_neurons:
    if _without(name, "mlp") is None:
      raise PruneError(f"ffn layer {i}: 0 neurons left in a {name} block, which has no form without a "
                       f"feed-forward sublayer; keep at least one neuron")
    name = _without(name, "mlp")
  return name


def _copy_kept(model, new, keep_heads: dict, keep_ffn: dict) -> None:
  """Set ``new``'s parameters to ``model``'s, cut to the kept heads' columns and the kept neurons."""
  old = get_params(model)
  hd = model.config.head_dim
  out = {}
  for path, shape in ((".".join(map(str, k)), v[...].shape) for k, v in nnx.to_flat_state(nnx.state(new, nnx.Param))):
    m = _BLOCK.match(path)
    if m is None:
      out[path] = old[path]
      continue
    pre, i, rest = m["pre"], int(m["i"]), m["rest"]
    src = path
    if rest.startswith(("mlp_norm.", "mixer_norm.")) and path not in old:   # a parallel block's single norm
      src = f"{pre}blocks.{i}.norm.{rest.split('.', 1)[1]}"
    a = old[src]
    if rest.startswith("mixer.") and i in keep_heads:
      cols = _head_cols(keep_heads[i], hd)
      if rest.startswith(("mixer.query.", "mixer.key.", "mixer.value.")):
        a = a[..., cols]
      elif rest == "mixer.out.kernel":
        a = a[cols]
    elif rest.startswith("mlp.") and i in keep_ffn:
      if rest.startswith("mlp.up."):
        a = a[..., keep_ffn[i]]
      elif rest == "mlp.down.kernel":
        a = a[keep_ffn[i]]
    if tuple(a.shape) != tuple(shape):
      raise AssertionError(f"{path}: cut to {a.shape}, the pruned model expects {shape}")
    out[path] = a
  set_params(new, out)


def check_targets(model, heads=0.0, ffn=0.0, flops=None) -> None:
  """Raise :class:`PruneError` for targets :func:`plan` would refuse, before any scoring: fractions outside [0, 1),
  unknown layers, a global fraction that leaves no head (neuron) at all, or one of a kind the model does not have
  (``heads`` on a model without attention). With ``flops`` (the budget ``heads`` and ``ffn`` were derived from,
  :func:`flops_fractions`) the messages name the budget, not fractions the user never gave."""
  check_prunable(model)
  n = model.config.num_layers
  blocks = models.encoder_of(model).blocks
  for what, t in (("heads", parse_target(heads, n, "heads")), ("ffn", parse_target(ffn, n, "ffn"))):
    units = [_head_units(b) if what == "heads" else
             (b.mlp.down.kernel.shape[0] if what == "ffn" and b.mlp is not None else 0) for b in blocks]
    kind = "attention heads" if what == "heads" else "feed-forward neurons"
    if isinstance(t, dict):
      bad = [i for i in t if units[i] == 0]
      if bad:
        raise PruneError(f"{what} layer {bad[0]}: block {bad[0]} ({model.config.blocks[bad[0]]}) has no "
                         f"{'attention heads' if what == 'heads' else 'feed-forward'} to prune")
      left = sum(u - int(round(t.get(i, 0.0) * u)) for i, u in enumerate(units))
    elif what == "heads":
      left = sum(units) - int(round(t * sum(units)))
    else:
      left = sum(u - int(round(t * u)) for u in units)
    if not sum(units) and t and flops is None:
      raise PruneError(f"{what}={t}: the model has no {kind} to remove (layout {model.config.layout}); leave "
                       f"{what} at 0")
    if sum(units) and left == 0:
      if flops is not None:
        raise PruneError(f"flops={flops}: keeping that fraction of the blocks' FLOPs removes {t:g} of the {kind}, "
                         f"which leaves 0 of them in the whole model; raise flops")
      raise PruneError(f"{what}={t}: 0 {'heads' if what == 'heads' else 'neurons'} left in the whole model; lower "
                       f"the fraction")


def flops_fractions(flops, model=None, length: int | None = None) -> tuple[float, float]:
  """``(heads, ffn)`` fractions that bring the blocks' forward FLOPs per token (:func:`jaxformers.flops.model_flops`
  at sequence length ``length``) to ``flops`` (in (0, 1]) of what they are. The same fraction ``f`` of all heads
  (global ranking) and of every block's neurons is removed; what pruning cannot remove (token mixers whose spec
  does not prune heads, e.g. Fourier mixing) stays, so ``f = (1 - flops) * total / prunable``. Every neuron of a
  block costs the same, and every head of one mixer; with heads of several kinds (attention and sparse attention)
  the result depends on which heads the ranking removes. Without ``model``: ``(1 - flops, 1 - flops)``. Given
  ``model``, a kind it does not have (heads of an attention-free model) gets 0."""
  try:
    r = float(flops)
  except (TypeError, ValueError):
    raise PruneError(f"flops={flops!r}: expected the fraction of the blocks' FLOPs per token to keep, in (0, 1]") from None
  if not 0.0 < r <= 1.0:
    raise PruneError(f"flops={flops!r}: the fraction of the blocks' FLOPs per token to keep must be in (0, 1]")
  if model is None:
    return 1.0 - r, 1.0 - r
  check_prunable(model)
  cfg = model.config
  blocks = models.encoder_of(model).blocks
  has_heads = any(_head_units(b) for b in blocks)
  has_ffn = any(b.mlp is not None for b in blocks)
  total = flops_model.model_flops(cfg, length or cfg.max_position_embeddings)
  if not has_heads and not has_ffn:
    raise PruneError(f"flops={flops!r}: the model has no attention heads or feed-forward neurons to remove (layout "
                     f"{cfg.layout})")
  fixed = total - _prunable_flops(model, length or cfg.max_position_embeddings)
  if fixed == 0.0:
    f = 1.0 - r
  else:
    if length is None:
      raise PruneError(f"flops={flops!r}: the model's {cfg.layout} has FLOPs pruning cannot remove, so the fraction "
                       f"depends on the sequence length; give length")
    f = (1.0 - r) * total / (total - fixed)
    if f >= 1.0:
      raise PruneError(f"flops={flops!r}: at length {length}, {fixed / total:.3f} of the blocks' FLOPs per token are "
                       f"in sublayers pruning keeps whole; keep more than that (raise flops)")
  return (f if has_heads else 0.0), (f if has_ffn else 0.0)


def _prunable_flops(model, length: int) -> float:
  """Forward FLOPs per token of the prunable sublayers: mixers whose spec prunes heads, and feed-forwards."""
  cfg = model.config
  total = 0.0
  for i, b in enumerate(models.encoder_of(model).blocks):
    if _head_units(b):
      total += flops_model.mixer_flops(cfg, b.spec.mixer, length, cfg.heads_at(i))
    if b.mlp is not None:
      total += flops_model.ffn_flops(cfg, cfg.ffn_width_at(i))
  return total


def prune_to(model, batches, heads=0.0, ffn=0.0, flops=None, progress: bool = False):
  """Score ``model`` on ``batches`` and prune it to the targets (see :func:`plan`); returns ``(model, importance)``.
  ``flops`` (instead of ``heads`` / ``ffn``): the fraction of the blocks' FLOPs per token to keep
  (:func:`flops_fractions`, at the length of the longest batch)."""
  if flops is not None:
    if heads or ffn:
      raise PruneError(f"flops={flops} sets the heads and ffn fractions itself; give either flops or heads / ffn")
    length = max((int(np.shape(b["input_ids"])[1]) for b in batches), default=None)
    heads, ffn = flops_fractions(flops, model, length)
  check_targets(model, heads, ffn, flops)   # bad targets fail before the scoring pass
  scores = importance(model, batches, progress=progress)
  keep_h, keep_f = plan(model, scores, heads, ffn)
  return prune(model, keep_h, keep_f), scores


def count_params(model) -> int:
  return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def describe(model) -> str:
  """One line per block: its type, heads and feed-forward width."""
  cfg = model.config
  lines = []
  for i, b in enumerate(models.encoder_of(model).blocks):
    parts = [cfg.blocks[i]]
    if _head_units(b):
      parts.append(f"{b.mixer.num_heads}/{cfg.num_heads} heads")
    if b.mlp is not None:
      parts.append(f"ffn {b.mlp.down.kernel.shape[0]}/{cfg.intermediate_size}")
    lines.append(f"  block {i}: " + ", ".join(parts))
  return "\n".join(lines)


# --- unstructured magnitude pruning -------------------------------------------------------------------------------
def _prunable(path: tuple, x) -> bool:
  """Dense kernels of the encoder blocks (embeddings, norms, biases and heads are left dense)."""
  keys = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
  if keys and keys[-1] == "value":    # a Variable's array inside a pytree path
    keys = keys[:-1]
  return "blocks" in keys and keys[-1] == "kernel" and getattr(x, "ndim", 0) == 2


def magnitude_masks(params, sparsity: float, scope: str = "global"):
  """A pytree like ``params`` of float masks (1 keep, 0 pruned) zeroing the ``sparsity`` fraction of smallest-magnitude
  weights of the blocks' dense kernels, over all of them (``global``) or in each kernel (``layer``); other
  leaves get all-ones masks. Works inside jit."""
  if not 0.0 <= sparsity < 1.0:
    raise PruneError(f"sparsity={sparsity!r}: expected a fraction in [0, 1)")
  if scope not in ("global", "layer"):
    raise PruneError(f"sparsity scope {scope!r}: expected 'global' or 'layer'")
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  chosen = [i for i, (p, x) in enumerate(flat) if _prunable(p, x)]

  def threshold(values):
    k = int(np.floor(sparsity * values.size))
    if k == 0:
      return jnp.asarray(-1.0, jnp.float32)
    return jnp.sort(values.reshape(-1))[k - 1]
  masks = [jnp.ones_like(x, jnp.float32) for _, x in flat]
  if chosen and sparsity > 0:
    if scope == "global":
      t = threshold(jnp.concatenate([jnp.abs(flat[i][1].astype(jnp.float32)).reshape(-1) for i in chosen]))
      for i in chosen:
        masks[i] = (jnp.abs(flat[i][1].astype(jnp.float32)) > t).astype(jnp.float32)
    else:
      for i in chosen:
        a = jnp.abs(flat[i][1].astype(jnp.float32))
        masks[i] = (a > threshold(a)).astype(jnp.float32)
  return jax.tree_util.tree_unflatten(treedef, masks)


def masked_updates(sparsity: float, scope: str = "global") -> optax.GradientTransformation:
  """An optax transformation (chain it after the optimiser) that prunes by magnitude at ``init`` (masks computed
  from the initial parameters, kept in the optimiser state, so checkpoints resume them) and keeps the pruned weights
  exactly zero: their update is ``-param`` (zeroing them on the first step), every other update passes unchanged."""
  def init(params):
    return {"masks": magnitude_masks(params, sparsity, scope)}

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("masked_updates needs the parameters (optax.apply_updates with params)")
    new = jax.tree.map(lambda u, m, p: jnp.where(m > 0, u, -p).astype(u.dtype), updates, state["masks"], params)
    return new, state
  return optax.GradientTransformation(init, update)


def sparsity_report(model) -> dict[str, float]:
  """Fraction of exact zeros in each block dense kernel (``path -> fraction``), plus ``"total"`` over them all."""
  out, zeros, total = {}, 0, 0
  for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    a = np.asarray(v[...])
    if _prunable(path, a):
      z = int(np.sum(a == 0))
      out[".".join(map(str, path))] = z / a.size
      zeros, total = zeros + z, total + a.size
  out["total"] = zeros / max(total, 1)
  return out


def pad_to_full(model, rngs: nnx.Rngs | None = None):
  """The same function as a pruned ``model`` with every block at ``num_heads`` heads and ``intermediate_size``
  neurons again: the removed heads and neurons come back as zero weights (zero queries, keys, values and
  output-projection rows; zero up- and down-projection weights), which contribute nothing. This is how a pruned
  model is written as an HF checkpoint (transformers 5 no longer prunes heads when it loads a model)."""
  cfg = model.config
  if cfg.num_heads_per_layer is None and cfg.intermediate_sizes is None:
    return model
  full = cfg.replace(num_heads_per_layer=None, intermediate_sizes=None)
  new = models.build(models.task_of(model), full, num_labels=getattr(model, "num_labels", None),
                     head=model.classifier.style if hasattr(model, "classifier") else None, rngs=rngs)
  old = get_params(model)
  out = {}
  for path, v in nnx.to_flat_state(nnx.state(new, nnx.Param)):
    path = ".".join(map(str, path))
    a, shape = old[path], v[...].shape
    if a.shape != shape:
      pad = np.zeros(shape, a.dtype)
      pad[tuple(slice(0, n) for n in a.shape)] = a   # kept heads / neurons first, zeros after
      a = pad
    out[path] = a
  set_params(new, out)
  if getattr(model, "label_names", None):
    new.label_names = model.label_names
  new.eval()
  return new


def sample_batches(tokenizer, examples, n: int = 256, max_length: int = 128, batch_size: int = 32,
                   pad_id: int = 0, seed: int = 0) -> list[dict]:
  """Padded batches of a fixed random sample of ``n`` :class:`jaxformers.data.sources.Examples` (with labels when
  they have them), for :func:`importance`."""
  keep = np.sort(np.random.default_rng(seed).permutation(len(examples))[:n])
  data = tokenize.encode(tokenizer, examples.subset(keep), max_length)
  out = []
  for s in range(0, len(data), batch_size):
    rows = range(s, min(s + batch_size, len(data)))
    length = max(len(data.ids[i]) for i in rows)
    ids = np.full((len(rows), length), pad_id, np.int32)
    types, mask = np.zeros_like(ids), np.zeros_like(ids)
    for r, i in enumerate(rows):
      k = len(data.ids[i])
      ids[r, :k], types[r, :k], mask[r, :k] = data.ids[i], data.type_ids[i], 1
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    if data.label is not None:
      batch["labels"] = np.asarray(data.label[s:s + len(rows)])
    out.append(batch)
  return out
