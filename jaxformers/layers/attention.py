"""Multi-head self-attention sublayer; the attention itself comes from :mod:`jaxformers.kernels.attention`."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformers.config import EncoderConfig
from jaxformers.kernels.attention import (attention, choose_impl, default_block_sizes, local_global_mask,
                                          sharded_attention)
from jaxformers.flops import attention_flops
from jaxformers.layers.common import Sequences, linear
from jaxformers.layers.sparse import sparse_attention_xla
from jaxformers.mixers import MixerSpec, register_mixer
from jaxformers.targets import current_target


class SelfAttention(nnx.Module):
  """Q, K, V projections, masked softmax attention, output projection (HF ``attention.self`` + ``attention.output.dense``)."""

  selects_queries = True   # can compute the outputs of some positions only (see Block)

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, num_heads: int | None = None):
    """``num_heads``: this sublayer's heads when pruned (each still ``cfg.head_dim`` wide); default ``cfg.num_heads``."""
    d = cfg.hidden_size
    self.num_heads, self.head_dim = num_heads or cfg.num_heads, cfg.head_dim
    inner = self.num_heads * self.head_dim
    self.query = linear(cfg, d, inner, ("embed", "heads"), rngs=rngs)
    self.key = linear(cfg, d, inner, ("embed", "heads"), rngs=rngs)
    self.value = linear(cfg, d, inner, ("embed", "heads"), rngs=rngs)
    self.out = linear(cfg, inner, d, ("heads", "embed"), rngs=rngs)
    self.impl = cfg.attention_impl
    self.dropout_rate = cfg.attention_dropout
    self.dropout_impl = cfg.dropout_impl
    self.deterministic = False
    self.rngs = rngs

  def __call__(self, x_BLD: jax.Array, seq: Sequences, qkv_BLD: tuple | None = None,
               select_BS: jax.Array | None = None) -> jax.Array:
    """``qkv_BLD`` lets a block that fused the input projections pass q, k, v in. With ``select_BS``
    ``[batch, S]`` only those positions query (every token is still a key and value): ``[batch, S, hidden]``."""
    if qkv_BLD is None:
      xq_BSD = x_BLD if select_BS is None else jnp.take_along_axis(x_BLD, select_BS[..., None], axis=1)
      qkv_BLD = (self.query(xq_BSD), self.key(x_BLD), self.value(x_BLD))
    b, l, _ = x_BLD.shape
    q_BSNH = qkv_BLD[0].reshape(b, -1, self.num_heads, self.head_dim)
    k_BLNH, v_BLNH = (t.reshape(b, l, self.num_heads, self.head_dim) for t in qkv_BLD[1:])
    out = self.attend(q_BSNH, k_BLNH, v_BLNH, seq, select_BS)
    return self.out(out.reshape(b, q_BSNH.shape[1], -1))

  def attend(self, q_BLNH, k_BLNH, v_BLNH, seq: Sequences, select_BS: jax.Array | None = None) -> jax.Array:
    train_dropout = self.dropout_rate > 0.0 and not self.deterministic
    q_seg = kv_seg = seq.segment_ids
    if select_BS is not None and kv_seg is not None:
      q_seg = jnp.take_along_axis(kv_seg, select_BS, axis=1)
    else:
      kv_seg = None
    dropout_rate = self.dropout_rate if train_dropout else 0.0
    kw = dict(segment_ids=q_seg, kv_segment_ids=kv_seg, impl=self.impl, dropout_rate=dropout_rate,
              dropout_rng=self.rngs.dropout() if train_dropout else None, dropout_impl=self.dropout_impl)
    mesh = kernel_mesh(q_BLNH, k_BLNH, v_BLNH, kw)
    if mesh is not None:   # a Pallas kernel cannot be partitioned by XLA: run it per shard of the batch
      axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
      return sharded_attention(q_BLNH, k_BLNH, v_BLNH, mesh=mesh, batch_axes=axes, **kw)
    return attention(q_BLNH, k_BLNH, v_BLNH, **kw)


