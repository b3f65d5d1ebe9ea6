"""Fine-tuning starts from a native jaxformers checkpoint or an HF PyTorch checkpoint (from_pretrained).

With one warm-up step the first update has learning rate 0, so the checkpoint saved at step 1 holds the initial
parameters exactly: every one the source checkpoint provides must equal the converted source's.
"""
import json

import numpy as np
import pytest
from flax import nnx

import jaxformers
from jaxformers import models
from jaxformers.checkpoints.tokenizers import has_tokenizer
from jaxformers.config import EncoderConfig
from jaxformers.data import tokenize
from jaxformers.params import get_params
from jaxformers.train import run
from tests.test_train_glue import glue_tiny, write_rte
from tests.train_helpers import checkpoint_params


def _tokenizer_for(data, out_dir):
  texts = [l.split("\t")[1] for l in (data / "train.tsv").read_text().splitlines()[1:]]
  tok = tokenize.train_wordpiece(texts, 120)
  tok.save(str(out_dir / "tokenizer.json"))
  return tok.get_vocab_size()


FROM_STEP_ONE = dict(optim__warmup_steps=1, train__checkpoint_every=1, train__keep=10)


def assert_starts_from(wd, source, layout, steps=6):
  """Step 1's checkpoint equals the source converted into ``layout`` (except parameters the source lacks), and
  training then moved the parameters."""
  want = get_params(jaxformers.from_pretrained(source, layout=layout, task="classification", num_labels=2))
  first, last = checkpoint_params(wd, 1), checkpoint_params(wd, steps)
  assert sorted(first) == sorted(want)
  reused = [k for k in want if not k.startswith(("classifier.", "encoder.pooler."))]   # the rest is new
  assert len(reused) > 20
  for k in reused:
    np.testing.assert_array_equal(first[k], want[k], err_msg=k)
  assert all(np.abs(last[k] - first[k]).max() > 0 for k in reused if k.endswith("kernel"))


def test_finetune_from_native_checkpoint_in_another_layout(tmp_path):
  data, ckpt = _native_checkpoint(tmp_path)
  wd = tmp_path / "run"
  out = run(glue_tiny("rte", data, init_from=str(ckpt), model__layout="parallel*2", **FROM_STEP_ONE), wd)
  assert out["steps"] == 6
  assert_starts_from(wd, ckpt, "parallel*2")
  source = get_params(jaxformers.from_pretrained(ckpt))         # the serial MaskedLM as saved
  first = checkpoint_params(wd, 1)
  for k, v in source.items():
    if k.startswith("encoder.") and "mixer_norm" not in k:      # parallel blocks: one norm, the serial mlp_norm
      np.testing.assert_array_equal(first[k.replace("mlp_norm", "norm")], v, err_msg=k)
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
  out = run(glue_tiny("rte", data, init_from=str(ckpt), model__layout="", **FROM_STEP_ONE), tmp_path / "run")
  assert out["steps"] == 6 and out["num_params"] > 30 * 32
  assert_starts_from(tmp_path / "run", ckpt, None)


def test_init_from_without_a_tokenizer_is_refused_not_given_a_new_vocabulary(tmp_path):
  """A checkpoint saved without tokenizer files: training a fresh WordPiece would feed its embeddings ids from
  another vocabulary; the run stops before writing anything and names init_from and data.tokenizer."""
  from jaxformers.errors import ConfigError
  data = write_rte(tmp_path / "RTE")
  ckpt = tmp_path / "native"
  cfg = EncoderConfig(vocab_size=120, hidden_size=16, num_heads=2, intermediate_size=32, layout="serial*1",
                      max_position_embeddings=64)
  jaxformers.save_pretrained(models.SequenceClassifier(cfg, num_labels=2, rngs=nnx.Rngs(0)), ckpt)
  assert not has_tokenizer(ckpt)
  with pytest.raises(ConfigError, match=r"config.init_from=.*native: no tokenizer there.*config.data.tokenizer"):
    run(glue_tiny("rte", data, init_from=str(ckpt), model__layout=""), tmp_path / "run")
  assert not (tmp_path / "run").exists()
  vocab = _tokenizer_for(data, tmp_path)   # the same run with the tokenizer named trains
  assert vocab <= 120
  out = run(glue_tiny("rte", data, init_from=str(ckpt), model__layout="", data__tokenizer=str(tmp_path / "tokenizer.json"),
                      train__num_steps=2), tmp_path / "run")
  assert out["steps"] == 2


def _native_checkpoint(tmp_path):
  data = write_rte(tmp_path / "RTE")
  ckpt = tmp_path / "native"
  ckpt.mkdir()
  vocab = _tokenizer_for(data, ckpt)
  cfg = EncoderConfig(vocab_size=vocab, hidden_size=32, num_heads=2, intermediate_size=64,
                      max_position_embeddings=64, layout="serial*2")
  # ckpt already holds the tokenizer: overwrite=True adds the model next to it
  jaxformers.save_pretrained(models.MaskedLM(cfg, rngs=nnx.Rngs(params=3, dropout=4)), ckpt, overwrite=True)
  return data, ckpt


def test_init_from_refuses_an_architecture_override_it_would_drop(tmp_path, capsys):
  """--config.model.intermediate_size=96 with a checkpoint of width 64: the checkpoint's width would win without a
  word; the run stops before writing anything, naming the field, both values and what to do."""
  from jaxformers.train.cli import main
  data, ckpt = _native_checkpoint(tmp_path)
  wd = tmp_path / "run"
  c = glue_tiny("rte", data, init_from=str(ckpt), model__layout="", model__intermediate_size=96)
  assert main(c, str(wd), ["train.py", "--config.model.intermediate_size=96", f"--workdir={wd}"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  assert err[0].startswith(f"train.py: error: --config.model.intermediate_size=96 is not what config.init_from={ckpt} "
                           f"has (intermediate_size=64) and the checkpoint fixes it: drop the override")
  assert "config.model.layout re-arranges its blocks" in err[0]
  assert not wd.exists()


def test_init_from_applies_runtime_overrides_and_the_checkpoints_own_values(tmp_path):
  """Runtime fields given on the command line apply; an architecture field given with the checkpoint's own value
  and a layout (a re-arrangement) are no conflict; the config file's model sizes give way to the checkpoint's."""
  from jaxformers.train.loop import Run
  data, ckpt = _native_checkpoint(tmp_path)
  c = glue_tiny("rte", data, init_from=str(ckpt), model__layout="parallel*2", model__hidden_dropout=0.25,
                model__dtype="bfloat16", model__attention_impl="xla", model__hidden_size=32, model__num_heads=4)
  given = {"model.hidden_dropout", "model.dtype", "model.attention_impl", "model.hidden_size", "model.layout",
           "optim.lr"}
  r = Run(c, tmp_path / "run", given)
  assert (r.cfg.hidden_dropout, r.cfg.dtype, r.cfg.attention_impl) == (0.25, "bfloat16", "xla")
  assert (r.cfg.layout, r.cfg.hidden_size, r.cfg.num_heads) == ("parallel*2", 32, 2)
