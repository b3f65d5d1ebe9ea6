"""GLUE: local TSV files as distributed (train, eval, predict) and the tfds path on mock data."""
import numpy as np
import pytest

from jaxformers.train import run
from tests.train_helpers import load_config

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


def test_glue_tsv_rte_train_eval_predict(tmp_path):
  data = write_rte(tmp_path / "RTE")
  wd = tmp_path / "run"
  out = run(glue_tiny("rte", data), wd)
  assert out["steps"] == 6
  assert set(out["eval"]) >= {"validation/accuracy", "validation/loss"}
  assert out["eval_examples"] == {"validation": 32}
  ev = run(glue_tiny("rte", data, mode="eval"), wd)
  assert ev["step"] == 6 and abs(ev["eval"]["validation/accuracy"] - out["eval"]["validation/accuracy"]) < 1e-6
  pr = run(glue_tiny("rte", data, mode="predict"), wd)
  lines = (wd / "predictions" / "RTE.tsv").read_text().splitlines()
  assert pr["files"]["test"].endswith("RTE.tsv")
  assert lines[0] == "index\tprediction" and len(lines) == 17
  assert {l.split("\t")[1] for l in lines[1:]} <= {"entailment", "not_entailment"}
  assert [l.split("\t")[0] for l in lines[1:]] == [str(i) for i in range(16)]


def test_glue_tsv_cola_headerless_and_stsb_regression(tmp_path):
  rng = np.random.default_rng(1)
  cola = tmp_path / "CoLA"
  cola.mkdir()
  for name, n in (("train.tsv", 40), ("dev.tsv", 24)):
    rows = [f"src\t{i % 2}\t\t{_sentence(rng)}" for i in range(n)]   # source, label, original label, sentence
    (cola / name).write_text("\n".join(rows) + "\n")
  out = run(glue_tiny("cola", cola), tmp_path / "cola_run")
  assert "validation/matthews_corr" in out["eval"] and -1.0 <= out["eval"]["validation/matthews_corr"] <= 1.0

  sts = tmp_path / "STS-B"
  sts.mkdir()
  header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
  for name, n in (("train.tsv", 40), ("dev.tsv", 24)):
    rows = [f"{i}\tg\tf\t2012\t{i}\ts1\ts2\t{_sentence(rng)}\t{_sentence(rng)}\t{rng.uniform(0, 5):.2f}"
            for i in range(n)]
    (sts / name).write_text("\n".join([header] + rows) + "\n")
  out = run(glue_tiny("stsb", sts), tmp_path / "sts_run")
  assert {"validation/pearson", "validation/spearman"} <= set(out["eval"])


def test_glue_mnli_matched_and_mismatched(tmp_path):
  rng = np.random.default_rng(2)
  d = tmp_path / "MNLI"
  d.mkdir()
  labels = ("entailment", "neutral", "contradiction")
  header = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label"
  for name, n in (("train.tsv", 40), ("dev_matched.tsv", 16), ("dev_mismatched.tsv", 16)):
    rows = [f"{i}\tp\tq\tg\t{_sentence(rng)}\t{_sentence(rng)}\tx\t{labels[i % 3]}" for i in range(n)]
    (d / name).write_text("\n".join([header] + rows) + "\n")
  out = run(glue_tiny("mnli", d), tmp_path / "run")
  assert {"validation_matched/accuracy", "validation_mismatched/accuracy"} <= set(out["eval"])


def test_tfds_glue_on_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets", reason="the tfds extra is not installed")
  import tensorflow_datasets.text.glue  # noqa: F401
  with tfds.testing.mock_data(num_examples=40):
    out = run(glue_tiny("sst2", "", data__source="tfds"), tmp_path / "run")
  assert out["train_examples"] == 40 and out["steps"] == 6
  assert "validation/accuracy" in out["eval"]
