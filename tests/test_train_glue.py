"""GLUE: local TSV files as distributed (train, eval, predict) and the tfds path on mock data.

Each task's test file holds the dev inputs (without labels), so the official metric recomputed with
scikit-learn / scipy from the written predictions must equal what the trainer reported for the dev set.
"""
import numpy as np
import pytest
from sklearn import metrics as skm

from jaxformers.train import run
from tests.train_helpers import load_config

STSB_MSE_TOL = 3e-3   # 3-decimal rounding: |error| <= 5e-4 a prediction, residuals below 3
WORDS = "the a cat dog sat ran on mat fast slow red blue big small house tree".split()


def _sentence(rng, n=6):
  return " ".join(rng.choice(WORDS, size=n))


def write_rte(d, n_train=64, n_dev=32, n_test=16, seed=0):
  """RTE-format files (index, sentence1, sentence2, label); label = entailment iff the sentences share a first word."""
  rng = np.random.default_rng(seed)
  d.mkdir(parents=True, exist_ok=True)

  def rows(n, labelled):
    out = []
    for i in range(n):
      a, b = _sentence(rng), _sentence(rng)
      ent = rng.random() < 0.5
      if ent:
        b = a.split()[0] + " " + b
      out.append([str(i), a, b] + (["entailment" if ent else "not_entailment"] if labelled else []))
    return out
  for name, n, lab in (("train.tsv", n_train, True), ("dev.tsv", n_dev, True), ("test.tsv", n_test, False)):
    header = ["index", "sentence1", "sentence2"] + (["label"] if lab else [])
    (d / name).write_text("\n".join("\t".join(r) for r in [header] + rows(n, lab)) + "\n")
  return d


def glue_tiny(task, data_dir, **kw):
  small = dict(model__hidden_size=32, model__num_heads=2, model__intermediate_size=64,
               model__max_position_embeddings=64, data__dir=str(data_dir), data__vocab_size=200,
               data__max_length=32, data__batch_size=8, data__eval_batch_size=16, optim__lr=1e-3,
               train__num_epochs=0.0, train__num_steps=6, train__progress=False, train__async_checkpoint=False)
  small.update(kw)
  return load_config("glue", f"task={task},layout=serial*1", **small)


def dev_as_test(d, dev_name="dev.tsv", label_column=None, header=True, test_columns=None, test_name="test.tsv"):
  """Write ``test.tsv`` with the dev inputs in the task's test layout; returns the dev labels as strings."""
  rows = [l.split("\t") for l in (d / dev_name).read_text().splitlines()]
  head, body = (rows[0], rows[1:]) if header else (None, rows)
  col = head.index(label_column) if isinstance(label_column, str) else label_column
  keep = [head.index(c) if isinstance(c, str) else c for c in test_columns]
  names = ["index"] + [c if isinstance(c, str) else "sentence" for c in test_columns]
  lines = ["\t".join(names)] + ["\t".join([str(i)] + [r[k] for k in keep]) for i, r in enumerate(body)]
  (d / test_name).write_text("\n".join(lines) + "\n")
  return [r[col] for r in body]


def written_predictions(wd, name, n):
  lines = (wd / "predictions" / name).read_text().splitlines()
  assert lines[0] == "index\tprediction" and len(lines) == n + 1
  assert [l.split("\t")[0] for l in lines[1:]] == [str(i) for i in range(n)]
  return [l.split("\t")[1] for l in lines[1:]]


def test_glue_tsv_rte_train_eval_predict(tmp_path):
  data = write_rte(tmp_path / "RTE")
  labels = dev_as_test(data, label_column="label", test_columns=["sentence1", "sentence2"])
  wd = tmp_path / "run"
  out = run(glue_tiny("rte", data), wd)
  assert out["steps"] == 6
  assert out["eval_examples"] == {"validation": 32}
  ev = run(glue_tiny("rte", data, mode="eval"), wd)
  assert ev["step"] == 6 and ev["eval"] == out["eval"]
  pr = run(glue_tiny("rte", data, mode="predict"), wd)
  assert pr["files"]["test"].endswith("RTE.tsv")
  preds = written_predictions(wd, "RTE.tsv", 32)
  assert set(preds) <= {"entailment", "not_entailment"}
  assert out["eval"]["validation/accuracy"] == pytest.approx(skm.accuracy_score(labels, preds), abs=1e-12)


