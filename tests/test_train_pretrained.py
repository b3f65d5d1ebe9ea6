"""Fine-tuning starts from a native jaxformers checkpoint or an HF PyTorch checkpoint (from_pretrained)."""
import json

import pytest
from flax import nnx

import jaxformers
from jaxformers import models
from jaxformers.config import EncoderConfig
from jaxformers.data import tokenize
from jaxformers.train import run
from tests.test_train_glue import glue_tiny, write_rte


def _tokenizer_for(data, out_dir):
  texts = [l.split("\t")[1] for l in (data / "train.tsv").read_text().splitlines()[1:]]
  tok = tokenize.train_wordpiece(texts, 120)
  tok.save(str(out_dir / "tokenizer.json"))
  return tok.get_vocab_size()


def test_finetune_from_native_checkpoint_in_another_layout(tmp_path):
  data = write_rte(tmp_path / "RTE")
  ckpt = tmp_path / "native"
  ckpt.mkdir()
  vocab = _tokenizer_for(data, ckpt)
  cfg = EncoderConfig(vocab_size=vocab, hidden_size=32, num_heads=2, intermediate_size=64,
                      max_position_embeddings=64, layout="serial*2")
  # ckpt already holds the tokenizer: overwrite=True adds the model next to it
  jaxformers.save_pretrained(models.MaskedLM(cfg, rngs=nnx.Rngs(params=3, dropout=4)), ckpt, overwrite=True)
  wd = tmp_path / "run"
  out = run(glue_tiny("rte", data, init_from=str(ckpt), model__layout="parallel*2"), wd)
  assert out["steps"] == 6
  meta_dirs = sorted((wd / "checkpoints").iterdir())
  meta = json.loads((meta_dirs[-1] / "meta" / "metadata").read_text())
  assert meta["model_config"]["layout"] == "parallel*2" and meta["model_config"]["hidden_size"] == 32


@pytest.mark.torch
def test_finetune_from_hf_pytorch_checkpoint(tmp_path):
  torch = pytest.importorskip("torch")
  from transformers import BertConfig, BertForMaskedLM
  data = write_rte(tmp_path / "RTE")
  ckpt = tmp_path / "hf"
  ckpt.mkdir()
  vocab = _tokenizer_for(data, ckpt)
  torch.manual_seed(0)
  hf = BertForMaskedLM(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64))
  hf.save_pretrained(ckpt)
  out = run(glue_tiny("rte", data, init_from=str(ckpt), model__layout=""), tmp_path / "run")
  assert out["steps"] == 6 and out["num_params"] > 30 * 32
  assert 0.0 <= out["eval"]["validation/accuracy"] <= 1.0
