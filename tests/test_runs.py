"""A training run is a model: from_pretrained(WORKDIR), export with tokenizer and label names, transformers pipelines,
init_from of a further run."""
import csv
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer

import jaxformers
from jaxformers.cli import main as cli
from jaxformers.errors import CheckpointError
from jaxformers.data import embedded
from jaxformers.train import run
from tests.train_helpers import load_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# ragged: empty, one word, long, upper case, accents, CJK, emoji, tabs, a literal special token, unknown characters
RAGGED = ["", "Tea", "Return the value of the named attribute of object, or the default when it is missing entirely.",
          "HTTP Server: handle ONE request and Close", "Naïve café — résumé déjà vu", "東京 is big, 北京 too",
          "emoji 🙂 and\ttabs\nnewlines", "get the [MASK] of a [SEP] file", "ünïcödé ЖЖЖ ΣΣ ∑∫ ⅷ", "x y z"]

TOPICS = {
    "cooking": ["Stir the onions in the pan until golden", "Bake the bread for forty minutes",
                "Add salt and pepper to the soup", "Chop the garlic finely before frying it in butter",
                "Whisk two eggs with milk", "Simmer the tomato sauce slowly for an hour with basil"],
    "sports": ["The striker scored twice in the final", "She won the marathon in record time",
               "The team lost the match after extra time", "He hit a home run in the ninth inning",
               "Our goalkeeper saved a penalty", "The tennis player served an ace to win the set"],
    "weather": ["Heavy rain is expected tomorrow morning", "A cold wind blows from the north",
                "The sky is clear and the sun is hot", "Snow will fall on the mountains tonight",
                "Thunderstorms and hail in the afternoon", "Fog covers the valley until noon"],
}

TESTS = RAGGED[1:] + ["Fry the fish in hot oil with lemon", "The goalkeeper caught the ball in the last minute",
                      "Strong wind and rain tonight"]


def _write_csv(path, rows, header=("text", "label")):
  with path.open("w", newline="", encoding="utf-8") as fh:
    w = csv.writer(fh)
    w.writerow(header)
    w.writerows(rows)
  return path


def _named_csvs(tmp_path):
  rows = [(t, name) for name, ts in TOPICS.items() for t in ts]
  train = _write_csv(tmp_path / "train.csv", rows * 2)
  evalf = _write_csv(tmp_path / "eval.csv", rows[::2])
  test = _write_csv(tmp_path / "test.csv", [(t,) for t in TESTS], header=("text",))
  return train, evalf, test


def _files_config(tmp_path, steps=2, **kw):
  train, evalf, test = _named_csvs(tmp_path)
  return load_config("tiny", f"steps={steps}", data__source="files", data__train_file=str(train),
                     data__eval_file=str(evalf), data__test_file=str(test), data__label_names="cooking,sports,weather",
                     data__num_labels=3, data__max_length=64, data__batch_size=8, data__eval_batch_size=16, **kw)


def _jax_out(model, tok: Tokenizer, texts):
  """jaxformers outputs of ``texts`` encoded by the run's own tokenizer, padded into one batch."""
  tok = Tokenizer.from_str(tok.to_str())
  tok.no_padding()
  tok.no_truncation()
  encs = tok.encode_batch(texts)
  n = max(len(e.ids) for e in encs)
  ids = np.zeros((len(texts), n), np.int32)
  types, mask = np.zeros_like(ids), np.zeros_like(ids)
  for i, e in enumerate(encs):
    ids[i, :len(e.ids)], types[i, :len(e.ids)], mask[i, :len(e.ids)] = e.ids, e.type_ids, 1
  return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))), encs


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _export(src, dst):
  assert cli(["export", str(src), str(dst)]) == 0
  return json.loads((dst / "config.json").read_text())


