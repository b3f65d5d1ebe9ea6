"""The success paths of ``jaxformers layouts|convert|export``: what they print and what they write."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch
import transformers as T
from safetensors.numpy import load_file

import jaxformers
from jaxformers.blocks import BLOCKS
from jaxformers.cli import main
from jaxformers.params import get_params
from conftest import padded_batch

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_layouts_prints_the_grammar_and_every_block():
  p = subprocess.run([sys.executable, "-m", "jaxformers.cli", "layouts"], cwd=ROOT, capture_output=True, text=True,
                     timeout=120)
  assert p.returncode == 0, p.stderr
  assert "layout := item" in p.stdout and "fourier*10,serial*2" in p.stdout
  lines = p.stdout.splitlines()
  for name in BLOCKS.names():
    assert any(l.split() and l.split()[0] == name and BLOCKS.get(name).doc.split()[0] in l for l in lines), name


def test_convert_with_task_num_labels_and_layout(hf_factory, tmp_path, capsys):
  src, _ = hf_factory("RobertaModel", "safetensors")
  dst = tmp_path / "native"
  assert main(["convert", str(src), str(dst), "--task", "classification", "--num-labels", "5",
               "--layout", "parallel*3"]) == 0
  out = capsys.readouterr().out
  assert "newly initialised 4 parameters: classifier.dense.bias" in out
  assert f"wrote {dst} (layout parallel*3" in out
  model = jaxformers.from_pretrained(dst)
  assert model.num_labels == 5 and model.config.layout == "parallel*3"
  model.eval()
  ids, mask = padded_batch(120, pad_id=1)
  assert np.asarray(model(ids, mask)).shape == (3, 5)
  direct = get_params(jaxformers.from_pretrained(src, layout="parallel*3", task="classification", num_labels=5))
  got = get_params(model)
  assert sorted(got) == sorted(direct)
  for k in got:
    if not k.startswith("classifier."):           # the new head is random; everything else is the checkpoint's
      np.testing.assert_array_equal(got[k], direct[k], err_msg=k)


def test_export_writes_what_transformers_loads(hf_factory, tmp_path, capsys):
  src, ref_model = hf_factory("BertForPreTraining", "safetensors")
  assert main(["convert", str(src), str(tmp_path / "native")]) == 0
  assert main(["export", str(tmp_path / "native"), str(tmp_path / "hf")]) == 0
  assert f"wrote {tmp_path / 'hf'}/config.json and model.safetensors" in capsys.readouterr().out
  a, b = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "hf" / "model.safetensors"))
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  again = T.BertForPreTraining.from_pretrained(str(tmp_path / "hf"), attn_implementation="eager").eval()
  ids, mask = padded_batch(120)
  with torch.no_grad():
    x = ref_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).prediction_logits
    y = again(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).prediction_logits
  np.testing.assert_array_equal(x.numpy(), y.numpy())
