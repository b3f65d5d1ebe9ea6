"""Bad input: a clear error naming the key, file, column or value at fault; nothing saved is lost."""
import re
import subprocess
import sys

import numpy as np
import pytest

from jaxformers.data.sources import DataError
from jaxformers.train import ConfigError, NonFiniteLoss, run
from jaxformers.train.checkpoint import CheckpointMismatch
from jaxformers.train.defaults import check_keys
from tests.test_train_glue import glue_tiny, write_rte
from tests.train_helpers import ROOT, checkpoint_params, load_config, train_losses


def test_unknown_config_key_on_command_line_names_closest(tmp_path):
  p = subprocess.run([sys.executable, "train.py", "--config=configs/tiny.py", "--config.optim.lrr=1e-3",
                      f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert p.returncode != 0
  assert "unknown config key 'optim.lrr'" in p.stderr and "optim.lr" in p.stderr
  assert not (tmp_path / "checkpoints").exists()


def test_unknown_config_key_in_config_file():
  import ml_collections
  c = load_config("tiny")
  c.unlock()
  c.train.num_stepz = 3
  with pytest.raises(ConfigError, match=r"unknown config key 'train.num_stepz'.*train.num_steps"):
    check_keys(c)
  c2 = ml_collections.ConfigDict({"optimm": {}})
  with pytest.raises(ConfigError, match=r"'optimm'.*optim"):
    check_keys(c2)


def test_missing_data_file(tmp_path):
  with pytest.raises(DataError, match=r"dev.tsv does not exist"):
    data = write_rte(tmp_path / "RTE")
    (data / "dev.tsv").unlink()
    run(glue_tiny("rte", data), tmp_path / "run")


def test_missing_column(tmp_path):
  data = write_rte(tmp_path / "RTE")
  text = (data / "train.tsv").read_text().replace("sentence2", "sentence_2", 1)
  (data / "train.tsv").write_text(text)
  with pytest.raises(DataError, match=r"train.tsv: missing column 'sentence2' \(did you mean sentence_2"):
    run(glue_tiny("rte", data), tmp_path / "run")


def test_files_source_missing_column(tmp_path):
  f = tmp_path / "train.csv"
  f.write_text("txt,label\nhello world,1\n")
  c = load_config("tiny", data__source="files", data__train_file=str(f), data__eval_file=str(f))
  with pytest.raises(DataError, match=r"train.csv: missing column 'text' \(did you mean txt"):
    run(c, tmp_path / "run")


def test_label_outside_range(tmp_path):
  data = write_rte(tmp_path / "RTE")
  lines = (data / "train.tsv").read_text().splitlines()
  lines[3] = lines[3].rsplit("\t", 1)[0] + "\tmaybe"
  (data / "train.tsv").write_text("\n".join(lines) + "\n")
  with pytest.raises(DataError, match=r"train.tsv line 4: label 'maybe' is outside the task's range; "
                                      r"expected one of entailment, not_entailment"):
    run(glue_tiny("rte", data), tmp_path / "run")


def test_numeric_label_outside_range_in_jsonl(tmp_path):
  f = tmp_path / "train.jsonl"
  f.write_text('{"text": "a b", "label": 1}\n{"text": "c d", "label": 7}\n')
  c = load_config("tiny", data__source="files", data__train_file=str(f), data__eval_file=str(f), data__num_labels=3)
  with pytest.raises(DataError, match=r"train.jsonl line 2: label 7 is outside the task's range"):
    run(c, tmp_path / "run")


def test_empty_dataset(tmp_path):
  data = write_rte(tmp_path / "RTE")
  (data / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n")
  with pytest.raises(DataError, match=r"train.tsv: the data set is empty"):
    run(glue_tiny("rte", data), tmp_path / "run")


def test_too_long_sequences_error_or_truncate(tmp_path, caplog):
  data = write_rte(tmp_path / "RTE")
  with pytest.raises(DataError, match=r"train.tsv: \d+ of 64 examples are longer than 8 tokens"):
    run(glue_tiny("rte", data, data__max_length=8, data__on_too_long="error"), tmp_path / "a")
  with pytest.raises(ConfigError, match=r"max_length=100 is longer than the model's 64 positions"):
    run(glue_tiny("rte", data, data__max_length=100, data__on_too_long="error"), tmp_path / "b")
  with caplog.at_level("WARNING"):
    out = run(glue_tiny("rte", data, data__max_length=8, train__num_steps=2), tmp_path / "c")
  assert out["steps"] == 2
  assert any("longer than 8 tokens" in r.message and "truncated" in r.message for r in caplog.records)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  wd = tmp_path / "run"
  c = load_config("tiny", "steps=4", train__checkpoint_every=2)
  run(c, wd)   # a good run to step 4, saved at 2 and 4
  good = checkpoint_params(wd, 4)
  c = load_config("tiny", "steps=40", optim__lr=1e12, train__checkpoint_every=2)
  with pytest.raises(NonFiniteLoss) as err:
    run(c, wd)   # resumes from step 4 with an absurd learning rate
  m = re.search(r"loss became (nan|inf|-inf) at step (\d+);.*The last good checkpoint is step (\d+) in (\S+);",
                str(err.value))
  assert m, str(err.value)
  bad, last = int(m[2]), int(m[3])
  losses = train_losses(wd)
  assert bad > 4 and bad not in losses and max(losses) == bad - 1      # every step before it was logged, finite
  assert all(np.isfinite(losses[s]) for s in losses)
  saved = sorted(int(d.name) for d in (wd / "checkpoints").iterdir() if d.name.isdigit())
  assert saved[-1] == last == max(s for s in range(2, bad, 2)) and m[4] == str(wd / "checkpoints")
  kept = checkpoint_params(wd, last)
  assert all(np.isfinite(v).all() for v in kept.values())
  if last == 4:                                                          # untouched by the failed run
    for k, v in good.items():
      np.testing.assert_array_equal(kept[k], v, err_msg=k)


def test_checkpoint_from_another_model_is_refused(tmp_path):
  wd = tmp_path / "run"
  run(load_config("tiny", "steps=2"), wd)
  with pytest.raises(CheckpointMismatch, match=r"model config intermediate_size: checkpoint has 64, this run has 96"):
    run(load_config("tiny", "steps=4", model__intermediate_size=96), wd)
  with pytest.raises(CheckpointMismatch, match=r"model config layout: checkpoint has 'serial\*2'"):
    run(load_config("tiny", "layout=parallel*2,steps=4"), wd)
  out = run(load_config("tiny", "steps=4"), wd)   # the original configuration still resumes
  assert out["steps"] == 4 and out["steps_this_run"] == 2


def test_cli_error_exit_code(tmp_path):
  p = subprocess.run([sys.executable, "train.py", "--config=configs/glue.py:task=rte", "--config.data.dir=/nonexistent",
                      "--config.data.tokenizer=/nonexistent/tok.json", f"--workdir={tmp_path}"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert p.returncode == 1
  assert "train.py: error: data.tokenizer: /nonexistent/tok.json: does not exist (expected a checkpoint directory" \
      in p.stderr