@pytest.mark.slow
def test_minilm_finetune_exports_to_text_classification_pipeline(tmp_path, minilm_dir):
  wd = tmp_path / "run"
  c = _files_config(tmp_path, steps=8, init_from=str(minilm_dir), model__layout="", optim__lr=3e-4)
  run(c, wd)
  run(_files_config(tmp_path, steps=8, init_from=str(minilm_dir), model__layout="", mode="predict"), wd)
  predicted = [l.split("\t")[1] for l in (wd / "predictions" / "test.tsv").read_text().splitlines()[1:]]

  model = jaxformers.from_pretrained(wd)
  assert isinstance(model, jaxformers.SequenceClassifier) and model.label_names == ("cooking", "sports", "weather")
  logits, _ = _jax_out(model, jaxformers.load_tokenizer(wd), TESTS)
  probs = _softmax(logits)

  dst = tmp_path / "hf"
  hf = _export(wd, dst)
  assert hf["architectures"] == ["BertForSequenceClassification"] and hf["num_hidden_layers"] == 6
  assert hf["id2label"] == {"0": "cooking", "1": "sports", "2": "weather"}
  assert hf["label2id"] == {"cooking": 0, "sports": 1, "weather": 2}
  pipe = transformers.pipeline("text-classification", model=str(dst), device="cpu")
  out = pipe(TESTS)
  assert [o["label"] for o in out] == predicted == [model.label_names[k] for k in probs.argmax(-1)]
  np.testing.assert_allclose([o["score"] for o in out], probs.max(-1), atol=1e-5)   # measured 3e-7
  assert predicted[-3:] == ["cooking", "sports", "weather"]   # it learnt from the named labels


def test_trained_wordpiece_run_exports_with_identical_ids_and_logits(tmp_path):
  wd = tmp_path / "run"
  run(load_config("tiny", "steps=2"), wd)   # the embedded default's kind of run: learnt WordPiece, 9 named classes
  dst = tmp_path / "hf"
  hf = _export(wd / "best", dst)
  assert hf["architectures"] == ["BertForSequenceClassification"]
  assert [hf["id2label"][str(i)] for i in range(len(embedded.PACKAGES))] == list(embedded.PACKAGES)
  assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors", "special_tokens_map.json",
                                                   "tokenizer.json", "tokenizer_config.json", "vocab.txt"]

  run_tok = jaxformers.load_tokenizer(wd)
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(dst))
  assert type(hf_tok).__name__ in ("BertTokenizer", "BertTokenizerFast")
  texts = RAGGED + [r["text_a"] + " " + r["text_b"] for r in embedded.stdlib_docstrings()["validation"][:20]]
  for t in texts:
    assert hf_tok(t)["input_ids"] == run_tok.encode(t).ids, t
  assert "[MASK]" in hf_tok.convert_ids_to_tokens(hf_tok(RAGGED[7])["input_ids"])   # specials match in raw text
  # vocab.txt alone (no tokenizer.json) gives the same tokenizer too
  (dst / "tokenizer.json").unlink()
  slow = transformers.AutoTokenizer.from_pretrained(str(dst))
  assert all(slow(t)["input_ids"] == run_tok.encode(t).ids for t in texts)

  model = jaxformers.from_pretrained(wd)
  assert model.label_names == tuple(embedded.PACKAGES)
  short = RAGGED[:7] + ["def create_task Schedule the execution of a coroutine object"]
  ours, _ = _jax_out(model, run_tok, short)
  pt = transformers.AutoModelForSequenceClassification.from_pretrained(str(dst)).eval()
  with torch.no_grad():
    theirs = pt(**hf_tok(short, padding=True, return_tensors="pt")).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0)   # measured 3e-8
  assert np.abs(ours).max() > 1e-2

  # `jaxformers convert WORKDIR` gives a native directory with the tokenizer and label names; it exports the same,
  # and layout= re-arranges a run exactly as it re-arranges that native checkpoint
  native = tmp_path / "native"
  assert cli(["convert", str(wd), str(native)]) == 0
  assert (native / "tokenizer.json").read_text() == (wd / "tokenizer.json").read_text()
  dst2 = tmp_path / "hf2"
  assert _export(native, dst2) == hf
  for name in ("tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    assert (dst2 / name).read_text() == (dst / name).read_text()
  a, b = (jaxformers.from_pretrained(p, layout="parallel*2") for p in (wd, native))
  assert a.config.layout == "parallel*2" and a.label_names == b.label_names == tuple(embedded.PACKAGES)
  fa, fb = _flat(a), _flat(b)
  assert fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)
  assert isinstance(jaxformers.from_pretrained(wd, task="masked_lm"), jaxformers.MaskedLM)


