"""Choosing an attention implementation, and the cuDNN path.

``impl`` is one of:

* ``"xla"``: the plain-jnp reference (always available, supports everything incl. dropout).
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``; GPU only, float16 or
  bfloat16, head_dim a multiple of 8 up to 128, no dropout, no dense mask, no block mask, and
  segment ids only as padding (each row ``[s, ..., s, 0, ..., 0]``), turned into lengths.
* ``"pallas"``: the Pallas flash kernels (block-sparse when ``block_mask`` is given). On CPU an
  explicit ``impl="pallas"`` runs them with ``interpret=True``: slow, but exactly the kernel code,
  which is what tests and debugging want. ``force_interpret()`` / ``JAXFORMERS_PALLAS_INTERPRET=1``
  force interpret mode on any backend.
* ``"auto"``: dropout > 0 or a dense ``mask`` -> xla; CPU (interpret not forced) -> xla; a chip the
  kernels do not serve (no Pallas lowering for it, see :data:`jaxformers.targets.CHIPS`) -> xla;
  dtype / head_dim the kernels do not take -> xla; GPU -> cudnn when it applies, else pallas;
  TPU (or forced interpret) -> pallas. Each fallback logs its reason once per distinct reason.

Every rule reads the *target* (:func:`jaxformers.targets.current_target`, or ``target=``), never the host's
backend, so a step traced under ``use_target("v5e")`` on a CPU host holds the kernels a v5e runs.
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from jaxformers.kernels.attention import flash
from jaxformers.targets import Target, current_target

logger = logging.getLogger("jaxformers.kernels.attention")

IMPLS = ("auto", "xla", "cudnn", "pallas")
CUDNN_DTYPES = (jnp.float16, jnp.bfloat16)
_logged_reasons: set[str] = set()


def log_once(reason: str, level: int = logging.WARNING) -> None:
  """Logs ``reason`` on one line the first time it is seen in this process."""
  if reason not in _logged_reasons:
    _logged_reasons.add(reason)
    logger.log(level, reason)


def reset_logged_reasons() -> None:
  """Forgets which reasons were logged (for tests)."""
  _logged_reasons.clear()


def _is_concrete(x) -> bool:
  return x is not None and not isinstance(x, jax.core.Tracer)


def padding_lengths(segment_ids) -> np.ndarray | None:
  """Per-row lengths when concrete ``segment_ids`` are pure padding (``[s]*n + [0]*(L-n)``), else None."""
  seg = np.asarray(segment_ids)
  lengths = (seg != 0).sum(axis=1)
  for row, n in zip(seg, lengths):
    if np.any(row[n:] != 0) or (n and np.any(row[:n] != row[0])):
      return None
  return lengths.astype(np.int32)


def cudnn_unsupported_reason(q, k, v, *, segment_ids=None, kv_segment_ids=None, mask=None, block_mask=None,
                             dropout_rate=0.0, require_concrete_segments: bool = True,
                             target: Target | None = None) -> str | None:
  """Why cuDNN cannot run this call on ``target`` (default: the current one), or None when it can."""
  target = target or current_target()
  if target.platform != "gpu":
    return f"cudnn needs a GPU, the target is {target}"
  cc = target.spec.compute_capability if target.spec else None
  if cc is not None and cc < (8, 0):
    return f"cudnn flash attention needs compute capability 8.0 or later, {target.spec.label} has {cc[0]}.{cc[1]}"
  if dropout_rate > 0.0:
    return "cudnn path has no attention dropout"
  if mask is not None or block_mask is not None:
    return "cudnn path takes no dense mask or block_mask"
  if q.dtype not in CUDNN_DTYPES or not (q.dtype == k.dtype == v.dtype):
    return f"cudnn needs float16/bfloat16 q, k, v, got {q.dtype}"
  if q.shape[-1] % 8 or q.shape[-1] > 128:
    return f"cudnn needs head_dim a multiple of 8 up to 128, got {q.shape[-1]}"
  for name, seg in (("segment_ids", segment_ids), ("kv_segment_ids", kv_segment_ids)):
    if seg is None:
      continue
    if not _is_concrete(seg):
      if require_concrete_segments:
        return f"cudnn needs {name} known to be padding-only; traced {name} may pack sequences"
    elif padding_lengths(seg) is None:
      return f"cudnn cannot express packed {name} (only padding as lengths)"
  return None


def cudnn_attention(q, k, v, *, segment_ids=None, kv_segment_ids=None, scale=None) -> jax.Array:
  """cuDNN attention; segment ids are read as padding (lengths = number of non-zero ids per row).

  Query rows whose segment id is 0 and rows with no key are zeroed, matching the reference.
  """
  kv_seg = segment_ids if kv_segment_ids is None and segment_ids is not None and q.shape[1] == k.shape[1] \
      else kv_segment_ids
  q_len = None if segment_ids is None else jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32)
  kv_len = None if kv_seg is None else jnp.sum(kv_seg != 0, axis=1).astype(jnp.int32)
  out = jax.nn.dot_product_attention(q, k, v, scale=scale, query_seq_lengths=q_len, key_value_seq_lengths=kv_len,
                                     implementation="cudnn")
  keep = jnp.ones(q.shape[:2], bool)
  if segment_ids is not None:
    keep = keep & (segment_ids != 0)
  if kv_len is not None:
    keep = keep & (kv_len > 0)[:, None]
  return jnp.where(keep[:, :, None, None], out, jnp.zeros((), out.dtype))


def choose_impl(q, k, v, *, segment_ids=None, kv_segment_ids=None, mask=None, block_mask=None,
                dropout_rate: float = 0.0, target: Target | None = None) -> str:
  """The implementation ``impl="auto"`` runs for these arguments on ``target`` (default: the current target);
  logs a fallback reason once."""
  target = target or current_target()
  if dropout_rate > 0.0:
    log_once("attention: using the XLA reference: attention dropout_rate > 0 and the kernels have no dropout")
    return "xla"
  if mask is not None:
    log_once("attention: using the XLA reference: a dense boolean mask was given; the kernels take segment ids "
             "or a block_mask")
    return "xla"
  if target.platform == "cpu" and not target.interpret:
    log_once("attention: using the XLA reference on the cpu backend: Pallas kernels would only run in "
             "interpret mode (force_interpret() to use them)")
    return "xla"
  if target.kernel_backend is None:
    log_once(f"attention: using the XLA reference on {target.spec.label}: the Pallas kernels have no lowering for "
             f"this chip")
    return "xla"
  try:
    flash.check_inputs(q, k, v, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids)
  except ValueError as e:
    log_once(f"attention: using the XLA reference: {e}")
    return "xla"
  if target.platform == "gpu" and not target.interpret and block_mask is None:
    reason = cudnn_unsupported_reason(q, k, v, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                                      target=target)
    if reason is None:
      return "cudnn"
    log_once(f"attention: using Pallas rather than cuDNN: {reason}", logging.INFO)
  return "pallas"
