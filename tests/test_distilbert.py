"""DistilBERT as a converter family: parity with transformers' DistilBert* models, export back, unknown families."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import transformers as T
from safetensors.numpy import load_file

import jaxformers
from jaxformers.cli import main
from jaxformers.convert import load_hf
from jaxformers.errors import CheckpointError
from conftest import padded_batch, randomize

TOL = 1e-5   # measured: 3.7e-6 last hidden state; logits 5.5e-6 (MLM), 7.2e-6 (MLM, relu), 2.6e-6 (tokens)
SMALL = dict(vocab_size=100, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=40, dropout=0.0,
             attention_dropout=0.0)
LENGTHS = (13, 6, 9, 1)


def make_distilbert(path, arch: str = "DistilBertModel", seed: int = 0, **overrides):
  cfg = T.DistilBertConfig(**{**SMALL, **overrides})
  cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = randomize(getattr(T, arch)(cfg), seed)
  model.save_pretrained(str(path))
  return model


@pytest.fixture(scope="module")
def distil_factory(tmp_path_factory):
  cache = {}

  def get(arch: str):
    if arch not in cache:
      path = tmp_path_factory.mktemp(arch)
      cache[arch] = (path, make_distilbert(path, arch))
    return cache[arch]
  return get


def torch_run(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)


def max_diff_valid(a, b, mask):
  return float(np.abs(np.asarray(a) - np.asarray(b))[mask.astype(bool)].max())


def test_checkpoint_holds_the_documented_key_names(distil_factory):
  path, _ = distil_factory("DistilBertModel")
  keys = set(load_file(str(path / "model.safetensors")))
  layer = {f"transformer.layer.0.{n}.{p}" for n in ("attention.q_lin", "attention.k_lin", "attention.v_lin",
                                                    "attention.out_lin", "sa_layer_norm", "ffn.lin1", "ffn.lin2",
                                                    "output_layer_norm") for p in ("weight", "bias")}
  assert layer <= keys
  assert {"embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
          "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"} <= keys
  assert not any("token_type" in k for k in keys)
  hf = json.loads((path / "config.json").read_text())
  assert hf["model_type"] == "distilbert" and (hf["dim"], hf["n_layers"], hf["n_heads"]) == (64, 2, 4)


def test_base_model_matches_pytorch_on_a_ragged_batch(distil_factory, tmp_path, capsys):
  path, ref_model = distil_factory("DistilBertModel")
  model, report = jaxformers.from_pretrained(path, return_report=True)
  assert model.config.family == "distilbert" and model.config.type_vocab_size == 0
  assert model.embeddings.token_type is None and model.pooler is None
  assert not report.new and not report.dropped
  ids, mask = padded_batch(100, lengths=LENGTHS)
  want = torch_run(ref_model, ids, mask).last_hidden_state.numpy()
  assert max_diff_valid(model(ids, mask).last_hidden_state, want, mask) <= TOL
  assert main(["convert", str(path), str(tmp_path / "native")]) == 0          # the CLI: HF -> native
  capsys.readouterr()
  native = jaxformers.from_pretrained(tmp_path / "native")
  assert max_diff_valid(native(ids, mask).last_hidden_state, want, mask) <= TOL


@pytest.mark.parametrize("arch", ["DistilBertForMaskedLM", "DistilBertForTokenClassification"])
def test_head_models_match_pytorch(distil_factory, arch):
  path, ref_model = distil_factory(arch)
  model, report = load_hf(path)
  assert not report.new
  ids, mask = padded_batch(100, lengths=LENGTHS)
  ref = torch_run(ref_model, ids, mask)
  assert max_diff_valid(model.encoder(ids, mask).last_hidden_state, ref.hidden_states[-1].numpy(), mask) <= TOL
  assert max_diff_valid(model(ids, mask), ref.logits.numpy(), mask) <= TOL


def test_relu_activation_reaches_the_model(tmp_path):
  ref_model = make_distilbert(tmp_path, "DistilBertForMaskedLM", seed=3, activation="relu")
  model, _ = load_hf(tmp_path)
  assert model.config.hidden_act == "relu"
  ids, mask = padded_batch(100, lengths=LENGTHS, seed=1)
  assert max_diff_valid(model(ids, mask), torch_run(ref_model, ids, mask).logits.numpy(), mask) <= TOL


@pytest.mark.parametrize("arch", ["DistilBertModel", "DistilBertForMaskedLM", "DistilBertForTokenClassification"])
def test_export_reproduces_every_tensor_and_transformers_loads_it(distil_factory, tmp_path, arch):
  path, ref_model = distil_factory(arch)
  jaxformers.save_pretrained(jaxformers.from_pretrained(path), tmp_path / "native")
  jaxformers.export_hf(jaxformers.from_pretrained(tmp_path / "native"), tmp_path / "hf")
  src, back = load_file(str(path / "model.safetensors")), load_file(str(tmp_path / "hf" / "model.safetensors"))
  assert set(src) == set(back)
  for k in src:
    np.testing.assert_array_equal(src[k], back[k], err_msg=k)
  hf = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert hf["model_type"] == "distilbert" and hf["architectures"] == [arch]
  assert {k: hf[k] for k in ("dim", "n_layers", "n_heads", "hidden_dim", "activation", "max_position_embeddings")} \
      == {"dim": 64, "n_layers": 2, "n_heads": 4, "hidden_dim": 128, "activation": "gelu", "max_position_embeddings": 40}
  again = getattr(T, arch).from_pretrained(str(tmp_path / "hf"), attn_implementation="eager").eval()
  ids, mask = padded_batch(100, lengths=LENGTHS)
  a, b = torch_run(ref_model, ids, mask), torch_run(again, ids, mask)
  np.testing.assert_array_equal(a.hidden_states[-1].numpy(), b.hidden_states[-1].numpy())
  if arch != "DistilBertModel":
    np.testing.assert_array_equal(a.logits.numpy(), b.logits.numpy())


def test_rearranged_into_parallel_blocks_drops_the_attention_norm(distil_factory):
  path, _ = distil_factory("DistilBertModel")
  model, report = jaxformers.from_pretrained(path, layout="parallel*2", return_report=True)
  assert sorted(report.dropped) == [f"transformer.layer.{i}.sa_layer_norm.{p}" for i in (0, 1) for p in ("bias", "weight")]
  assert not report.new
  with pytest.raises(CheckpointError, match="family 'distilbert' has no HF checkpoint form with parallel layers"):
    jaxformers.export_hf(model, "unused")


def test_sequence_classification_is_refused_with_the_supported_architectures(tmp_path):
  make_distilbert(tmp_path, "DistilBertForSequenceClassification")
  with pytest.raises(CheckpointError) as e:
    jaxformers.from_pretrained(tmp_path)
  assert str(e.value) == (f"{tmp_path}: architecture 'DistilBertForSequenceClassification' is not supported; "
                          f"expected one of DistilBertModel, DistilBertForMaskedLM, DistilBertForTokenClassification")


def test_unknown_family_fails_with_one_line_naming_the_key_and_the_accepted_families(distil_factory, tmp_path, capsys):
  src, _ = distil_factory("DistilBertModel")
  d = tmp_path / "ckpt"
  shutil.copytree(src, d)
  hf = json.loads((d / "config.json").read_text())
  hf["model_type"] = "xlnet"
  (d / "config.json").write_text(json.dumps(hf))
  with pytest.raises(CheckpointError) as e:
    jaxformers.from_pretrained(d)
  msg = str(e.value)
  assert "\n" not in msg
  assert msg == (f"{d}: config.json key model_type='xlnet' names no registered converter family; accepted: "
                 f"bert (model_type 'bert'), distilbert (model_type 'distilbert'), paf (model_type 'roberta' with an "
                 f"all-parallel layout), paf_bert (model_type 'bert' with an all-parallel layout), roberta "
                 f"(model_type 'roberta')")
  assert main(["convert", str(d), str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "model_type='xlnet'" in err and "distilbert (model_type 'distilbert')" in err
  assert not (tmp_path / "out").exists()


def test_wrong_family_for_the_config_names_the_missing_keys(distil_factory, tmp_path):
  """A DistilBERT config labelled ``bert`` is read by BERT's mapping, which names the keys it lacks."""
  src, _ = distil_factory("DistilBertModel")
  d = tmp_path / "ckpt"
  shutil.copytree(src, d)
  hf = json.loads((d / "config.json").read_text())
  hf["model_type"], hf["architectures"] = "bert", ["BertModel"]
  (d / "config.json").write_text(json.dumps(hf))
  with pytest.raises(CheckpointError) as e:
    jaxformers.from_pretrained(d)
  assert str(e.value) == (f"{d}: config.json lacks hidden_size, num_hidden_layers, num_attention_heads, "
                          f"intermediate_size")


def test_encoder_config_names_the_accepted_families():
  with pytest.raises(ValueError) as e:
    jaxformers.EncoderConfig(family="xlnet")
  assert str(e.value) == "EncoderConfig.family='xlnet': expected one of bert, distilbert, roberta"
