"""Packed (padding-free) batches in training, eval and predict: they train, give the padded path's per-example
predictions, resume bit for bit, and report the padding they remove."""
import json
import logging

import numpy as np
import pytest

from jaxformers.data import batching, embedded
from jaxformers.data.tokenize import Tokenized
from jaxformers.packing import best_fit, first_fit
from jaxformers.train import ConfigError, loop, run
from tests.test_train_resume import _final_params
from tests.train_helpers import load_config, train_losses

PACKED = dict(data__packing=True, data__max_length=64, data__pack_max_segments=4)


def _synthetic(n=40, seed=0, labels=True):
  rng = np.random.default_rng(seed)
  ids = [rng.integers(5, 50, rng.integers(3, 30)).astype(np.int32) for _ in range(n)]
  for x in ids:
    x[0] = 2   # a special token ([CLS]) at the start of every example
  return Tokenized(ids, [np.zeros_like(x) for x in ids],
                   rng.integers(0, 3, n).astype(np.int32) if labels else None, "synthetic")


def test_best_fit_places_every_example_within_the_limits():
  lengths = np.random.default_rng(0).integers(1, 40, 300)
  rows = best_fit(lengths, 64, max_segments=3)
  assert sorted(i for r in rows for i in r) == list(range(300))
  assert all(sum(lengths[i] for i in r) <= 64 and len(r) <= 3 for r in rows)
  assert len(rows) <= len(first_fit(lengths, 64, max_segments=3)) + 2
  assert len(best_fit(lengths, 64, max_segments=64)) <= -(-int(lengths.sum()) // 64) + 2   # near the lower bound
  with pytest.raises(ValueError, match="example 1 has 70 tokens, more than row_length=64"):
    best_fit([5, 70], 64)


def test_packed_train_batches_are_fixed_deterministic_and_mask_real_tokens():
  data = _synthetic()
  mlm = {"mask_id": 1, "vocab_size": 50, "special_ids": (0, 2), "prob": 0.15}
  pk = batching.Packing(rows=4, max_segments=3)
  a = batching.TrainBatches(data, 8, seed=3, max_length=32, pad_id=0, window=2, mlm=mlm, packing=pk)
  seen = []
  for _ in range(a.batches_per_epoch):
    plan = a._order[a.index] if a._order is not None else a._epoch_plan(0)[0]
    seen += [int(i) for row in plan for i in row]
    b = next(a)
    assert b["input_ids"].shape == (4, 32) and b["segment_ids"].shape == (4, 32)
    assert b["segment_ids"].max(1).max() <= 3 and b["segment_ids"].max() >= 2      # several examples per row
    real = b["segment_ids"] != 0
    assert not (b["weights"] > 0)[~real].any()                                      # masks only real tokens
    assert (b["labels"][real] != 0).all()
    for r in range(4):                                                              # every example predicts a token
      for s in range(1, b["segment_ids"][r].max() + 1):
        assert b["weights"][r][b["segment_ids"][r] == s].sum() >= 1
  assert len(seen) == len(set(seen)) and len(seen) > 0.7 * len(data)                # each example at most once
  assert 0 <= a.padding_fraction() < batching.TrainBatches(data, 8, 3, 32, 0, window=2).padding_fraction()
  # the saved position reproduces the same batches
  a.restore({"epoch": 1, "index": 1, "seed": 3, "packed": True})
  x = next(a)
  b = batching.TrainBatches(data, 8, seed=3, max_length=32, pad_id=0, window=2, mlm=mlm, packing=pk)
  b.restore(a.state() | {"index": 1})
  y = next(b)
  for k in x:
    np.testing.assert_array_equal(x[k], y[k], err_msg=k)
  with pytest.raises(ValueError, match="data.packing=True.*data.packing=False"):
    batching.TrainBatches(data, 8, 3, 32, 0).restore(a.state())


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory):
  wd = tmp_path_factory.mktemp("packed")
  logger = logging.getLogger("jaxformers.train")
  lines = []
  handler = logging.Handler()
  handler.emit = lambda rec: lines.append(rec.getMessage())
  logger.addHandler(handler)
  old = logger.level
  logger.setLevel(logging.INFO)
  try:
    # 24 examples: a step sees about 16 of them, so the small model can fit them within 20 steps
    out = run(load_config("tiny", "steps=20", optim__lr=1e-2, data__max_train_examples=24, **PACKED), wd)
  finally:
    logger.removeHandler(handler)
    logger.setLevel(old)
  return wd, out, lines


def test_packed_finetuning_trains_and_reports_padding(packed_run):
  wd, out, lines = packed_run
  losses = [v for _, v in sorted(train_losses(wd).items())]
  assert len(losses) == 20 and np.all(np.isfinite(losses))
  assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.2, losses
  assert out["examples_per_s"] > 0 and out["steps"] == 20
  summary = json.loads((wd / "summary.json").read_text())
  pad = summary["padding"]
  assert pad["train"]["packing"] is True
  assert 0 <= pad["train"]["packed"] < pad["train"]["padded"] - 0.05, pad
  assert pad["train"]["removed"] == pytest.approx(pad["train"]["padded"] - pad["train"]["packed"])
  assert pad["validation"]["packed"] < pad["validation"]["padded"]
  assert any(line.startswith("train: padding") and "packed" in line for line in lines), lines