def test_converted_hf_checkpoint_keeps_its_tokenizer_files(tmp_path, minilm_dir):
  native, dst = tmp_path / "native", tmp_path / "hf"
  assert cli(["convert", str(minilm_dir), str(native), "--task", "classification", "--num-labels", "2"]) == 0
  _export(native, dst)
  for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    assert (dst / name).read_bytes() == (minilm_dir / name).read_bytes(), name
  tok = transformers.AutoTokenizer.from_pretrained(str(dst))
  ref = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
  assert all(tok(t)["input_ids"] == ref(t)["input_ids"] for t in RAGGED)


def test_mlm_run_exports_to_fill_mask_pipeline(tmp_path):
  wd = tmp_path / "run"
  c = _files_config(tmp_path, steps=3, task="mlm", data__label_column="")
  run(c, wd)
  model = jaxformers.from_pretrained(wd)
  assert isinstance(model, jaxformers.MaskedLM)
  dst = tmp_path / "hf"
  hf = _export(wd, dst)
  assert hf["architectures"] == ["BertForMaskedLM"] and "id2label" not in hf
  texts = ["Stir the [MASK] in the pan", "The striker [MASK] twice", "Snow will fall on the [MASK] tonight",
           "[MASK] the bread"]
  tok = jaxformers.load_tokenizer(wd)
  logits, encs = _jax_out(model, tok, texts)
  pipe = transformers.pipeline("fill-mask", model=str(dst), device="cpu")
  for t, lg, e in zip(texts, logits, encs):
    at = e.ids.index(tok.token_to_id("[MASK]"))
    top = pipe(t, top_k=2)
    assert top[0]["token"] == int(lg[at].argmax()), t
    np.testing.assert_allclose([x["score"] for x in top], np.sort(_softmax(lg[at]))[::-1][:2], atol=1e-7)


def test_regression_run_exports_with_problem_type(tmp_path):
  rows = [(t, f"{0.5 * i:.1f}") for i, ts in enumerate(TOPICS.values()) for t in ts]
  train = _write_csv(tmp_path / "train.csv", rows)
  c = load_config("tiny", "steps=2", data__source="files", data__train_file=str(train), data__eval_file=str(train),
                  data__num_labels=1, data__max_length=64, data__batch_size=8, data__eval_batch_size=16)
  wd = tmp_path / "run"
  run(c, wd)
  model = jaxformers.from_pretrained(wd)
  assert model.num_labels == 1 and model.label_names is None
  dst = tmp_path / "hf"
  hf = _export(wd, dst)
  assert hf["problem_type"] == "regression" and hf["architectures"] == ["BertForSequenceClassification"]
  assert hf["id2label"] == {"0": "LABEL_0"}
  ours, _ = _jax_out(model, jaxformers.load_tokenizer(wd), RAGGED[1:6])
  out = transformers.pipeline("text-classification", model=str(dst), device="cpu")(RAGGED[1:6])
  np.testing.assert_allclose([o["score"] for o in out], ours[:, 0], atol=1e-6)   # measured 3e-8
  assert np.ptp(ours[:, 0]) > 1e-4