BATCH_AXES = ("data", "fsdp")   # the mesh axes a batch is split over (jaxformers.train.sharding)


def kernel_mesh(q, k, v, kw):
  """The mesh set by ``jax.set_mesh`` when this call runs a Pallas kernel over a batch split across devices
  (XLA cannot partition a kernel), else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not any(mesh.shape.get(a, 1) > 1 for a in BATCH_AXES):
    return None
  impl = kw["impl"]
  if impl == "auto":
    impl = choose_impl(q, k, v, segment_ids=kw["segment_ids"], kv_segment_ids=kw["kv_segment_ids"],
                       dropout_rate=kw["dropout_rate"])
  return mesh if impl == "pallas" else None


class SparseSelfAttention(SelfAttention):
  """Sliding-window + global-token attention with the same parameters as :class:`SelfAttention`,
  so BERT/RoBERTa attention weights load into it unchanged. See :mod:`jaxformers.layers.sparse`.

  On GPU and TPU (or with Pallas interpret mode forced) rows that hold one sequence each and
  whose global tokens lead the row run the block-sparse Pallas kernel; everything else runs
  the banded XLA path. Attention dropout is not applied in this sublayer."""

  selects_queries = False

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs, num_heads: int | None = None):
    super().__init__(cfg, rngs=rngs, num_heads=num_heads)
    self.window, self.global_positions = cfg.sparse_window, cfg.sparse_global_tokens

  def uses_kernel(self, seq: Sequences) -> bool:
    """Whether the current target runs this call as the block-sparse kernel (see the class docstring)."""
    target = current_target()
    leading = self.global_positions == tuple(range(len(self.global_positions)))
    kernels = target.kernel_backend is not None and (target.platform != "cpu" or target.interpret)
    return kernels and leading and not seq.packed and self.impl in ("auto", "pallas")

  def attend(self, q_BLNH, k_BLNH, v_BLNH, seq: Sequences, select_BS=None) -> jax.Array:
    if self.uses_kernel(seq):
      length = q_BLNH.shape[1]
      bs = default_block_sizes(head_dim=self.head_dim, length=length)
      block_mask = local_global_mask(length, window=self.window // 2, num_global=len(self.global_positions),
                                     block_q=bs.block_q, block_k=bs.block_k)
      kw = dict(segment_ids=seq.segment_ids, block_mask=block_mask, impl="pallas")
      mesh = jax.sharding.get_abstract_mesh()
      axes = () if mesh.empty else tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
      if axes:
        return sharded_attention(q_BLNH, k_BLNH, v_BLNH, mesh=mesh, batch_axes=axes, **kw)
      return attention(q_BLNH, k_BLNH, v_BLNH, **kw)
    return sparse_attention_xla(
        q_BLNH, k_BLNH, v_BLNH, segment_ids=seq.segment_ids, positions=seq.positions, window=self.window,
        global_positions=self.global_positions, max_global=len(self.global_positions) * seq.max_segments)


def sparse_keys(cfg: EncoderConfig, length: int) -> int:
  """The keys one interior query of a sparse-attention layer sees: those within ``sparse_window // 2`` of it and
  the global tokens, at most ``length``."""
  return min(length, 2 * (cfg.sparse_window // 2) + 1 + len(cfg.sparse_global_tokens))


register_mixer(MixerSpec(
    "attention", SelfAttention, lambda cfg, length, heads: attention_flops(cfg, length, heads),
    has_heads=True, packing=True, fusable=True, search=True, prune="heads", hf_export=True,
    config_fields=("num_heads", "attention_impl", "attention_dropout", "dropout_impl"),
    doc="multi-head self-attention"))
register_mixer(MixerSpec(
    "sparse", SparseSelfAttention, lambda cfg, length, heads: attention_flops(cfg, sparse_keys(cfg, length), heads),
    has_heads=True, packing=True, fusable=True, search=True, prune="heads",
    config_fields=("num_heads", "attention_impl", "sparse_window", "sparse_global_tokens"),
    doc="sliding-window + global-token self-attention"))