def test_packed_loss_and_gradient_equal_padded(packed_run):
  """The same examples packed and padded give the same loss and the same gradient (so the same update)."""
  import jax
  from flax import nnx
  from jaxformers.train import tasks
  wd, _, _ = packed_run
  r = loop.Run(load_config("tiny", mode="eval", **PACKED), wd)
  params, rest = r.init_params()
  data = r.tokenized("validation")
  idx = np.arange(12)
  pad = r.special["pad"]
  padded = batching.pad_rows(data, idx, 64, pad, len(idx))
  plan = [idx[np.asarray(m)] for m in best_fit(data.lengths[idx], 64, r.max_segments)]
  assert len(plan) < len(idx)
  packed, _ = batching.pack_rows(data, plan, 64, pad, batching.Packing(len(plan), r.max_segments))

  def loss(p, batch):
    model = nnx.merge(r.gd_eval, p, rest, copy=True)
    s, w, _ = r.task.loss_terms(tasks.forward(model, batch, r.max_segments), batch)
    return s / w
  grad = jax.jit(jax.value_and_grad(loss))
  (la, ga), (lb, gb) = (grad(params, b) for b in (padded, packed))
  assert float(la) == pytest.approx(float(lb), abs=1e-5)
  for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def test_eval_and_predict_with_packing_equal_padded(packed_run, tmp_path):
  wd, _, _ = packed_run
  runs, logits, evals, preds = {}, {}, {}, {}
  for packing in (True, False):
    c = load_config("tiny", mode="eval", **dict(PACKED, data__packing=packing))
    r = runs[packing] = loop.Run(c, wd)
    params, rest, _ = loop._restore_for_inference(r)
    data = r.tokenized("validation")
    logits[packing], _ = r.predict_split(params, rest, data)
    evals[packing] = loop.evaluate_checkpoint(r)["eval"]
    r.c.unlock()
    r.c.predict.output_dir = str(tmp_path / f"pred{packing}")
    preds[packing] = (tmp_path / f"pred{packing}" / "test.tsv")
    loop.predict(r)
  # packing really shares rows between examples on this data
  data = runs[True].tokenized("validation")
  slots = np.concatenate([s for s, _ in batching.eval_batches(
      data, 64, 64, 0, packing=runs[True].packing(data, 64, train=False))])
  assert (slots[:, 1] >= 0).sum() > 20 and sorted(slots[slots >= 0]) == list(range(len(data)))
  np.testing.assert_allclose(logits[True], logits[False], atol=2e-5, rtol=1e-5)
  assert (logits[True].argmax(-1) == logits[False].argmax(-1)).all()
  assert evals[True]["validation/accuracy"] == evals[False]["validation/accuracy"]
  assert evals[True]["validation/loss"] == pytest.approx(evals[False]["validation/loss"], abs=1e-5)
  assert preds[True].read_text() == preds[False].read_text()
  assert len(preds[True].read_text().splitlines()) == len(data) + 1


def test_mlm_pretraining_with_packing_loss_falls(tmp_path):
  rows = embedded.stdlib_docstrings()
  for split, part in (("train", rows["train"][:300]), ("eval", rows["validation"][:40])):
    with (tmp_path / f"{split}.jsonl").open("w") as fh:
      for e in part:
        fh.write(json.dumps({"text": e["text_b"]}) + "\n")
  c = load_config("tiny", "task=mlm,steps=20", data__source="files", data__train_file=str(tmp_path / "train.jsonl"),
                  data__eval_file=str(tmp_path / "eval.jsonl"), data__label_column="", data__max_train_examples=0,
                  **PACKED)
  out = run(c, tmp_path / "run")
  losses = [v for _, v in sorted(train_losses(tmp_path / "run").items())]
  assert len(losses) == 20 and np.all(np.isfinite(losses))
  assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.3, losses
  assert out["eval"]["validation/perplexity"] == pytest.approx(np.exp(out["eval"]["validation/loss"]), rel=1e-12)
  assert out["padding"]["train"]["packed"] < out["padding"]["train"]["padded"]


def test_resume_with_packing_is_bit_identical(tmp_path):
  kw = dict(model__hidden_dropout=0.1, optim__accum_steps=2, **PACKED)
  full, part = tmp_path / "full", tmp_path / "part"
  run(load_config("tiny", "steps=6", **kw), full)
  assert run(load_config("tiny", "steps=6", train__stop_after=3, **kw), part)["steps"] == 3
  with pytest.raises(ConfigError, match="saved with data.packing=True"):
    run(load_config("tiny", "steps=6", **dict(kw, data__packing=False)), part)
  out = run(load_config("tiny", "steps=6", **kw), part)
  assert out["steps"] == 6 and out["steps_this_run"] == 3
  lf, lp = train_losses(full), train_losses(part)
  assert sorted(lf) == sorted(lp) == list(range(1, 7))
  assert [lf[k] for k in sorted(lf)] == [lp[k] for k in sorted(lp)]
  pf, pp = _final_params(full, 6), _final_params(part, 6)
  assert len(pf) == len(pp) > 10
  for (kf, a), (kp, b) in zip(pf, pp):
    assert kf == kp
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(kf))


def test_packing_config_errors(tmp_path):
  with pytest.raises(ConfigError, match=r"pack_max_segments=0: must be at least 1"):
    run(load_config("tiny", data__packing=True, data__pack_max_segments=0), tmp_path / "a")
  with pytest.raises(ConfigError, match=r"pack_rows=3 must be divisible by 2"):
    run(load_config("tiny", data__packing=True, data__pack_rows=3, optim__accum_steps=2), tmp_path / "b")
  with pytest.raises(ConfigError, match=r"Fourier blocks.*fourier_padding='fnet'"):
    loop.Run(load_config("tiny", "layout=fourier*1,serial*1", data__packing=True, model__fourier_padding="fnet"),
             tmp_path / "c")
