"""FNet's parameter-free token mixing: the real part of a 2-D DFT over (sequence, hidden).

Two padding modes:

* ``per_sequence`` (default): each sequence is transformed over its own true length
  ``n``, so a sentence's output never depends on how much padding its batch has, and
  packed rows (several sequences per row) mix each sequence on its own.
* ``fnet``: the official FNet behaviour, a DFT over the padded length with padding
  tokens mixed in; kept for fidelity to FNet checkpoints.

Two scalings, picked by ``fourier_norm``: ``none`` (FNet's unnormalised DFT) and ``ortho`` (the unitary
DFT, times ``1 / sqrt(n D)``). Unnormalised, the mixing output is about ``sqrt(n D)`` times larger than its input,
so in a post-LN block ``LN(x + mix)`` the residual ``x`` is lost; a pretrained model re-arranged into Fourier
blocks keeps its residual stream with ``ortho``.

Two implementations, picked by ``fourier_impl``:

* ``fft``: ``jnp.fft`` along the hidden axis, and along the sequence axis a chirp-z
  (Bluestein) transform, which computes a length-``n`` DFT for a different ``n`` in
  every row with fixed-size FFTs of length ``>= 2L - 1``; one sequence per row. A batch
  without padding takes the plain 2-D FFT instead (a runtime branch, about 5x cheaper).
* ``matmul``: DFT matrices applied as matmuls, ``Re(F_n X F_D) = C_n X C_D - S_n X S_D``,
  with block-diagonal per-sequence ``C_n, S_n`` built from segment ids; handles packed rows.

``auto`` uses ``matmul`` for packed rows and on TPU up to length 4096 (the MXU makes
the matmuls cheap there), ``fft`` otherwise.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformers.config import EncoderConfig
from jaxformers.layers.common import Sequences
from jaxformers.mixers import MixerSpec, register_mixer
from jaxformers.targets import current_target


@functools.lru_cache(maxsize=32)
def dft_matrices(n: int) -> tuple[np.ndarray, np.ndarray]:
  """``(cos, sin)`` of ``2 pi j k / n`` as float32 ``[n, n]``, exact phases via ``j k mod n``."""
  jk = np.outer(np.arange(n), np.arange(n)) % n
  theta = 2.0 * np.pi * jk / n
  return np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)


def _chirp(m: jax.Array, n: jax.Array) -> jax.Array:
  """``exp(i pi m^2 / n)`` with the phase reduced exactly in integers (``m^2 mod 2n``)."""
  n = jnp.maximum(n, 1)
  r = (m * m) % (2 * n)
  angle = jnp.pi * r.astype(jnp.float32) / n.astype(jnp.float32)
  return jax.lax.complex(jnp.cos(angle), jnp.sin(angle))


def _hidden_mix(x_BLD: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``X C_D`` and ``X S_D`` (the real and minus-imaginary parts of the hidden-axis DFT) as one matmul."""
  c, s = dft_matrices(x_BLD.shape[-1])
  cos_sin = jnp.asarray(np.concatenate([c, s], axis=1))   # [D, 2D]
  xcs = jnp.einsum("bld,de->ble", x_BLD, cos_sin)
  return jnp.split(xcs, 2, axis=-1)


def fourier_fnet_fft(x_BLD: jax.Array) -> jax.Array:
  return jnp.real(jnp.fft.fftn(x_BLD.astype(jnp.complex64), axes=(-2, -1))).astype(x_BLD.dtype)


def fourier_fnet_matmul(x_BLD: jax.Array) -> jax.Array:
  c_LL, s_LL = (jnp.asarray(m) for m in dft_matrices(x_BLD.shape[1]))
  xc, xs = _hidden_mix(x_BLD.astype(jnp.float32))
  out = jnp.einsum("jk,bkd->bjd", c_LL, xc) - jnp.einsum("jk,bkd->bjd", s_LL, xs)
  return out.astype(x_BLD.dtype)


def fourier_per_sequence_matmul(x_BLD: jax.Array, seq: Sequences) -> jax.Array:
  """Block-diagonal DFT per sequence (padding rows and columns are zero)."""
  seg_BL, pos_BL, n_BL = seq.segment_ids, seq.positions, seq.lengths()
  same_BLL = (seg_BL[:, :, None] == seg_BL[:, None, :]) & (seg_BL[:, :, None] != 0)
  jk = (pos_BL[:, :, None] * pos_BL[:, None, :]) % jnp.maximum(n_BL, 1)[:, :, None]
  theta = (2.0 * jnp.pi) * jk.astype(jnp.float32) / jnp.maximum(n_BL, 1)[:, :, None].astype(jnp.float32)
  c_BLL = jnp.where(same_BLL, jnp.cos(theta), 0.0)
  s_BLL = jnp.where(same_BLL, jnp.sin(theta), 0.0)
  xc, xs = _hidden_mix(x_BLD.astype(jnp.float32))
  out = jnp.einsum("bjk,bkd->bjd", c_BLL, xc) - jnp.einsum("bjk,bkd->bjd", s_BLL, xs)
  return out.astype(x_BLD.dtype)


