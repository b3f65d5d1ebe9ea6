"""Packed (padding-free) execution gives every example what it gets alone; sparse attention is exact and linear."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxformers
from jaxformers import EncoderConfig, models
from jaxformers.blocks import BLOCKS
from jaxformers.kernels.attention import attention_reference
from jaxformers.layers.common import Sequences
from jaxformers.layers.sparse import sparse_attention_xla, sparse_mask_dense
from jaxformers.packing import best_fit, encode_texts, first_fit, pack, padded_fraction

TOL = 1e-5


def tiny(layout, **kw):
  kw = {"sparse_window": 6, "max_position_embeddings": 64, **kw}
  return EncoderConfig(vocab_size=64, hidden_size=32, num_heads=4, intermediate_size=48, layout=layout,
                       hidden_dropout=0.0, attention_dropout=0.0, **kw)


def test_first_fit_packs_within_budget():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 40, 50)
  rows = first_fit(lengths, 64, max_segments=4)
  assert sorted(i for r in rows for i in r) == list(range(50))
  assert all(sum(lengths[i] for i in r) <= 64 and len(r) <= 4 for r in rows)
  # first-fit decreasing, replayed: examples are placed longest first (ties by index), each into the first row
  # that had room for it (tokens and slots) at that moment; a new row only when no open row had
  order = sorted(range(50), key=lambda i: (-lengths[i], i))
  row_of = {i: r for r, members in enumerate(rows) for i in members}
  placed = [[] for _ in rows]
  for i in order:
    fits = [r for r, members in enumerate(placed)
            if members and sum(lengths[j] for j in members) + lengths[i] <= 64 and len(members) < 4]
    expected = fits[0] if fits else next(r for r, members in enumerate(placed) if not members)
    assert row_of[i] == expected, (i, row_of[i], fits)
    placed[row_of[i]].append(i)
  assert [list(r) for r in placed] == [list(r) for r in rows]   # members in placement order


def test_best_fit_puts_each_example_in_the_fullest_row_that_holds_it():
  rng = np.random.default_rng(1)
  lengths = rng.integers(1, 40, 60)
  rows = best_fit(lengths, 64, max_segments=4)
  assert sorted(i for r in rows for i in r) == list(range(60))
  placed, row_of = [[] for _ in rows], {i: r for r, members in enumerate(rows) for i in members}
  for i in np.argsort(-lengths, kind="stable"):
    free = {r: 64 - sum(lengths[j] for j in m) for r, m in enumerate(placed) if m and len(m) < 4}
    fits = {r: f for r, f in free.items() if f >= lengths[i] and f > 0}
    if fits:
      assert free[row_of[i]] == min(fits.values()), (i, row_of[i], fits)
    else:
      assert not placed[row_of[i]], i
    placed[row_of[i]].append(int(i))


@pytest.mark.parametrize("where", ["pack", "batching"])
def test_segment_ids_number_each_example_from_one(where):
  """Each example's tokens carry its slot number + 1, contiguously; 0 only past the last example of a row."""
  from jaxformers.data import batching
  from jaxformers.data.tokenize import Tokenized
  examples = [list(range(10 + k, 10 + k + n)) for k, n in enumerate((5, 9, 3, 12, 7, 1))]
  if where == "pack":
    b = pack(examples, row_length=16, max_segments=3)
    ids, seg, slots = b.input_ids, b.segment_ids, b.slots
  else:
    data = Tokenized(ids=[np.asarray(e, np.int32) for e in examples],
                     type_ids=[np.zeros(len(e), np.int32) for e in examples], label=np.arange(6),
                     origin="test")
    plan = best_fit(data.lengths, 16, 3)
    batch, slots = batching.pack_rows(data, plan, 16, 0, batching.Packing(rows=len(plan), max_segments=3))
    ids, seg = batch["input_ids"], batch["segment_ids"]
    np.testing.assert_array_equal(batch["labels"][slots >= 0], slots[slots >= 0])
  for r in range(ids.shape[0]):
    col = 0
    for s in range(slots.shape[1]):
      i = slots[r, s]
      if i < 0:
        continue
      n = len(examples[i])
      assert seg[r, col:col + n].tolist() == [s + 1] * n
      assert ids[r, col:col + n].tolist() == examples[i]
      col += n
    assert not seg[r, col:].any()