def test_glue_tsv_mrpc_f1_from_written_predictions(tmp_path):
  rng = np.random.default_rng(3)
  d = tmp_path / "MRPC"
  d.mkdir()
  for name, n in (("train.tsv", 48), ("dev.tsv", 32)):
    rows = []
    for i in range(n):
      a = _sentence(rng)
      same = i % 3 != 0
      b = a if same else _sentence(rng)
      rows.append(f"{int(same)}\t{i}\t{i + 1000}\t{a}\t{b}")
    (d / name).write_text("\n".join(["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"] + rows) + "\n")
  labels = dev_as_test(d, label_column="Quality", test_columns=["#1 ID", "#2 ID", "#1 String", "#2 String"])
  out = run(glue_tiny("mrpc", d, optim__lr=3e-3), tmp_path / "run")
  run(glue_tiny("mrpc", d, mode="predict"), tmp_path / "run")
  preds = written_predictions(tmp_path / "run", "MRPC.tsv", 32)
  f1 = skm.f1_score([int(x) for x in labels], [int(x) for x in preds], average="binary", zero_division=0)
  assert out["eval"]["validation/f1"] == pytest.approx(f1, abs=1e-12)
  assert out["eval"]["validation/accuracy"] == pytest.approx(skm.accuracy_score(labels, preds), abs=1e-12)
  assert out["best_metric"] == "validation/f1"


def test_glue_tsv_cola_headerless_and_stsb_regression(tmp_path):
  rng = np.random.default_rng(1)
  cola = tmp_path / "CoLA"
  cola.mkdir()
  for name, n in (("train.tsv", 40), ("dev.tsv", 24)):
    rows = [f"src\t{i % 2}\t\t{_sentence(rng)}" for i in range(n)]   # source, label, original label, sentence
    (cola / name).write_text("\n".join(rows) + "\n")
  labels = dev_as_test(cola, label_column=1, header=False, test_columns=[3])
  out = run(glue_tiny("cola", cola), tmp_path / "cola_run")
  run(glue_tiny("cola", cola, mode="predict"), tmp_path / "cola_run")
  preds = written_predictions(tmp_path / "cola_run", "CoLA.tsv", 24)
  assert out["eval"]["validation/matthews_corr"] == pytest.approx(skm.matthews_corrcoef(labels, preds), abs=1e-12)

  sts = tmp_path / "STS-B"
  sts.mkdir()
  header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
  for name, n in (("train.tsv", 40), ("dev.tsv", 24)):
    rows = []
    for i in range(n):   # the score is the share of words the sentences have in common: learnable
      a, b = _sentence(rng), _sentence(rng)
      b = " ".join(a.split()[:i % 6] + b.split()[i % 6:])
      rows.append(f"{i}\tg\tf\t2012\t{i}\ts1\ts2\t{a}\t{b}\t{5 * (i % 6) / 6:.2f}")
    (sts / name).write_text("\n".join([header] + rows) + "\n")
  labels = np.array(dev_as_test(sts, label_column="score", test_columns=["sentence1", "sentence2"]), float)
  out = run(glue_tiny("stsb", sts), tmp_path / "sts_run")
  run(glue_tiny("stsb", sts, mode="predict"), tmp_path / "sts_run")
  preds = np.array(written_predictions(tmp_path / "sts_run", "STS-B.tsv", 24), float)
  # the file holds 3 decimals, and a model this small predicts nearly one value, so Pearson and Spearman of the
  # rounded predictions mean little (their formulas are checked in test_train_units); the squared error is robust
  assert out["eval"]["validation/mse"] == pytest.approx(np.mean((preds - labels) ** 2), abs=STSB_MSE_TOL)
  assert {"validation/pearson", "validation/spearman"} <= set(out["eval"])
  assert out["best_metric"] == "validation/pearson"


def test_glue_mnli_matched_and_mismatched(tmp_path):
  rng = np.random.default_rng(2)
  d = tmp_path / "MNLI"
  d.mkdir()
  labels = ("entailment", "neutral", "contradiction")
  header = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label"
  for name, n in (("train.tsv", 40), ("dev_matched.tsv", 16), ("dev_mismatched.tsv", 16)):
    rows = [f"{i}\tp\tq\tg\t{_sentence(rng)}\t{_sentence(rng)}\tx\t{labels[i % 3]}" for i in range(n)]
    (d / name).write_text("\n".join([header] + rows) + "\n")
  labels = {s: dev_as_test(d, f"dev_{s}.tsv", "gold_label", test_columns=["sentence1", "sentence2"],
                           test_name=f"test_{s}.tsv") for s in ("matched", "mismatched")}
  out = run(glue_tiny("mnli", d), tmp_path / "run")
  run(glue_tiny("mnli", d, mode="predict"), tmp_path / "run")
  for split, name in (("matched", "MNLI-m.tsv"), ("mismatched", "MNLI-mm.tsv")):
    preds = written_predictions(tmp_path / "run", name, 16)
    assert out["eval"][f"validation_{split}/accuracy"] == pytest.approx(skm.accuracy_score(labels[split], preds),
                                                                        abs=1e-12)


def test_tfds_glue_on_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets", reason="the tfds extra is not installed")
  import tensorflow_datasets.text.glue  # noqa: F401
  with tfds.testing.mock_data(num_examples=40):
    out = run(glue_tiny("sst2", "", data__source="tfds"), tmp_path / "run")
  assert out["train_examples"] == 40 and out["steps"] == 6
  assert "validation/accuracy" in out["eval"]
