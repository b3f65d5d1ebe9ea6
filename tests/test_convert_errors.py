"""Bad checkpoints and layouts fail with a message that names the fault, from the API and the CLI."""
from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxformers
from jaxformers.cli import main
from jaxformers.errors import CheckpointError
from jaxformers.layout import LayoutError


def copy_ckpt(hf_factory, tmp_path, arch="BertForSequenceClassification", fmt="safetensors"):
  src, _ = hf_factory(arch, fmt)
  dst = tmp_path / "ckpt"
  shutil.copytree(src, dst)
  return dst


def cli_error(capsys, *argv) -> str:
  code = main(list(argv))
  err = capsys.readouterr().err
  assert code == 2, err
  assert "Traceback" not in err
  return err


def test_missing_config_json(hf_factory, tmp_path, capsys):
  d = copy_ckpt(hf_factory, tmp_path)
  (d / "config.json").unlink()
  with pytest.raises(CheckpointError, match="no config.json"):
    jaxformers.from_pretrained(d)
  assert "no config.json" in cli_error(capsys, "convert", str(d), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_truncated_safetensors(hf_factory, tmp_path, capsys):
  d = copy_ckpt(hf_factory, tmp_path)
  f = d / "model.safetensors"
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  err = cli_error(capsys, "convert", str(d), str(tmp_path / "out"))
  assert "model.safetensors" in err and "truncated or corrupt" in err


class _RunsCode:
  def __reduce__(self):
    return (os.system, ("echo pwned > /dev/null",))


def test_bin_pickle_that_would_run_code_is_refused(hf_factory, tmp_path, capsys):
  d = copy_ckpt(hf_factory, tmp_path, fmt="bin")
  with open(d / "pytorch_model.bin", "wb") as fh:
    pickle.dump({"bert.embeddings.word_embeddings.weight": _RunsCode()}, fh)
  err = cli_error(capsys, "convert", str(d), str(tmp_path / "out"))
  assert "pytorch_model.bin" in err and "refused to load" in err and "could run code" in err


def test_shapes_disagree_with_config(hf_factory, tmp_path, capsys):
  d = copy_ckpt(hf_factory, tmp_path)
  cfg = json.loads((d / "config.json").read_text())
  cfg["intermediate_size"] = 48
  (d / "config.json").write_text(json.dumps(cfg))
  err = cli_error(capsys, "convert", str(d), str(tmp_path / "out"))
  assert "bert.encoder.layer.0.intermediate.dense.weight: shape (64, 32) does not fit" in err
  assert "encoder.layer.2.output.dense.weight" in err  # every problem is listed, not just the first


def test_unknown_keys_are_listed(hf_factory, tmp_path, capsys):
  d = copy_ckpt(hf_factory, tmp_path)
  state = load_file(str(d / "model.safetensors"))
  state["bert.encoder.layer.0.attention.self.rotary.weight"] = np.zeros(3, np.float32)
  state["mystery_head.weight"] = np.zeros(3, np.float32)
  save_file(state, str(d / "model.safetensors"))
  err = cli_error(capsys, "convert", str(d), str(tmp_path / "out"))
  assert "2 problem(s)" in err
  assert "bert.encoder.layer.0.attention.self.rotary.weight: unknown tensor" in err
  assert "mystery_head.weight: unknown tensor" in err


def test_missing_tensor_is_named(hf_factory, tmp_path):
  d = copy_ckpt(hf_factory, tmp_path)
  state = load_file(str(d / "model.safetensors"))
  del state["bert.encoder.layer.1.output.dense.bias"]
  save_file(state, str(d / "model.safetensors"))
  with pytest.raises(CheckpointError, match=r"encoder\.blocks\.1\.mlp\.down\.bias: no tensor in the checkpoint"):
    jaxformers.from_pretrained(d)


def test_unknown_block_name(hf_factory, tmp_path, capsys):
  d = copy_ckpt(hf_factory, tmp_path)
  err = cli_error(capsys, "convert", str(d), str(tmp_path / "out"), "--layout", "serial*2,parralel")
  assert "unknown block 'parralel'" in err and "known blocks: attention, ffn" in err and "layout :=" in err


@pytest.mark.parametrize("text,message", [
    ("serial*0", "positive count"), ("(serial,ffn", "expected ')'"), ("serial,,ffn", "expected a block name"),
    ("serial*12)", "unexpected ')'"), ("", "empty"), ("serial+ffn", "unexpected '+"),
])
def test_invalid_layouts_show_the_grammar(text, message):
  with pytest.raises(LayoutError) as e:
    jaxformers.EncoderConfig(layout=text)
  assert message in str(e.value) and "layout :=" in str(e.value)


def test_unsupported_architecture(hf_factory, tmp_path):
  d = copy_ckpt(hf_factory, tmp_path)
  cfg = json.loads((d / "config.json").read_text())
  cfg["architectures"] = ["BertForQuestionAnswering"]
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match="architecture 'BertForQuestionAnswering' is not supported; expected one of"):
    jaxformers.from_pretrained(d)


def test_export_of_fourier_layout_is_refused(hf_factory, tmp_path, capsys):
  d = copy_ckpt(hf_factory, tmp_path)
  assert main(["convert", str(d), str(tmp_path / "fnet"), "--layout", "fourier*3"]) == 0
  err = cli_error(capsys, "export", str(tmp_path / "fnet"), str(tmp_path / "hf"))
  assert "cannot be written as an HF checkpoint" in err and "fourier" in err


def test_cli_help_lists_commands(capsys):
  with pytest.raises(SystemExit) as e:
    main(["--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert "convert" in out and "export" in out