def test_pack_round_trips_tokens_and_reports_padding():
  examples = [list(range(1, n + 1)) for n in (5, 9, 3, 12, 7)]
  batch = pack(examples, row_length=16, max_segments=3)
  for ex, back in zip(examples, batch.unpack_tokens(batch.input_ids)):
    assert list(back) == ex
  assert batch.padding_fraction == pytest.approx(1 - 36 / batch.input_ids.size)
  assert padded_fraction([5, 9, 3, 12, 7]) == pytest.approx(1 - 36 / 60)
  with pytest.raises(ValueError, match="example 0 has 20 tokens, more than row_length=16"):
    pack([[1] * 20], row_length=16)


@pytest.mark.parametrize("block", BLOCKS.names())
def test_packed_examples_match_running_alone(block):
  """Packed rows against one row per example (padding cannot change an example's output, see
  test_blocks) and against the first example run truly alone."""
  cfg = tiny(f"{block}*2")
  rng = np.random.default_rng(1)
  examples = [rng.integers(2, 64, n) for n in (9, 4, 13, 6, 2)]
  batch = pack(examples, row_length=24, max_segments=4)
  assert batch.input_ids.shape[0] < len(examples)
  width = max(len(e) for e in examples)
  ids = np.zeros((len(examples), width), np.int32)
  mask = np.zeros_like(ids)
  for i, e in enumerate(examples):
    ids[i, :len(e)], mask[i, :len(e)] = e, 1
  for task in ("classification", "masked_lm"):
    model = models.build(task, cfg, num_labels=3, rngs=nnx.Rngs(0))
    model.eval()
    packed = model.encoder(batch.input_ids, segment_ids=batch.segment_ids, max_segments=4)
    logits = model(batch.input_ids, segment_ids=batch.segment_ids, max_segments=4)
    single = model.encoder(ids, mask)
    single_logits = model(ids, mask)
    alone_logits = model(examples[0][None])
    hidden = batch.unpack_tokens(packed.last_hidden_state)
    first = batch.unpack_segments(packed.first_token_state)
    per_example = batch.unpack_segments(logits) if task == "classification" else batch.unpack_tokens(logits)
    for i, ex in enumerate(examples):
      n = len(ex)
      np.testing.assert_allclose(hidden[i], single.last_hidden_state[i, :n], atol=TOL, rtol=0)
      np.testing.assert_allclose(first[i], single.first_token_state[i], atol=TOL, rtol=0)
      ref = single_logits[i] if task == "classification" else single_logits[i, :n]
      np.testing.assert_allclose(per_example[i], ref, atol=TOL, rtol=0)
    if task == "classification":
      np.testing.assert_allclose(batch.unpack_segments(packed.pooler_output), single.pooler_output, atol=TOL, rtol=0)
      np.testing.assert_allclose(per_example[0], alone_logits[0], atol=TOL, rtol=0)
    else:
      np.testing.assert_allclose(per_example[0], alone_logits[0], atol=TOL, rtol=0)


def test_encode_texts_returns_outputs_in_input_order(minilm_dir):
  from tokenizers import Tokenizer
  tok = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
  model = jaxformers.from_pretrained(minilm_dir)
  texts = ["a short one", "padding should cost nothing at all when sequences are packed together",
           "jax", "three words here"]
  out = encode_texts(model, tok, texts, row_length=32, rows_per_call=2)
  model.train()  # encode_texts runs without dropout in either mode and leaves the model's mode alone
  again = encode_texts(model, tok, texts, row_length=32, rows_per_call=2)
  assert model.blocks[0].dropout.deterministic is False
  model.eval()
  for a, b in zip(out["last_hidden_state"], again["last_hidden_state"]):
    np.testing.assert_array_equal(a, b)
  assert out["padding_fraction"] < 0.5
  for text, hidden, pooled in zip(texts, out["last_hidden_state"], out["pooler_output"]):
    enc = tok.encode(text)
    ids = np.array(enc.ids)[np.array(enc.attention_mask, bool)][None]
    assert hidden.shape[0] == ids.shape[1]
    alone = model(ids, np.ones_like(ids))
    np.testing.assert_allclose(hidden, alone.last_hidden_state[0], atol=1e-4)
    np.testing.assert_allclose(pooled, alone.pooler_output[0], atol=1e-4)


