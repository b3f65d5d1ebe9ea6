"""Knowledge-distillation losses and layer maps: a student learns to match a frozen teacher.

Every loss returns a *sum* over examples (or tokens) together with nothing else; the caller divides
by the number of examples or tokens, as the trainer does for its task losses. ``valid`` arrays mark
the tokens that exist (padding and unused packed positions are 0). Losses:

* :func:`soft_label_kl`: ``T^2 KL(softmax(t / T) || softmax(s / T))`` per example (Hinton et al.), on
  classification logits ``[..., labels]`` or masked-LM logits ``[..., length, vocab]``;
* :func:`hidden_mse`: mean squared error between hidden states, averaged over the hidden size;
* :func:`relation_kl`: MiniLM's self-attention relations: for relation heads ``R``, the rows of
  ``softmax(a b^T / sqrt(d_r))`` of teacher and student compared by KL, averaged over heads; with
  ``a, b = q, k`` the attention distributions, with ``a, b = v, v`` the value relation (MiniLM v1/v2).

A layer map pairs student depths with teacher depths (``hidden_states`` indices: 0 is the
embeddings' output, ``i`` the output of block ``i``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def soft_label_kl(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
  """``T^2 KL(p_t || p_s)`` over the last axis, per leading position (not summed)."""
  t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  return temperature ** 2 * jnp.sum(jnp.exp(t) * (t - s), axis=-1)


def hidden_mse(student_BLD: jax.Array, teacher_BLD: jax.Array, valid_BL: jax.Array) -> jax.Array:
  """Sum over valid tokens of the mean squared difference over the hidden size."""
  d = jnp.mean(jnp.square(student_BLD.astype(jnp.float32) - teacher_BLD.astype(jnp.float32)), axis=-1)
  return jnp.sum(d * valid_BL)


def _relation_logprobs(a_BLD: jax.Array, b_BLD: jax.Array, heads: int, same_BLL: jax.Array) -> jax.Array:
  """``log softmax(a_r b_r^T / sqrt(d_r))`` per relation head, keys outside a token's sequence masked: ``[B, R, L, L]``."""
  b, l, d = a_BLD.shape
  dr = d // heads
  a = a_BLD.astype(jnp.float32).reshape(b, l, heads, dr)
  c = b_BLD.astype(jnp.float32).reshape(b, l, heads, dr)
  scores = jnp.einsum("bqrd,bkrd->brqk", a, c) / jnp.sqrt(jnp.float32(dr))
  scores = jnp.where(same_BLL[:, None], scores, -1e30)
  return jax.nn.log_softmax(scores, axis=-1)


def relation_kl(student: tuple[jax.Array, jax.Array], teacher: tuple[jax.Array, jax.Array], heads: int,
                same_BLL: jax.Array, valid_BL: jax.Array) -> jax.Array:
  """Sum over valid query tokens of ``KL(teacher relation row || student relation row)``, averaged over the
  ``heads`` relation heads. ``student``/``teacher`` are ``(a, b)`` pairs ``[B, L, D]`` (their own widths,
  both divisible by ``heads``); ``same_BLL`` says which keys each query may relate to."""
  for name, (a, _) in (("student", student), ("teacher", teacher)):
    if a.shape[-1] % heads:
      raise ValueError(f"relation heads {heads} must divide the {name}'s width {a.shape[-1]}")
  t = _relation_logprobs(*teacher, heads, same_BLL)
  s = _relation_logprobs(*student, heads, same_BLL)
  kl = jnp.sum(jnp.where(same_BLL[:, None], jnp.exp(t) * (t - s), 0.0), axis=-1)   # [B, R, L]
  return jnp.sum(jnp.mean(kl, axis=1) * valid_BL)


def default_layer_map(student_layers: int, teacher_layers: int) -> tuple[tuple[int, int], ...]:
  """Student block ``i`` (1-based) <- teacher block ``round(i * T / S)``: evenly spaced, last to last."""
  return tuple((i, max(1, round(i * teacher_layers / student_layers))) for i in range(1, student_layers + 1))


def parse_layer_map(text: str, student_layers: int, teacher_layers: int) -> tuple[tuple[int, int], ...]:
  """``"1:2,2:4,3:6"`` (student:teacher, ``hidden_states`` indices; 0 = embeddings) or ``""`` (evenly spaced)."""
  if not text.strip():
    return default_layer_map(student_layers, teacher_layers)
  pairs = []
  for item in text.split(","):
    s, sep, t = item.partition(":")
    try:
      pair = (int(s), int(t))
    except ValueError:
      raise ValueError(f"distill.layer_map item {item.strip()!r}: expected student:teacher, e.g. '1:2,2:4'") from None
    if not sep or not 0 <= pair[0] <= student_layers or not 0 <= pair[1] <= teacher_layers:
      raise ValueError(f"distill.layer_map item {item.strip()!r}: the student has layers 0..{student_layers} and the "
                       f"teacher 0..{teacher_layers} (0 = the embeddings' output)")
    pairs.append(pair)
  return tuple(pairs)


def token_relations(segment_ids_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(same_BLL, valid_BL)``: which token pairs share a sequence, and which tokens exist, from segment ids
  (an attention mask is the segment ids of a padded batch)."""
  seg = segment_ids_BL.astype(jnp.int32)
  valid = seg != 0
  return (seg[:, :, None] == seg[:, None, :]) & valid[:, None, :] & valid[:, :, None], valid.astype(jnp.float32)
