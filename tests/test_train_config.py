"""The trainer's configuration: config.model is EncoderConfig's schema, values are checked up front, and the task
objects compute what an independent numpy / scikit-learn computation gives."""
import dataclasses
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from jaxformers.config import EncoderConfig
from jaxformers.data.tokenize import Tokenized
from jaxformers.train import ConfigError
from jaxformers.train.defaults import base_config, check_values, encoder_config
from jaxformers.train.loop import Run
from jaxformers.train.tasks import TASKS, make_task
from tests.train_helpers import ROOT, load_config


def test_config_model_holds_exactly_the_encoder_config_fields():
  """Every field but ``mixer_options``, whose entries (registered token mixers' options) are keys of their own."""
  from jaxformers.mixers import all_options
  fields = {f.name for f in dataclasses.fields(EncoderConfig)} - {"mixer_options"}
  assert set(base_config().model.keys()) == fields | set(all_options())


def test_every_model_field_reaches_the_model(tmp_path):
  c = load_config("tiny", "layout=sparse*1,fourier*1", model__fourier_impl="matmul", model__sparse_window=8,
                  model__sparse_global_tokens=(0, 1), model__layer_norm_eps=1e-7, model__hidden_act="relu")
  r = Run(c, tmp_path / "run")
  assert (r.cfg.fourier_impl, r.cfg.sparse_window, r.cfg.sparse_global_tokens) == ("matmul", 8, (0, 1))
  assert (r.cfg.layer_norm_eps, r.cfg.hidden_act, r.cfg.hidden_size) == (1e-7, "relu", 32)
  assert r.cfg.vocab_size == r.tok.get_vocab_size() and r.cfg.pad_token_id == r.special["pad"]
  assert not (tmp_path / "run").exists()     # building a run writes nothing