def fourier_per_sequence_fft(x_BLD: jax.Array, seq: Sequences) -> jax.Array:
  """Bluestein DFT of each row over its own length; one contiguous sequence per row."""
  b, l, _ = x_BLD.shape
  valid_BL = seq.segment_ids != 0
  n_B = jnp.sum(valid_BL, axis=-1, dtype=jnp.int32)
  m = 1 << (2 * l - 2).bit_length()  # smallest power of two >= 2l - 1
  y_BLD = jnp.fft.fft(x_BLD.astype(jnp.complex64), axis=-1)
  w_BL = _chirp(seq.positions, n_B[:, None])
  a_BLD = jnp.where(valid_BL[..., None], y_BLD * jnp.conj(w_BL)[..., None], 0)
  shift_M = jnp.arange(m, dtype=jnp.int32)
  shift_M = jnp.abs(jnp.where(shift_M < l, shift_M, shift_M - m))
  kernel_BM = jnp.where(shift_M[None] < n_B[:, None], _chirp(shift_M[None], n_B[:, None]), 0)
  conv_BMD = jnp.fft.ifft(jnp.fft.fft(a_BLD, n=m, axis=1) * jnp.fft.fft(kernel_BM, axis=1)[..., None], axis=1)
  out = jnp.real(jnp.conj(w_BL)[..., None] * conv_BMD[:, :l])
  return jnp.where(valid_BL[..., None], out, 0).astype(x_BLD.dtype)


def choose_fourier_impl(impl: str, packed: bool, length: int, backend: str | None = None) -> str:
  if impl != "auto":
    return impl
  backend = backend or current_target().platform
  if packed or (backend == "tpu" and length <= 4096):
    return "matmul"
  return "fft"


class FourierMixing(nnx.Module):
  """The FNet mixing sublayer (no parameters)."""

  selects_queries = False

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs | None = None):
    del rngs
    self.impl, self.padding, self.norm = cfg.fourier_impl, cfg.fourier_padding, cfg.fourier_norm

  def __call__(self, x_BLD: jax.Array, seq: Sequences) -> jax.Array:
    out_BLD = self._mix(x_BLD, seq)
    if self.norm == "none":
      return out_BLD
    # "ortho": the unitary DFT's 1 / sqrt(n D), n the length each token's sequence is transformed over.
    if self.padding == "fnet" or seq.segment_ids is None:
      n_BL = jnp.full(x_BLD.shape[:2], x_BLD.shape[1], jnp.float32)
    else:
      n_BL = jnp.maximum(seq.lengths(), 1).astype(jnp.float32)
    return (out_BLD * jax.lax.rsqrt(n_BL * x_BLD.shape[-1])[..., None]).astype(x_BLD.dtype)

  def _mix(self, x_BLD: jax.Array, seq: Sequences) -> jax.Array:
    impl = choose_fourier_impl(self.impl, seq.packed, x_BLD.shape[1])
    if seq.packed and (impl == "fft" or self.padding == "fnet"):
      raise ValueError(
          f"Fourier mixing of packed rows needs fourier_impl='matmul' (or 'auto') and "
          f"fourier_padding='per_sequence'; got fourier_impl={self.impl!r}, fourier_padding={self.padding!r}")
    if self.padding == "fnet" or seq.segment_ids is None:
      return fourier_fnet_fft(x_BLD) if impl == "fft" else fourier_fnet_matmul(x_BLD)
    if impl == "fft":
      # Rows without padding need no per-length transform: take the plain 2-D FFT when all are full.
      full = jnp.all(seq.segment_ids != 0)
      return jax.lax.cond(full, fourier_fnet_fft, lambda x: fourier_per_sequence_fft(x, seq), x_BLD)
    return fourier_per_sequence_matmul(x_BLD, seq)


def fourier_flops(cfg: EncoderConfig, length: int, heads=None) -> float:
  """The DFT as matmuls: ``4 d^2`` over the hidden axis (real and imaginary parts), ``4 L d`` over the sequence."""
  d = cfg.hidden_size
  return 4.0 * d * d + 4.0 * length * d


def fourier_packing(cfg: EncoderConfig) -> str | None:
  if cfg.fourier_impl == "fft" or cfg.fourier_padding == "fnet":
    return (f"Fourier blocks need fourier_impl 'matmul' or 'auto' and fourier_padding 'per_sequence' on packed "
            f"rows; the model has fourier_impl={cfg.fourier_impl!r}, "
            f"fourier_padding={cfg.fourier_padding!r}")
  return None


register_mixer(MixerSpec(
    "fourier", FourierMixing, fourier_flops, packing=fourier_packing, search=True, prune="keep",
    config_fields=("fourier_impl", "fourier_padding", "fourier_norm"), introduced={"fourier_norm": "ortho"},
    doc="FNet: the real part of the 2-D DFT over sequence and hidden"))