def test_fourier_run_loads_but_export_refuses(tmp_path, capsys):
  wd = tmp_path / "run"
  run(load_config("tiny", "layout=fourier*2,steps=1"), wd)
  model = jaxformers.from_pretrained(wd)
  assert model.config.layout == "fourier*2" and model.label_names == tuple(embedded.PACKAGES)
  assert cli(["export", str(wd), str(tmp_path / "hf")]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "fourier" in err and "native format" in err and "from_pretrained" in err
  assert not (tmp_path / "hf" / "model.safetensors").exists()
  with pytest.raises(CheckpointError, match="cannot be written as an HF checkpoint"):
    jaxformers.export_hf(model, tmp_path / "hf2")


def _raw_params(step_dir):
  """The parameters of a saved trainer state read with orbax alone, flat by path."""
  import warnings
  import orbax.checkpoint as ocp
  with warnings.catch_warnings(), ocp.PyTreeCheckpointer() as c:
    warnings.simplefilter("ignore", UserWarning)   # orbax notes that it takes the shardings from the file
    state = c.restore(step_dir / "state")
  flat = {}

  def walk(node, prefix):
    if isinstance(node, dict):
      for k, v in node.items():
        walk(v, prefix + (str(k),))
    else:
      flat["/".join(prefix[:-1] if prefix[-1] == "value" else prefix)] = np.asarray(node)   # nnx.Param's value
  walk(state["params"], ())
  return flat


def _flat(model):
  return {"/".join(str(k) for k in path): np.asarray(v) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_run_states_load_exactly_and_start_a_further_run(tmp_path, monkeypatch):
  wd = tmp_path / "run"
  # the best state is the one with the highest validation loss: best/ keeps step 2 while checkpoints/ goes on to 4
  run(load_config("tiny", "steps=4", train__eval_every=2, train__checkpoint_every=2, train__keep=3,
                  train__best_metric="validation/loss", train__best_mode="max"), wd)
  assert [p.name for p in (wd / "best").iterdir() if p.name.isdigit()] == ["2"]
  best, step4 = _raw_params(wd / "best" / "2"), _raw_params(wd / "checkpoints" / "4")
  loaded = _flat(jaxformers.from_pretrained(wd))
  assert loaded.keys() == best.keys() and len(best) > 20
  assert all(np.array_equal(loaded[k], best[k]) for k in best)
  assert not all(np.array_equal(step4[k], best[k]) for k in best)
  monkeypatch.chdir(tmp_path)   # relative paths, as typed on a command line
  by_step = _flat(jaxformers.from_pretrained("run/checkpoints/4"))
  assert all(np.array_equal(by_step[k], step4[k]) for k in step4)
  drops = [m for _, m in nnx.iter_modules(jaxformers.from_pretrained(wd, hidden_dropout=0.5))
           if isinstance(m, nnx.Dropout)]
  assert drops and all(d.deterministic for d in drops)   # handed over in eval mode

  # WORKDIR/best as init_from: the tokenizer resolves to WORKDIR's, the parameters are exactly best/2's (an lr of
  # 1e-30 moves no float32 parameter)
  wd2 = tmp_path / "further"
  run(load_config("tiny", "steps=1", init_from=str(wd / "best"), optim__lr=1e-30), wd2)
  assert (wd2 / "tokenizer.json").read_text() == (wd / "tokenizer.json").read_text()
  further = _raw_params(wd2 / "checkpoints" / "1")
  assert all(np.array_equal(further[k], best[k]) for k in best)

  # a run interrupted before its first evaluation has no best/: the latest saved state loads
  wd3 = tmp_path / "interrupted"
  run(load_config("tiny", "steps=4", train__checkpoint_every=1, train__stop_after=1), wd3)
  assert not any((wd3 / "best").glob("[0-9]*"))
  got = _flat(jaxformers.from_pretrained(wd3))
  raw = _raw_params(wd3 / "checkpoints" / "1")
  assert all(np.array_equal(got[k], raw[k]) for k in raw)


def test_run_directory_bad_input(tmp_path):
  empty = tmp_path / "run"   # a run that has not saved its first state yet
  (empty / "checkpoints").mkdir(parents=True)
  (empty / "metrics.jsonl").write_text("")
  with pytest.raises(CheckpointError, match="no saved state yet"):
    jaxformers.from_pretrained(empty)
  with pytest.raises(CheckpointError, match="no tokenizer found"):
    jaxformers.load_tokenizer(empty)
  assert cli(["export", str(empty), str(tmp_path / "hf")]) == 2
  other = tmp_path / "other"      # a directory that merely has a checkpoints/ folder is not taken for a run
  (other / "checkpoints").mkdir(parents=True)
  with pytest.raises(CheckpointError, match="no config.json"):
    jaxformers.from_pretrained(other)
