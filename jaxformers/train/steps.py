"""Training and evaluation steps: pure functions of (state, batch), jitted once per input shape.

The NNX model is split once, outside the loop, into a static ``graphdef`` and pytrees
(``params`` and ``rngs``: everything else, i.e. the dropout streams' keys and counters); each step merges them back,
runs, and returns the new pytrees. The train state is a plain dict
``{"params", "opt_state", "rngs", "step"}``; it is donated to the step.

Padded batches carry ``attention_mask``; packed ones carry ``segment_ids`` instead (the
batch's keys are its pytree structure, so which one is static), and ``max_segments``, the
most examples a packed row holds, is fixed when the step is made. Packed classification
logits are ``[rows, max_segments, labels]`` with per-slot labels and weights; the task's
losses (:meth:`jaxformers.train.tasks.Task.loss`) sum over whatever leading axes the weights have.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def make_grads(graphdef, task, accum_steps: int = 1, max_segments: int | None = None, param_filter=nnx.Param):
  """``grads(params, rngs, batch, inputs) -> (loss_sum, weight_sum, correct_sum, rngs, summed gradient)``;
  ``accum_steps`` micro-batches are summed, which gives exactly the gradient of the whole batch."""

  def micro(params, rngs, mb, inputs):
    def f(p):
      model = nnx.merge(graphdef, p, rngs, copy=True)
      s, w, c, _ = task.loss(model, mb, inputs, max_segments)
      return s, (w, c, nnx.split(model, param_filter, ...)[2])
    (s, (w, c, rngs)), g = jax.value_and_grad(f, has_aux=True)(params)
    return s, w, c, rngs, g

  def grads(params, rngs, batch, inputs):
    if accum_steps == 1:
      s, w, c, rngs, g = micro(params, rngs, batch, inputs)
    else:
      mbs = jax.tree.map(lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch)

      def body(carry, mb):
        s0, w0, c0, r0, g0 = carry
        s1, w1, c1, r1, g1 = micro(params, r0, mb, inputs)
        return (s0 + s1, w0 + w1, c0 + c1, r1, jax.tree.map(jnp.add, g0, g1)), None

      zero = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), rngs,
              jax.tree.map(jnp.zeros_like, params))
      (s, w, c, rngs, g), _ = jax.lax.scan(body, zero, mbs)
    return s, w, c, rngs, g

  return grads


def make_train_step(graphdef, tx: optax.GradientTransformation, lr_fn, task, accum_steps: int = 1,
                    max_segments: int | None = None):
  """``step(state, batch, inputs) -> (state, metrics)``; ``inputs`` are the task's fixed extra inputs (e.g. a
  teacher's parameters, see :meth:`jaxformers.train.tasks.Task.inputs`). ``accum_steps`` micro-batches are summed
  before one update, which gives exactly the gradient of the whole batch."""
  grads = make_grads(graphdef, task, accum_steps, max_segments)

  def step(state, batch, inputs):
    params = state["params"]
    s, w, c, rngs, g = grads(params, state["rngs"], batch, inputs)
    denom = jnp.maximum(w, 1.0)
    g = jax.tree.map(lambda x: x / denom, g)
    updates, opt_state = tx.update(g, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    new = {"params": params, "opt_state": opt_state, "rngs": rngs, "step": state["step"] + 1}
    metrics = {"loss": s / denom, "accuracy": c / denom, "grad_norm": optax.global_norm(g),
               "lr": lr_fn(state["step"]), "weight": w}
    return new, metrics

  return step


def make_eval_step(graphdef, task, max_segments: int | None = None):
  """``eval_step(params, rngs, batch, inputs) -> (task.eval_outputs(logits), loss_sum, weight_sum, correct_sum)``."""

  def step(params, rngs, batch, inputs):
    model = nnx.merge(graphdef, params, rngs, copy=True)
    s, w, c, logits = task.loss(model, batch, inputs, max_segments)
    return task.eval_outputs(logits), s, w, c

  return step
