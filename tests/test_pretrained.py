"""from_pretrained as a user meets it: eval mode, Hugging Face Hub ids, native checkpoints re-arranged directly."""
from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

import jaxformers
from jaxformers import models
from jaxformers.cli import main
from jaxformers.config import EncoderConfig
from jaxformers.convert import load_hf
from jaxformers.errors import CheckpointError
from jaxformers.params import get_params, set_params
from conftest import MINILM_ID, MINILM_SHA, padded_batch


# --- eval mode ----------------------------------------------------------------------------------------------------
def test_loaded_models_are_deterministic_until_switched_to_train(minilm_dir):
  ids, mask = padded_batch(30522, lengths=(12, 7), first_id=1000)
  model = jaxformers.from_pretrained(minilm_dir)
  a, b = model(ids, mask).last_hidden_state, model(ids, mask).last_hidden_state
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  model.train()
  c, d = model(ids, mask).last_hidden_state, model(ids, mask).last_hidden_state
  valid = mask.astype(bool)
  assert np.abs(np.asarray(c) - np.asarray(d))[valid].max() > 0.1   # dropout 0.1 is active: every call differs
  assert np.abs(np.asarray(c) - np.asarray(a))[valid].max() > 0.1
  model.eval()
  np.testing.assert_array_equal(np.asarray(model(ids, mask).last_hidden_state), np.asarray(a))
  converted, _ = load_hf(minilm_dir)           # the converter's own entry point hands out eval mode too
  np.testing.assert_array_equal(np.asarray(converted(ids, mask).last_hidden_state), np.asarray(a))


def test_trainer_trains_with_dropout_and_evaluates_without_from_a_pretrained_model(hub_cache, tmp_path):
  from jaxformers.train.loop import Run
  from tests.test_train_glue import glue_tiny, write_rte
  c = glue_tiny("rte", write_rte(tmp_path / "RTE"), init_from=MINILM_ID, model__layout="")
  run = Run(c, tmp_path / "run")
  assert run.tok.get_vocab_size() == 30522      # the tokenizer came from the Hub snapshot, not trained
  params, rest = run.init_params()
  ids, mask = padded_batch(30522, lengths=(9, 5), first_id=1000)
  train = nnx.merge(run.gd_train, params, rest)
  assert not np.array_equal(np.asarray(train(ids, mask)), np.asarray(train(ids, mask)))
  evaluate = nnx.merge(run.gd_eval, params, rest)
  np.testing.assert_array_equal(np.asarray(evaluate(ids, mask)), np.asarray(evaluate(ids, mask)))


# --- Hugging Face Hub ids -----------------------------------------------------------------------------------------
def test_hub_id_loads_the_cached_snapshot_bit_for_bit(hub_cache, minilm_dir):
  by_id = jaxformers.from_pretrained(MINILM_ID)
  by_dir = jaxformers.from_pretrained(minilm_dir)
  a, b = get_params(by_id), get_params(by_dir)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  pinned = jaxformers.from_pretrained(MINILM_ID, revision=MINILM_SHA)
  np.testing.assert_array_equal(get_params(pinned)["embeddings.word.embedding"], b["embeddings.word.embedding"])


def test_hub_id_loads_its_tokenizer(hub_cache, minilm_dir):
  from tokenizers import Tokenizer
  from jaxformers.checkpoints.tokenizers import load_tokenizer
  tok, ref = load_tokenizer(MINILM_ID), Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
  assert tok.encode("Hub ids resolve offline").ids == ref.encode("Hub ids resolve offline").ids


