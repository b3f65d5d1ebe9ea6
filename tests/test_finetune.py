"""Fine-tuning on one's own files (configs/finetune.py): labels inferred from the training file, which of
num_steps / num_epochs rules, the CSV journey with the real MiniLM (train, predict, prune on the same CSV), and
what train.py says when init_from is re-arranged into another layout."""
import csv
import json
import logging
import random
import subprocess
import sys

import pytest

import jaxformers
from jaxformers.data import sources
from jaxformers.data.files import infer_labels
from jaxformers.data.sources import DataError
from jaxformers.train.cli import apply_overrides, override_keys, settle_length
from jaxformers.train.defaults import check_values
from jaxformers.errors import ConfigError
from tests.train_helpers import ROOT, load_config

WORDS = {"positive": ["great", "lovely", "excellent", "wonderful", "good"],
         "negative": ["awful", "bad", "terrible", "poor", "boring"],
         "neutral": ["okay", "average", "plain", "fine", "usual"]}
CLASSES = ("negative", "neutral", "positive")     # sorted: the ids inference gives


def write_csv(path, n, seed=0, labels=True):
  rng = random.Random(seed)
  gold = []
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["sentence", "label"] if labels else ["sentence"])
    for i in range(n):
      lab = ("positive", "negative", "neutral")[i % 3]
      text = f"the film was {rng.choice(WORDS[lab])}, really {rng.choice(WORDS[lab])}"
      w.writerow([text, lab] if labels else [text])
      gold.append(lab)
  return gold


def files_data(**kw):
  c = load_config("finetune", None)
  for k, v in kw.items():
    c.data[k] = v
  return c.data


def test_labels_are_inferred_sorted_from_the_training_file(tmp_path, caplog):
  f = tmp_path / "t.csv"
  write_csv(f, 9)
  with caplog.at_level(logging.INFO):
    labels = sources.get_source(files_data(train_file=str(f), text_a_column="sentence")).labels(
        files_data(train_file=str(f), text_a_column="sentence"))
  assert labels == sources.Labels(3, CLASSES, "accuracy")
  assert "3 classes inferred from column 'label': 0=negative, 1=neutral, 2=positive" in caplog.text
  for rows, want in ((["2", "0", "1", "1"], (3, None)),                       # ids stay ids
                     (["5", "1", "10", "3"], (4, ("1", "3", "5", "10")))):      # other integers sort by value
    g = tmp_path / f"ints{len(want[1] or ())}.csv"
    g.write_text("text,label\n" + "".join(f"x,{r}\n" for r in rows))
    assert infer_labels(g, "label") == want
  g = tmp_path / "floats.csv"
  g.write_text("text,label\nx,0.5\ny,1.25\n")
  with pytest.raises(DataError, match=r"non-integer numbers .*config.data.num_labels=1"):
    infer_labels(g, "label")
  g.write_text("text,label\nx,a\ny,a\n")
  with pytest.raises(DataError, match=r"one value only \('a'\)"):
    infer_labels(g, "label")
  names = files_data(train_file=str(f), label_names="positive,negative,neutral")   # given names keep their order
  assert sources.get_source(names).labels(names).names == ("positive", "negative", "neutral")


def test_a_label_outside_the_classes_names_num_labels_and_label_names(tmp_path):
  f, dev = tmp_path / "t.csv", tmp_path / "dev.csv"
  write_csv(f, 9)
  d = files_data(train_file=str(f), eval_file=str(dev), text_a_column="sentence", num_labels=2)
  with pytest.raises(DataError, match=r"line 2: label 'positive' is outside the task's range; expected one of 0, 1; "
                                      r"set config.data.label_names .* and config.data.num_labels"):
    sources.get_source(d).examples(d, "train")
  dev.write_text("sentence,label\nfine,neutral\nmeh,mixed\n")     # a class the training file does not have
  d = files_data(train_file=str(f), eval_file=str(dev), text_a_column="sentence")
  with pytest.raises(DataError, match=r"dev.csv line 3: label 'mixed' is outside .*config.data.label_names"):
    sources.get_source(d).examples(d, "validation")