def test_model_fields_are_settable_from_the_command_line(tmp_path):
  p = subprocess.run([sys.executable, "train.py", "--config=configs/tiny.py:steps=1", "--config.model.fuse_projections=True",
                      "--config.model.layout=parallel*2", "--config.model.sparse_window=16", f"--workdir={tmp_path}"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr
  import json
  saved = json.loads((tmp_path / "summary.json").read_text())
  assert saved["steps"] == 1
  meta = json.loads(next((tmp_path / "checkpoints").glob("*/meta/metadata")).read_text())
  assert meta["model_config"]["fuse_projections"] is True and meta["model_config"]["sparse_window"] == 16


def test_encoder_config_names_the_config_key():
  m = base_config().model
  m.num_heads = 5
  with pytest.raises(ConfigError, match=r"config.model.num_heads=5: must divide hidden_size=128"):
    encoder_config(m, vocab_size=10, pad_token_id=0)


@pytest.mark.parametrize("key,value,message", [
    ("data.batch_size", 0, "config.data.batch_size=0: must be at least 1"),
    ("data.max_length", 0, "config.data.max_length=0: must be at least 2"),
    ("train.checkpoint_every", 0, "config.train.checkpoint_every=0: must be at least 1"),
    ("optim.lr", -1e-3, "config.optim.lr=-0.001: must be a positive learning rate"),
    ("optim.lr", 0.0, "config.optim.lr=0.0: must be a positive learning rate"),
    ("task", "mlmm", "config.task='mlmm': expected one of classification, heal, mlm, regression"),
    ("data.source", "csv", "config.data.source='csv': expected one of embedded, files, glue_tsv, tfds"),
])
def test_bad_values_are_refused_up_front(key, value, message):
  c = load_config("tiny")
  section, name = key.split(".") if "." in key else (None, key)
  (c[section] if section else c)[name] = value
  with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
    check_values(c)


def test_bad_value_on_the_command_line_is_one_line(tmp_path):
  wd = tmp_path / "run"
  p = subprocess.run([sys.executable, "train.py", "--config=configs/tiny.py", "--config.optim.lr=-0.1",
                      f"--workdir={wd}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert p.returncode == 1
  assert p.stderr.strip().splitlines() == [
      "train.py: error: config.optim.lr=-0.1: must be a positive learning rate (a negative one would train by "
      "gradient ascent)"]
  assert not wd.exists()


def test_predict_without_test_file_names_test_file(tmp_path):
  f = tmp_path / "d.csv"
  f.write_text("text,label\n" + "".join(f"w{i} x,{i % 2}\n" for i in range(20)))
  c = load_config("tiny", "steps=1", data__source="files", data__train_file=str(f), data__eval_file=str(f))
  from jaxformers.data.sources import DataError
  from jaxformers.train import run
  run(c, tmp_path / "run")
  c = load_config("tiny", "steps=1", data__source="files", data__train_file=str(f), data__eval_file=str(f),
                  mode="predict")
  with pytest.raises(DataError, match=r"needs config.data.test_file for the test split"):
    run(c, tmp_path / "run")
  assert not (tmp_path / "run" / "predictions").exists()


def _task(task="classification", **data):
  c = load_config("tiny", task=task, **{f"data__{k}": v for k, v in data.items()})
  return make_task(c)


def test_task_is_chosen_by_config_and_data():
  assert TASKS.names() == ["classification", "heal", "mlm", "regression"]
  assert type(_task()).__name__ == "Classification" and _task().num_labels == 9
  assert _task("mlm").model_task == "masked_lm" and _task("mlm").best_metric() == ("validation/loss", "min")
  reg = _task(source="files", train_file="x.csv", num_labels=1)
  assert reg.name == "regression" and reg.model_task == "classification" and reg.head_labels == 1
  assert reg.best_metric() == ("validation/pearson", "max")


def test_classification_loss_and_metrics_match_numpy_and_sklearn():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 3)).astype(np.float32)
  labels = np.array([0, 2, 1, 1, 0, 2])
  weights = np.array([1, 1, 1, 1, 1, 0], np.float32)
  task = _task()
  s, w, c = task.loss_terms(jnp.asarray(logits), {"labels": jnp.asarray(labels), "weights": jnp.asarray(weights)})
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(float(s), -(logp[np.arange(6), labels] * weights).sum(), rtol=1e-6)
  assert float(w) == 5 and float(c) == ((logits.argmax(-1) == labels) * weights).sum()
  data = Tokenized([np.zeros(2, np.int32)] * 6, [np.zeros(2, np.int32)] * 6, labels, "t")
  m = task.eval_metrics(data, logits, np.array([float(s), float(w), float(c)]))
  assert m["accuracy"] == skm.accuracy_score(labels, logits.argmax(-1))
  np.testing.assert_allclose(m["loss"], float(s) / 5, rtol=1e-7)


def test_regression_loss_matches_numpy(tmp_path):
  pred = np.array([[0.5], [2.0], [-1.0]], np.float32)
  target = np.array([1.0, 2.0, 0.0], np.float32)
  reg = _task(source="files", train_file="x.csv", num_labels=1)
  s, w, c = reg.loss_terms(jnp.asarray(pred), {"labels": jnp.asarray(target), "weights": jnp.ones(3)})
  np.testing.assert_allclose(float(s), ((pred[:, 0] - target) ** 2).sum(), rtol=1e-7)
  reg.write_predictions(pred, tmp_path / "p.tsv")
  assert (tmp_path / "p.tsv").read_text() == "index\tprediction\n0\t0.500\n1\t2.000\n2\t-1.000\n"


def test_classification_predictions_use_label_names(tmp_path):
  task = _task()
  task.write_predictions(np.array([[0.0, 1.0] + [0.0] * 7, [2.0] + [0.0] * 8]), tmp_path / "p.tsv")
  assert (tmp_path / "p.tsv").read_text() == "index\tprediction\n0\temail\n1\tasyncio\n"


@pytest.mark.parametrize("value", [1.0, 1.5, -0.1])
def test_sparsity_outside_zero_to_one_is_refused_up_front(value):
  """optim.sparsity=1 or 1.5 ended in a traceback from inside the optimiser's init; a negative one was accepted."""
  c = load_config("tiny", optim__sparsity=value)
  with pytest.raises(ConfigError, match=rf"^config.optim.sparsity={value}: the fraction of the blocks' weights to "
                                        rf"prune must be in \[0, 1\) \(1 would prune every weight\)$"):
    check_values(c)


def test_sparsity_of_one_on_the_command_line_is_one_line(tmp_path):
  wd = tmp_path / "run"
  p = subprocess.run([sys.executable, "train.py", "--config=configs/tiny.py", "--config.optim.sparsity=1",
                      f"--workdir={wd}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert p.returncode == 1
  assert p.stderr.strip().splitlines() == [
      "train.py: error: config.optim.sparsity=1.0: the fraction of the blocks' weights to prune must be in [0, 1) "
      "(1 would prune every weight)"]
  assert not wd.exists()
