"""PyTorch parity, round trips and re-arrangement of HF BERT / RoBERTa / PAF checkpoints."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as T
from safetensors.numpy import load_file

import jaxformers
from jaxformers.convert import load_hf
from jaxformers.params import get_params
from conftest import make_hf, padded_batch

TOL = 1e-5   # measured: at most 3.5e-6 (RoBERTa MLM logits), 2.7e-6 on the real MiniLM weights


def torch_outputs(model, ids, mask, token_types=None):
  with torch.no_grad():
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    if token_types is not None:
      kw["token_type_ids"] = torch.tensor(token_types)
    return model(**kw)


def max_diff_valid(a, b, mask):
  return float(np.abs(np.asarray(a) - np.asarray(b))[mask.astype(bool)].max())


def test_minilm_real_weights_match_pytorch(minilm_dir):
  model = jaxformers.from_pretrained(minilm_dir)
  ref_model = T.BertModel.from_pretrained(str(minilm_dir), attn_implementation="sdpa").eval()
  ids, mask = padded_batch(30522, lengths=(23, 9, 16, 4), first_id=1000)
  ref = torch_outputs(ref_model, ids, mask)
  out = model(ids, mask)
  assert max_diff_valid(out.last_hidden_state, ref.last_hidden_state.numpy(), mask) <= TOL
  np.testing.assert_allclose(np.asarray(out.pooler_output), ref.pooler_output.numpy(), atol=TOL)


CASES = [
    ("BertForPreTraining", "safetensors"), ("BertForPreTraining", "bin"),
    ("BertForSequenceClassification", "safetensors"), ("BertForSequenceClassification", "bin"),
    ("RobertaForMaskedLM", "safetensors"), ("RobertaForMaskedLM", "bin"),
    ("RobertaForSequenceClassification", "safetensors"), ("RobertaForSequenceClassification", "bin"),
    ("BertForTokenClassification", "safetensors"), ("RobertaModel", "safetensors"),
]


@pytest.mark.parametrize("arch,fmt", CASES)
def test_random_checkpoints_match_pytorch(hf_factory, arch, fmt):
  path, ref_model = hf_factory(arch, fmt)
  model, report = load_hf(path)
  pad = ref_model.config.pad_token_id
  ids, mask = padded_batch(120, lengths=(13, 6, 9), pad_id=pad)
  types = np.zeros_like(ids)
  types[:, 4:] = 1 if arch.startswith("Bert") else 0
  ref = torch_outputs(ref_model, ids, mask, types)
  encoder = model if isinstance(model, jaxformers.Encoder) else model.encoder
  hidden = encoder(ids, mask, types).last_hidden_state
  assert max_diff_valid(hidden, ref.hidden_states[-1].numpy(), mask) <= TOL
  if arch.endswith("Model"):
    return
  logits = model(ids, mask, types)
  if arch == "BertForPreTraining":
    mlm, nsp = logits
    assert max_diff_valid(mlm, ref.prediction_logits.numpy(), mask) <= TOL
    np.testing.assert_allclose(np.asarray(nsp), ref.seq_relationship_logits.numpy(), atol=TOL)
  elif arch.endswith("SequenceClassification"):
    np.testing.assert_allclose(np.asarray(logits), ref.logits.numpy(), atol=TOL)
  else:
    assert max_diff_valid(logits, ref.logits.numpy(), mask) <= TOL
  assert not report.new, report.new


class PafLayerReference(torch.nn.Module):
  """PAF-RoBERTa written from the published formula over HF RoBERTa parameter names:
  ``y = LN_out(x + Drop(W_o MHA(x) + b_o) + Drop(W_2 gelu(W_1 x + b_1) + b_2))``."""

  def __init__(self, state: dict, cfg):
    super().__init__()
    self.s, self.cfg = state, cfg

  def lin(self, name, x):
    return x @ self.s[name + ".weight"].T + self.s[name + ".bias"]

  def ln(self, name, x):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], self.s[name + ".weight"], self.s[name + ".bias"],
                                          self.cfg.layer_norm_eps)

  def forward(self, ids, mask):
    s, cfg, p = self.s, self.cfg, "roberta."
    pos = torch.cumsum(mask, 1) * mask + cfg.pad_token_id
    x = s[p + "embeddings.word_embeddings.weight"][ids] + s[p + "embeddings.position_embeddings.weight"][pos]
    x = x + s[p + "embeddings.token_type_embeddings.weight"][torch.zeros_like(ids)]
    x = self.ln(p + "embeddings.LayerNorm", x)
    b, l, d = x.shape
    nh = cfg.num_attention_heads
    bias = (1.0 - mask[:, None, None, :].float()) * -1e9
    for i in range(cfg.num_hidden_layers):
      q_ = f"{p}encoder.layer.{i}."
      heads = lambda t: t.view(b, l, nh, d // nh).transpose(1, 2)
      q, k, v = (heads(self.lin(q_ + f"attention.self.{n}", x)) for n in ("query", "key", "value"))
      att = torch.softmax(q @ k.transpose(-1, -2) / (d // nh) ** 0.5 + bias, -1) @ v
      att = self.lin(q_ + "attention.output.dense", att.transpose(1, 2).reshape(b, l, d))
      ffn = self.lin(q_ + "output.dense", torch.nn.functional.gelu(self.lin(q_ + "intermediate.dense", x)))
      x = self.ln(q_ + "output.LayerNorm", x + att + ffn)
    h = self.ln("lm_head.layer_norm", torch.nn.functional.gelu(self.lin("lm_head.dense", x)))
    return x, h @ s[p + "embeddings.word_embeddings.weight"].T + s["lm_head.bias"]


def test_paf_checkpoint_matches_reference(hf_factory):
  path, hf_model = hf_factory("RobertaForMaskedLM", "safetensors")
  state = {k: torch.tensor(v) for k, v in load_file(str(path / "model.safetensors")).items()}
  ref = PafLayerReference(state, hf_model.config)
  model, report = load_hf(path, layout="parallel*3")
  assert all("attention.output.LayerNorm" in k for k in report.dropped), report.dropped
  assert len(report.dropped) == 2 * 3 and not report.new
  ids, mask = padded_batch(120, lengths=(12, 5), pad_id=1)
  with torch.no_grad():
    ref_hidden, ref_logits = ref(torch.tensor(ids), torch.tensor(mask))
  hidden = model.encoder(ids, mask).last_hidden_state
  assert max_diff_valid(hidden, ref_hidden.numpy(), mask) <= TOL
  assert max_diff_valid(model(ids, mask), ref_logits.numpy(), mask) <= TOL


def test_twelve_labels_keep_their_numeric_order_through_conversion_export_and_reload(tmp_path):
  """Twelve classes named "0".."11": transformers writes id2label with sorted keys ("0", "1", "10", "11", "2", ...),
  and a string sort of ids or names puts "10" before "2". Conversion, the native checkpoint and the HF export keep
  class k at logit k with name str(k), as transformers reads them."""
  import json
  names = [str(i) for i in range(12)]
  make_hf(tmp_path / "hf", "BertForSequenceClassification", num_labels=12)
  cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
  cfg["id2label"] = {str(i): n for i, n in enumerate(names)}
  cfg["label2id"] = {n: i for i, n in enumerate(names)}
  (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
  assert list(json.loads((tmp_path / "hf" / "config.json").read_text())["id2label"])[2] == "10"
  ref_model = T.BertForSequenceClassification.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
  assert [ref_model.config.id2label[i] for i in range(12)] == names
  ids, mask = padded_batch(120, lengths=(9, 5, 7))
  want = torch_outputs(ref_model, ids, mask).logits.numpy()
  assert want.shape == (3, 12)

  def check(model, where):
    assert model.label_names == tuple(names), where
    got = np.asarray(model(ids, mask))
    np.testing.assert_allclose(got, want, atol=TOL, err_msg=where)   # class k is logit k
  m = jaxformers.from_pretrained(tmp_path / "hf")
  check(m, "converted")
  jaxformers.save_pretrained(m, tmp_path / "native")
  check(jaxformers.from_pretrained(tmp_path / "native"), "native")
  jaxformers.export_hf(jaxformers.from_pretrained(tmp_path / "native"), tmp_path / "export")
  exported = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "export", attn_implementation="eager")
  assert [exported.config.id2label[i] for i in range(12)] == names
  assert all(exported.config.label2id[n] == i for i, n in enumerate(names))
  np.testing.assert_allclose(torch_outputs(exported.eval(), ids, mask).logits.numpy(), want, atol=TOL)
  check(jaxformers.from_pretrained(tmp_path / "export"), "re-imported export")


@pytest.mark.parametrize("arch", ["BertForPreTraining", "RobertaForSequenceClassification", "BertForTokenClassification"])
def test_round_trip_reproduces_every_tensor(hf_factory, tmp_path, arch):
  path, ref_model = hf_factory(arch, "safetensors")
  model = jaxformers.from_pretrained(path)
  jaxformers.save_pretrained(model, tmp_path / "native")
  reloaded = jaxformers.from_pretrained(tmp_path / "native")
  jaxformers.export_hf(reloaded, tmp_path / "hf")
  src, back = load_file(str(path / "model.safetensors")), load_file(str(tmp_path / "hf" / "model.safetensors"))
  assert set(src) == set(back)
  for k in src:
    np.testing.assert_array_equal(src[k], back[k], err_msg=k)
  again = getattr(T, arch).from_pretrained(str(tmp_path / "hf"), attn_implementation="eager").eval()
  ids, mask = padded_batch(120, pad_id=ref_model.config.pad_token_id)
  a, b = torch_outputs(ref_model, ids, mask), torch_outputs(again, ids, mask)
  np.testing.assert_array_equal(a.hidden_states[-1].numpy(), b.hidden_states[-1].numpy())


def test_parallel_export_uses_paf_key_layout(hf_factory, tmp_path):
  path, _ = hf_factory("RobertaForMaskedLM", "safetensors")
  model = jaxformers.from_pretrained(path, layout="parallel*3")
  jaxformers.export_hf(model, tmp_path / "paf")
  back = load_file(str(tmp_path / "paf" / "model.safetensors"))
  src = load_file(str(path / "model.safetensors"))
  assert set(back) == set(src)
  for k in src:
    if "attention.output.LayerNorm" not in k:
      np.testing.assert_array_equal(src[k], back[k], err_msg=k)
  np.testing.assert_array_equal(back["roberta.encoder.layer.0.attention.output.LayerNorm.weight"], 1.0)
  again = jaxformers.from_pretrained(tmp_path / "paf")
  assert again.config.layout == "parallel*3"
  ids, mask = padded_batch(120, pad_id=1)
  np.testing.assert_array_equal(np.asarray(model(ids, mask)), np.asarray(again(ids, mask)))


# where each jaxformers parameter of a re-arranged BertForSequenceClassification comes from (written from the README's
# rules, independently of the converter's tables): per-block sublayer -> HF sublayer, and leaf -> HF tensor
_SUBLAYER = {"mixer.query": "attention.self.query", "mixer.key": "attention.self.key",
             "mixer.value": "attention.self.value", "mixer.out": "attention.output.dense",
             "mixer_norm": "attention.output.LayerNorm", "mlp.up": "intermediate.dense", "mlp.down": "output.dense",
             "mlp_norm": "output.LayerNorm", "norm": "output.LayerNorm"}
_GLOBAL = {"encoder.embeddings.word": "bert.embeddings.word_embeddings",
           "encoder.embeddings.position": "bert.embeddings.position_embeddings",
           "encoder.embeddings.token_type": "bert.embeddings.token_type_embeddings",
           "encoder.embeddings.norm": "bert.embeddings.LayerNorm", "encoder.pooler.dense": "bert.pooler.dense",
           "classifier.out": "classifier"}


def expected_source_tensor(path: str, blocks: tuple, source: dict) -> np.ndarray:
  module, leaf = path.rsplit(".", 1)
  if module.startswith("encoder.blocks."):
    j, sub = module[len("encoder.blocks."):].split(".", 1)
    mixer = sub.startswith("mixer")
    if len(blocks) == 3:                    # same depth: layer j -> block j
      layer = int(j)
    else:                                   # k-th attention / feed-forward -> k-th block that has one
      has = [b for b in range(len(blocks)) if (blocks[b] != "ffn" if mixer else blocks[b] != "attention")]
      layer = has.index(int(j))
    hf = f"bert.encoder.layer.{layer}.{_SUBLAYER[sub]}"
  else:
    hf = _GLOBAL[module]
  if leaf == "kernel":
    return source[hf + ".weight"].T
  return source[hf + (".bias" if leaf == "bias" else ".weight")]


@pytest.mark.parametrize("layout,reused_attention", [
    ("parallel*3", [0, 1, 2]), ("parallel_preln*3", [0, 1, 2]), ("fourier*3", []),
    ("fourier*2,serial", [2]), ("serial*2,ffn", [0, 1]), ("serial_preln*3", [0, 1, 2]),
    ("(attention,ffn)*3", [0, 2, 4]),
])
def test_rearranged_models_reuse_source_weights(hf_factory, layout, reused_attention):
  path, _ = hf_factory("BertForSequenceClassification", "safetensors")
  model, report = jaxformers.from_pretrained(path, layout=layout, return_report=True)
  ids, mask = padded_batch(120)
  logits = np.asarray(model(ids, mask))
  assert logits.shape == (3, 3) and np.isfinite(logits).all()
  tp = get_params(model)
  attn_blocks = [j for j in range(model.config.num_layers) if f"encoder.blocks.{j}.mixer.query.kernel" in tp]
  assert attn_blocks == reused_attention
  source = load_file(str(path / "model.safetensors"))
  for k in tp:
    if k in report.new:
      continue
    np.testing.assert_array_equal(tp[k], expected_source_tensor(k, model.config.blocks, source), err_msg=k)
  assert set(report.new) == ({"encoder.final_norm.scale", "encoder.final_norm.bias"} if "preln" in layout else set())
  n_dropped_attention = sum(1 for k in report.dropped if ".attention.self.query.weight" in k)
  assert n_dropped_attention == 3 - len(reused_attention)
  if "preln" in layout:
    assert "encoder.final_norm.scale" in report.new


def test_native_checkpoint_can_be_rearranged(hf_factory, tmp_path):
  path, _ = hf_factory("BertForSequenceClassification", "safetensors")
  jaxformers.save_pretrained(jaxformers.from_pretrained(path), tmp_path / "n")
  model = jaxformers.from_pretrained(tmp_path / "n", layout="fourier*3")
  assert model.config.layout == "fourier*3"
  np.testing.assert_array_equal(get_params(model)["encoder.blocks.1.mlp.down.kernel"],
                                get_params(jaxformers.from_pretrained(path))["encoder.blocks.1.mlp.down.kernel"])


def test_base_checkpoint_gets_new_head_reported(hf_factory):
  path, _ = hf_factory("RobertaModel", "safetensors")
  model, report = jaxformers.from_pretrained(path, task="classification", num_labels=5, return_report=True)
  assert sorted(report.new) == ["classifier.dense.bias", "classifier.dense.kernel", "classifier.out.bias",
                                "classifier.out.kernel"]
  assert "pooler.dense.weight" in report.ignored


NON_DEFAULT = [("BertForSequenceClassification", dict(layer_norm_eps=0.05, hidden_act="gelu_new", type_vocab_size=3)),
               ("RobertaForMaskedLM", dict(layer_norm_eps=0.05, hidden_act="relu", type_vocab_size=3))]


@pytest.mark.parametrize("arch,overrides", NON_DEFAULT)
def test_non_default_config_values_are_mapped(tmp_path, arch, overrides):
  """layer_norm_eps far from 1e-12, another activation and a third token type must reach the model."""
  ref_model = make_hf(tmp_path, arch, **overrides)
  model, report = load_hf(tmp_path)
  model.eval()
  cfg = model.config
  assert (cfg.layer_norm_eps, cfg.type_vocab_size) == (0.05, 3) and not report.new
  assert cfg.hidden_act == {"gelu_new": "gelu_tanh", "relu": "relu"}[overrides["hidden_act"]]
  ids, mask = padded_batch(120, lengths=(13, 6, 9), pad_id=ref_model.config.pad_token_id)
  types = np.zeros_like(ids)
  types[:, 4:], types[:, 8:] = 1, 2
  ref = torch_outputs(ref_model, ids, mask, types)
  assert max_diff_valid(model.encoder(ids, mask, types).last_hidden_state, ref.hidden_states[-1].numpy(), mask) <= TOL
  logits = np.asarray(model(ids, mask, types))
  if arch.endswith("SequenceClassification"):
    np.testing.assert_allclose(logits, ref.logits.numpy(), atol=TOL, rtol=0)
  else:
    assert max_diff_valid(logits, ref.logits.numpy(), mask) <= TOL


def test_roberta_base_model_pooler_and_nothing_new(hf_factory):
  path, ref_model = hf_factory("RobertaModel", "safetensors")
  model, report = load_hf(path)
  assert not report.new and model.config.use_pooler
  ids, mask = padded_batch(120, lengths=(13, 6, 9), pad_id=1)
  ref = torch_outputs(ref_model, ids, mask)
  model.eval()
  out = model(ids, mask)
  np.testing.assert_allclose(np.asarray(out.pooler_output), ref.pooler_output.numpy(), atol=TOL, rtol=0)
  assert max_diff_valid(out.last_hidden_state, ref.last_hidden_state.numpy(), mask) <= TOL


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sharded_checkpoint_loads_like_the_single_file(hf_factory, tmp_path, fmt):
  """transformers' save_pretrained(max_shard_size=...) writes several safetensors files and an ``*.index.json``;
  transformers 5 no longer writes .bin shards, so those are written here in the layout older versions used
  (``pytorch_model-0000k-of-0000n.bin`` + ``pytorch_model.bin.index.json`` with a ``weight_map``)."""
  import json
  path, ref_model = hf_factory("BertForPreTraining", "safetensors")
  ref_model.save_pretrained(str(tmp_path), max_shard_size="40KB")
  if fmt == "bin":
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    bin_map = {}
    for shard in sorted(set(weight_map.values())):
      name = shard.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
      torch.save({k: torch.tensor(v) for k, v in load_file(str(tmp_path / shard)).items()}, tmp_path / name)
      (tmp_path / shard).unlink()
      bin_map.update({k: name for k, f in weight_map.items() if f == shard})
    (tmp_path / "model.safetensors.index.json").unlink()
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": bin_map}))
  index = tmp_path / ("model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json")
  shards = sorted(tmp_path.glob("model-*.safetensors" if fmt == "safetensors" else "pytorch_model-*.bin"))
  assert index.is_file() and len(shards) >= 3, shards
  sharded, single = get_params(load_hf(tmp_path)[0]), get_params(load_hf(path)[0])
  assert sorted(sharded) == sorted(single)
  for k in single:
    np.testing.assert_array_equal(sharded[k], single[k], err_msg=k)