def test_num_steps_or_num_epochs_one_rules(caplog):
  c = load_config("finetune", "train=t.csv")
  assert c.train.num_epochs == 3.0 and c.train.num_steps == 0 and c.optim.lr == 3e-5
  check_values(c)
  c.train.num_steps = 10                         # both set in the config itself: refused, naming both
  with pytest.raises(ConfigError, match=r"^config.train.num_steps=10 and config.train.num_epochs=3 are both set"):
    check_values(c)
  with caplog.at_level(logging.INFO):
    settle_length(c, override_keys(["train.py", "--config.train.num_steps=10", "--workdir=x"]))
  assert c.train.num_epochs == 0.0 and c.train.num_steps == 10
  assert "train.num_steps=10 from the command line rules; the config's train.num_epochs=3 is set to 0" in caplog.text
  check_values(c)
  c.train.num_epochs = 2.0                       # both on the command line: left for check_values to refuse
  settle_length(c, {"train.num_steps", "train.num_epochs"})
  with pytest.raises(ConfigError, match="are both set"):
    check_values(c)
  assert load_config("finetune", "steps=7").train.num_epochs == 0.0


def test_overrides_parse_as_the_keys_type_and_unknown_keys_name_close_ones():
  c = load_config("finetune", None)
  c.unlock()
  given = apply_overrides(c, ["train.num_steps=12", "optim.lr=1e-4", "data.packing=true", "data.label_names=a,b"])
  assert given == {"train.num_steps", "optim.lr", "data.packing", "data.label_names"}
  assert (c.train.num_steps, c.optim.lr, c.data.packing, c.data.label_names) == (12, 1e-4, True, "a,b")
  assert apply_overrides(c, ["model.fourier_norm=ortho"]) and c.model.fourier_norm == "ortho"   # a placeholder key
  with pytest.raises(ConfigError, match=r"unknown config key 'data.max_lenght' .*closest valid keys: data.max_length"):
    apply_overrides(c, ["data.max_lenght=16"])
  with pytest.raises(ConfigError, match=r"'ten' is not an int"):
    apply_overrides(c, ["train.num_steps=ten"])


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory, minilm_dir):
  """The CSV journey: train.py with configs/finetune.py on a CSV with string labels, from the real MiniLM."""
  d = tmp_path_factory.mktemp("mine")
  write_csv(d / "train.csv", 36, seed=0)
  gold = write_csv(d / "dev.csv", 12, seed=1)
  write_csv(d / "test.csv", 6, seed=2, labels=False)
  spec = (f"{ROOT / 'configs' / 'finetune.py'}:train={d / 'train.csv'},eval={d / 'dev.csv'},test={d / 'test.csv'},"
          f"text=sentence,label=label,init_from={minilm_dir},max_length=24,batch=12")
  wd = d / "run"
  p = subprocess.run([sys.executable, "train.py", f"--config={spec}", "--config.train.num_steps=3",
                      "--config.train.progress=False", "--config.train.async_checkpoint=False", f"--workdir={wd}"],
                     cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  return d, spec, wd, p, gold


def test_csv_journey_infers_labels_trains_from_minilm_and_writes_predictions(csv_run):
  from jaxformers.train import run
  d, spec, wd, p, _ = csv_run
  log = p.stderr
  assert "3 classes inferred from column 'label': 0=negative, 1=neutral, 2=positive" in log
  assert "train.num_steps=3 from the command line rules; the config's train.num_epochs=3 is set to 0" in log
  assert "run length: 3 steps from train.num_steps" in log
  assert "newly initialised 2 parameters: classifier.out.bias, classifier.out.kernel" in log
  assert "from-scratch learning rate" not in log                     # the recipe's 3e-5 draws no warning
  summary = json.loads((wd / "summary.json").read_text())
  assert summary["steps"] == 3 and summary["train_examples"] == 36 and "validation/accuracy" in summary["eval"]
  model = jaxformers.from_pretrained(wd)
  assert model.num_labels == 3 and model.label_names == CLASSES and model.config.num_layers == 6   # MiniLM's 6
  c = load_config("finetune", spec.partition(":")[2], mode="predict", train__num_steps=3, train__num_epochs=0.0)
  out = run(c, wd)
  lines = (wd / "predictions" / "test.tsv").read_text().splitlines()
  assert out["files"]["test"] == str(wd / "predictions" / "test.tsv")
  assert lines[0] == "index\tprediction" and len(lines) == 7
  assert all(l.split("\t")[1] in CLASSES for l in lines[1:])


def test_prune_journey_scores_the_classifier_on_its_own_csv(csv_run, tmp_path, monkeypatch, capsys):
  from jaxformers import prune
  from jaxformers.cli import main
  d, spec, wd, _, gold = csv_run
  seen = []
  real = prune.sample_batches

  def spy(tok, examples, n, max_length, **kw):
    seen.append((examples, max_length))
    return real(tok, examples, n, max_length, **kw)
  monkeypatch.setattr(prune, "sample_batches", spy)
  # the default: the run's own config, so its own CSV and labels
  assert main(["prune", str(wd), str(tmp_path / "a"), "--heads", "0.25", "--examples", "8"]) == 0
  ex, length = seen[-1]
  assert ex.origin == str(d / "train.csv") and length == 24
  train_ids = [CLASSES.index(lab) for lab in
               [r[1] for r in csv.reader(open(d / "train.csv"))][1:]]
  assert ex.label.tolist() == train_ids and ex.label.max() < 3
  assert "scoring on 8 of 36 training examples of " + str(d / "train.csv") in capsys.readouterr().out
  assert jaxformers.from_pretrained(tmp_path / "a").label_names == CLASSES
  # the finetune config on the dev CSV, with a --config.* override as train.py takes them
  assert main(["prune", str(wd), str(tmp_path / "b"), "--heads", "0.25", "--examples", "8",
               f"--config={spec.replace('train=' + str(d / 'train.csv'), 'train=' + str(d / 'dev.csv'))}",
               "--config.data.max_length=16"]) == 0
  ex, length = seen[-1]
  assert ex.origin == str(d / "dev.csv") and length == 16 and ex.label.tolist() == [CLASSES.index(g) for g in gold]
  # the built-in 9-class data against the 3-label classifier: refused in one line, nothing written
  capsys.readouterr()
  assert main(["prune", str(wd), str(tmp_path / "c"), "--heads", "0.25",
               f"--config={ROOT / 'configs' / 'default.py'}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "has 9 labels (asyncio," in err[0] and "classifier has 3 labels (negative, neutral, " \
      "positive)" in err[0], err
  assert not (tmp_path / "c").exists()


def _native_serial(tmp_path):
  """A 2-block serial MaskedLM saved as a native checkpoint with a WordPiece tokenizer, and RTE-like data."""
  from flax import nnx
  from jaxformers import models
  from jaxformers.config import EncoderConfig
  from tests.test_train_glue import write_rte
  from tests.test_train_pretrained import _tokenizer_for
  data = write_rte(tmp_path / "RTE")
  ckpt = tmp_path / "native"
  ckpt.mkdir()
  vocab = _tokenizer_for(data, ckpt)
  cfg = EncoderConfig(vocab_size=vocab, hidden_size=32, num_heads=2, intermediate_size=64,
                      max_position_embeddings=64, layout="serial*2")
  jaxformers.save_pretrained(models.MaskedLM(cfg, rngs=nnx.Rngs(params=3, dropout=4)), ckpt, overwrite=True)
  return data, ckpt


def test_init_from_into_fourier_blocks_reports_and_uses_ortho_norm(tmp_path, caplog):
  from jaxformers.train.loop import Run
  from tests.test_train_glue import glue_tiny
  data, ckpt = _native_serial(tmp_path)
  with caplog.at_level(logging.INFO, logger="jaxformers.train"):
    r = Run(glue_tiny("rte", data, init_from=str(ckpt), model__layout="fourier,serial"), tmp_path / "a")
  assert r.cfg.fourier_norm == "ortho" and r.cfg.layout == "fourier,serial"
  text = caplog.text
  assert f"init_from {ckpt} -> layout fourier,serial, task classification:" in text
  assert "loaded " in text and "dropped " in text and "newly initialised " in text   # reused, dropped, new
  assert "model.fourier_norm='ortho': init_from" in text and "has no 'fourier' token mixer" in text
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="jaxformers.train"):
    r = Run(glue_tiny("rte", data, init_from=str(ckpt), model__layout="fourier,serial", model__fourier_norm="none"),
            tmp_path / "b")
  assert r.cfg.fourier_norm == "none" and "fourier_norm='ortho'" not in caplog.text   # the config's choice stands
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="jaxformers.train"):
    r = Run(glue_tiny("rte", data, init_from=str(ckpt), model__layout="parallel*2"), tmp_path / "c")
  assert r.cfg.fourier_norm == "none" and "fourier_norm='ortho'" not in caplog.text   # no Fourier blocks: unchanged
  assert "-> layout parallel*2" in caplog.text
  # a high learning rate on a pretrained checkpoint is pointed out
  assert "from-scratch learning rate" in caplog.text   # glue_tiny's 1e-3