def test_absent_hub_id_or_revision_fails_with_one_line(hub_cache, tmp_path, capsys):
  with pytest.raises(CheckpointError) as e:
    jaxformers.from_pretrained("no-such-org/no-such-model")
  msg = str(e.value)
  assert "\n" not in msg and "'no-such-org/no-such-model' is not a local directory and not in the Hugging Face " \
      "cache" in msg and "HF_HUB_OFFLINE=1" in msg
  with pytest.raises(CheckpointError, match="at revision 'v9'"):
    jaxformers.from_pretrained(MINILM_ID, revision="v9")
  with pytest.raises(CheckpointError, match="path/to/nothing: does not exist"):
    jaxformers.from_pretrained("path/to/nothing")
  assert main(["convert", "no-such-model", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "'no-such-model' is not a local directory" in err
  assert not (tmp_path / "out").exists()


def test_cli_converts_a_hub_id_at_a_revision(hub_cache, minilm_dir, tmp_path, capsys):
  assert main(["convert", MINILM_ID, str(tmp_path / "n"), "--revision", MINILM_SHA]) == 0
  assert "loaded 103 parameters" in capsys.readouterr().out   # 6 layers x 16 + 5 embedding + 2 pooler
  a, b = get_params(jaxformers.from_pretrained(tmp_path / "n")), get_params(jaxformers.from_pretrained(minilm_dir))
  for k in b:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_only_model_and_tokenizer_files_are_fetched():
  from huggingface_hub.utils import filter_repo_objects
  from jaxformers.checkpoints.hub import ALLOW_PATTERNS
  repo = ["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json", "vocab.txt", "merges.txt",
          "vocab.json", "tokenizer_config.json", "special_tokens_map.json", "model-00001-of-00002.safetensors",
          "model.safetensors.index.json", "README.md", "tf_model.h5", "flax_model.msgpack", "rust_model.ot",
          "onnx/model.onnx", "openvino/openvino_model.bin", "1_Pooling/config.json", "coreml/model.mlmodel"]
  assert sorted(filter_repo_objects(repo, allow_patterns=ALLOW_PATTERNS)) == sorted(repo[:11])


# --- native checkpoints re-arranged and re-headed directly --------------------------------------------------------
SOURCE_LAYOUT = "fourier,sparse,parallel"
ATT = [f"mixer.{n}.{p}" for n in ("query", "key", "value", "out") for p in ("kernel", "bias")]
MLP = [f"mlp.{n}.{p}" for n in ("up", "down") for p in ("kernel", "bias")]


def ln(name):
  return [f"{name}.scale", f"{name}.bias"]


def moved(target_block, target_names, source_block, source_names):
  """Target path -> the source path it must be copied from (both inside encoder.blocks)."""
  return {f"encoder.blocks.{target_block}.{t}": f"encoder.blocks.{source_block}.{s}"
          for t, s in zip(target_names, source_names, strict=True)}


def fresh(block, names):
  return {f"encoder.blocks.{block}.{n}" for n in names}


@pytest.fixture(scope="module")
def native_mixed(tmp_path_factory):
  """A native masked-LM checkpoint with a Fourier, a sparse and a parallel block, every parameter distinct."""
  cfg = EncoderConfig(vocab_size=50, hidden_size=16, num_heads=2, intermediate_size=24, max_position_embeddings=20,
                      layout=SOURCE_LAYOUT, sparse_window=4)
  model = models.MaskedLM(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  set_params(model, {k: rng.normal(size=v.shape).astype(np.float32) for k, v in get_params(model).items()})
  path = jaxformers.save_pretrained(model, tmp_path_factory.mktemp("native") / "mixed")
  return path, get_params(model)


def _encoder_keys(params, part):
  return {k: k for k in params if k.startswith(f"encoder.{part}.")}


@pytest.mark.parametrize("layout,task,expected,new", [
    # same depth: block i -> block i; Fourier mixing has no attention to give, a parallel block no mixer_norm
    ("serial*3", "classification",
     {**moved(0, ln("mixer_norm") + MLP + ln("mlp_norm"), 0, ln("mixer_norm") + MLP + ln("mlp_norm")),
      **moved(1, ATT + ln("mixer_norm") + MLP + ln("mlp_norm"), 1, ATT + ln("mixer_norm") + MLP + ln("mlp_norm")),
      **moved(2, ATT + MLP + ln("mlp_norm"), 2, ATT + MLP + ln("norm"))},
     fresh(0, ATT) | fresh(2, ln("mixer_norm")) | {"encoder.pooler.dense.kernel", "encoder.pooler.dense.bias",
                                                    "classifier.out.kernel", "classifier.out.bias"}),
    # other depth: k-th token mixer -> k-th block with a mixer (0, 2, 4), k-th feed-forward -> k-th with one (1, 3, 5)
    ("(attention,ffn)*3", "masked_lm",
     {**moved(0, ln("mixer_norm"), 0, ln("mixer_norm")), **moved(2, ATT + ln("mixer_norm"), 1, ATT + ln("mixer_norm")),
      **moved(4, ATT, 2, ATT), **moved(1, MLP + ln("mlp_norm"), 0, MLP + ln("mlp_norm")),
      **moved(3, MLP + ln("mlp_norm"), 1, MLP + ln("mlp_norm")), **moved(5, MLP + ln("mlp_norm"), 2, MLP + ln("norm")),
      **{k: k for k in ("lm_head.transform.kernel", "lm_head.transform.bias", "lm_head.norm.scale", "lm_head.norm.bias",
                        "lm_head.bias")}},
     fresh(0, ATT) | fresh(4, ln("mixer_norm"))),
    # mixers change kind in place: attention weights move into the sparse block, the Fourier block keeps its norm only
    ("parallel,fourier,sparse", "masked_lm",
     {**moved(0, MLP + ln("norm"), 0, MLP + ln("mlp_norm")), **moved(1, ln("mixer_norm") + MLP + ln("mlp_norm"),
                                                                     1, ln("mixer_norm") + MLP + ln("mlp_norm")),
      **moved(2, ATT + MLP + ln("mlp_norm"), 2, ATT + MLP + ln("norm")),
      **{k: k for k in ("lm_head.transform.kernel", "lm_head.transform.bias", "lm_head.norm.scale", "lm_head.norm.bias",
                        "lm_head.bias")}},
     fresh(0, ATT) | fresh(2, ln("mixer_norm"))),
])
def test_native_checkpoint_is_rearranged_and_reheaded_directly(native_mixed, tmp_path, layout, task, expected, new):
  path, src = native_mixed
  model, report = jaxformers.from_pretrained(path, layout=layout, task=task, num_labels=3, return_report=True)
  assert model.config.layout == layout and models.task_of(model) == task
  got = get_params(model)
  expected = {**expected, **_encoder_keys(got, "embeddings")}
  assert set(got) == set(expected) | new, sorted(set(got) ^ (set(expected) | new))
  for target, source in expected.items():
    np.testing.assert_array_equal(got[target], src[source], err_msg=f"{target} <- {source}")
  assert sorted(report.new) == sorted(new)
  assert set(report.loaded) == set(expected) and all(report.loaded[t] == s for t, s in expected.items())
  if task == "classification":
    assert got["classifier.out.kernel"].shape == (16, 3)
  ids, mask = padded_batch(50, lengths=(9, 4))
  out = np.asarray(model(ids, mask))
  np.testing.assert_array_equal(out, np.asarray(model(ids, mask)))   # eval mode
  saved = jaxformers.save_pretrained(model, tmp_path / "re")
  again, again_report = jaxformers.from_pretrained(saved, return_report=True)
  assert again_report is None and again.config == model.config
  back = get_params(again)
  assert back.keys() == got.keys()
  for k in got:
    np.testing.assert_array_equal(back[k], got[k], err_msg=k)
  np.testing.assert_array_equal(np.asarray(again(ids, mask)), out)


def test_native_head_with_other_label_count_is_replaced(native_mixed, tmp_path):
  path, src = native_mixed
  three = jaxformers.from_pretrained(path, task="classification", num_labels=3)
  jaxformers.save_pretrained(three, tmp_path / "three")
  five, report = jaxformers.from_pretrained(tmp_path / "three", num_labels=5, return_report=True)
  assert sorted(report.new) == ["classifier.out.bias", "classifier.out.kernel"]
  assert "encoder.pooler.dense.kernel" in report.loaded      # the pooler is not part of the label-specific head
  assert "3 labels, the new one 5" in report.dropped["classifier.out.kernel"]
  a, b = get_params(three), get_params(five)
  for k in b:
    if not k.startswith("classifier."):
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert b["classifier.out.kernel"].shape == (16, 5)


def test_native_positions_extend_when_rearranged(native_mixed):
  path, src = native_mixed
  model, report = jaxformers.from_pretrained(path, layout="sparse*3", max_position_embeddings=60, return_report=True)
  table = get_params(model)["encoder.embeddings.position.embedding"]
  np.testing.assert_array_equal(table, np.concatenate([src["encoder.embeddings.position.embedding"]] * 3))
  assert any("extended from 20 to 60" in n for n in report.notes)


def test_deeper_layout_initialises_only_the_blocks_no_source_layer_reaches(minilm_dir):
  src = get_params(jaxformers.from_pretrained(minilm_dir))
  model, report = jaxformers.from_pretrained(minilm_dir, layout="fourier*8", return_report=True)
  got = get_params(model)
  extra = {f"blocks.{j}.{n}" for j in (6, 7) for n in ln("mixer_norm") + MLP + ln("mlp_norm")}
  assert set(report.new) == extra
  for k in range(6):   # the k-th feed-forward and post-mixing norm fill block k
    for n in ln("mixer_norm") + MLP + ln("mlp_norm"):
      np.testing.assert_array_equal(got[f"blocks.{k}.{n}"], src[f"blocks.{k}.{n}"])


def test_a_tensor_missing_from_a_layer_is_still_an_error(hf_factory, tmp_path):
  from safetensors.numpy import load_file, save_file
  import shutil
  path, _ = hf_factory("BertForSequenceClassification", "safetensors")
  shutil.copytree(path, tmp_path / "c")
  state = load_file(str(tmp_path / "c" / "model.safetensors"))
  del state["bert.encoder.layer.1.output.dense.weight"]
  save_file(state, str(tmp_path / "c" / "model.safetensors"))
  for layout in (None, "serial*5"):
    with pytest.raises(CheckpointError, match="encoder.blocks.1.mlp.down.kernel: no tensor in the checkpoint fills"):
      jaxformers.from_pretrained(tmp_path / "c", layout=layout)


def test_relaying_out_an_int8_model_is_one_line(tmp_path, capsys):
  """An int8 model given another layout or head used to fail with one 'unknown tensor' line per int8 kernel."""
  from flax import nnx
  from jaxformers.cli import main
  from jaxformers.errors import CheckpointError
  cfg = jaxformers.EncoderConfig(vocab_size=50, hidden_size=16, num_heads=2, intermediate_size=32, layout="serial*2",
                                 max_position_embeddings=16)
  q = jaxformers.quantize(jaxformers.build("classification", cfg, num_labels=3, rngs=nnx.Rngs(0)))
  jaxformers.save_pretrained(q, tmp_path / "q")
  for kw in (dict(layout="parallel*2"), dict(task="base"), dict(num_labels=5)):
    with pytest.raises(CheckpointError, match=r"^[^\n]*: an int8 model cannot be re-laid out or given another head "
                                              r"or config; do that to the float model, then quantize it$"):
      jaxformers.from_pretrained(tmp_path / "q", **kw)
  assert main(["convert", str(tmp_path / "q"), str(tmp_path / "p"), "--layout", "parallel*2"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "an int8 model cannot be re-laid out" in err[0], err
  assert jaxformers.from_pretrained(tmp_path / "q").config.quantization == "int8"     # as saved: loads
