"""AdamW with warmup and linear/cosine decay, gradient clipping and a weight-decay mask."""
from __future__ import annotations

import jax
import optax

from jaxformers.prune import masked_updates


def schedule(cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup to ``cfg.lr`` over ``warmup_steps`` (or ``warmup_ratio`` of the run), then decay."""
  warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else int(cfg.warmup_ratio * total_steps)
  warmup = max(0, min(warmup, total_steps))
  decay_steps = max(1, total_steps - warmup)
  if cfg.schedule == "linear":
    decay = optax.linear_schedule(cfg.lr, cfg.end_lr, decay_steps)
  elif cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.end_lr / cfg.lr if cfg.lr else 0.0)
  elif cfg.schedule == "constant":
    decay = optax.constant_schedule(cfg.lr)
  else:
    raise ValueError(f"optim.schedule={cfg.schedule!r}: expected linear, cosine or constant")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def decay_mask(params):
  """Decay matrices only: biases and LayerNorm scales/offsets (every 1-D parameter) are not decayed."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def adamw(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  lr = schedule(cfg, total_steps)
  parts = []
  if cfg.clip_norm and cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask))
  if cfg.get("sparsity", 0.0) > 0:
    parts.append(masked_updates(cfg.sparsity, cfg.get("sparsity_scope", "global")))
  return optax.chain(*parts), lr