@pytest.mark.parametrize("length,window,globals_", [(37, 8, (0,)), (50, 5, (0, 3)), (16, 64, (0,))])
def test_sparse_attention_equals_dense_with_equivalent_mask(length, window, globals_):
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, length, 2, 8)), jnp.float32) for _ in range(3))
  seg = np.ones((2, length), np.int32)
  seg[0, length // 3:] = 2
  seg[1, length - 4:] = 0
  s = Sequences.build(2, length, segment_ids=seg, max_segments=2)
  fn = jax.jit(sparse_attention_xla, static_argnames=("window", "global_positions", "max_global"))
  out = fn(q, k, v, segment_ids=s.segment_ids, positions=s.positions, window=window,
           global_positions=globals_, max_global=2 * len(globals_))
  ref = attention_reference(q, k, v, mask=sparse_mask_dense(s.segment_ids, s.positions, window, globals_))
  np.testing.assert_allclose(np.asarray(out)[seg != 0], np.asarray(ref)[seg != 0], atol=1e-5)


def _compiled_step(length: int, layout: str):
  cfg = tiny(layout, sparse_window=128, max_position_embeddings=4096)
  model = models.MaskedLM(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, ids):
    return jnp.mean(nnx.merge(graphdef, params, rest)(ids) ** 2)
  ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
  return jax.jit(jax.value_and_grad(loss)).lower(params, ids).compile(), params


def test_sparse_forward_backward_memory_grows_linearly_to_4096():
  """Memory from XLA's compiled buffer assignment (deterministic, unlike timings)."""
  steps = {n: _compiled_step(n, "sparse*2") for n in (1024, 2048, 4096)}
  sparse = {n: c.memory_analysis().temp_size_in_bytes for n, (c, _) in steps.items()}
  dense = {n: _compiled_step(n, "serial*2")[0].memory_analysis().temp_size_in_bytes for n in (1024, 2048)}
  assert sparse[2048] / sparse[1024] < 2.4 and sparse[4096] / sparse[2048] < 2.4, sparse
  assert dense[2048] / dense[1024] > 3.0, dense  # the quadratic peer, for contrast
  compiled, params = steps[4096]
  loss, grads = compiled(params, np.random.default_rng(0).integers(2, 64, (1, 4096)).astype(np.int32))
  assert np.isfinite(float(loss)) and all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_extended_checkpoint_runs_4096_and_keeps_first_512_outputs(minilm_dir):
  dense = jaxformers.from_pretrained(minilm_dir)
  sparse, report = jaxformers.from_pretrained(minilm_dir, layout="sparse*6", max_position_embeddings=4096,
                                              sparse_window=1024, return_report=True)
  assert any("extended from 512 to 4096" in n for n in report.notes)
  ids = np.random.default_rng(0).integers(1000, 20000, (1, 512))
  np.testing.assert_allclose(np.asarray(sparse(ids).last_hidden_state), np.asarray(dense(ids).last_hidden_state),
                             atol=1e-4)
  table = np.asarray(sparse.embeddings.position.embedding[...])
  np.testing.assert_array_equal(table[512:1024], table[:512])
  graphdef, state = nnx.split(sparse)
  long_ids = np.random.default_rng(1).integers(1000, 20000, (1, 4096))
  out = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i).last_hidden_state)(state, long_ids)
  assert out.shape == (1, 4096, 384) and np.isfinite(np.asarray(out)).all()


def test_sparse_block_kernel_path_equals_banded_xla_path():
  from jaxformers.kernels.attention.config import force_interpret
  cfg = tiny("sparse*1", sparse_window=16).replace(num_heads=1)  # head_dim 32: the kernels' smallest
  model = models.Encoder(cfg, rngs=nnx.Rngs(0))
  model.eval()
  ids = np.random.default_rng(0).integers(2, 64, (2, 40))
  mask = np.ones_like(ids)
  mask[1, 29:] = 0
  xla = model(ids, mask).last_hidden_state
  with force_interpret():
    assert model.blocks[0].mixer.uses_kernel(Sequences.build(2, 40, attention_mask=mask))
    kernel = model(ids, mask).last_hidden_state
  np.testing.assert_allclose(np.asarray(kernel)[mask == 1], np.asarray(xla)[mask == 1], atol=1e-5)
