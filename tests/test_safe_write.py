"""convert / export / save_pretrained never lose what is at the destination: a non-empty directory or a file is
refused unless --overwrite, and then only the checkpoint's own entries are replaced, written beside and renamed."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

import jaxformers
from jaxformers.cli import main
from jaxformers.errors import CheckpointError


def hashes(root: Path) -> dict[str, str]:
  """Every file under ``root`` (and ``root`` itself when a file) -> sha256."""
  root = Path(root)
  files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
  return {str(p.relative_to(root.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def leftovers(parent: Path) -> list[str]:
  return sorted(p.name for p in parent.iterdir() if p.name.endswith(".partial"))


def cli(capsys, *argv) -> tuple[int, str]:
  code = main([str(a) for a in argv])
  err = capsys.readouterr().err
  assert "Traceback" not in err
  return code, err


def params_of(path) -> dict:
  from flax import nnx
  import jax
  flat = jax.tree_util.tree_flatten_with_path(nnx.state(jaxformers.from_pretrained(path), nnx.Param))[0]
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def test_convert_never_deletes_files_in_params(hf_factory, tmp_path, capsys):
  src, _ = hf_factory("BertModel")
  d = tmp_path / "d"
  (d / "params").mkdir(parents=True)
  (d / "params" / "important.txt").write_text("keep\n")
  before = hashes(d)
  code, err = cli(capsys, "convert", src, d)
  assert code == 2 and [l for l in err.splitlines() if "error" in l] == [err.splitlines()[-1]]
  assert f"{d} is not empty (params/): nothing was written" in err and "--overwrite" in err
  assert hashes(d) == before
  code, err = cli(capsys, "convert", src, d, "--overwrite")
  assert code == 2
  assert f"{d / 'params'} holds files that are not an orbax checkpoint (important.txt)" in err
  assert hashes(d) == before and leftovers(tmp_path) == []


def test_convert_replaces_an_existing_checkpoint_only_with_overwrite(hf_factory, tmp_path, capsys):
  src, _ = hf_factory("BertModel")
  d = tmp_path / "d"
  assert cli(capsys, "convert", src, d)[0] == 0
  (d / "notes.txt").write_text("my notes\n")
  before = hashes(d)
  code, err = cli(capsys, "convert", src, d, "--layout", "parallel*3")
  assert code == 2 and "is not empty (jaxformers.json, notes.txt, params/)" in err
  assert hashes(d) == before
  assert cli(capsys, "convert", src, d, "--layout", "parallel*3", "--overwrite")[0] == 0
  assert (d / "notes.txt").read_text() == "my notes\n"
  assert sorted(p.name for p in d.iterdir()) == ["jaxformers.json", "notes.txt", "params"]
  assert leftovers(tmp_path) == []
  # the replaced checkpoint is exactly what a conversion into a new directory gives
  assert cli(capsys, "convert", src, tmp_path / "fresh", "--layout", "parallel*3")[0] == 0
  assert (d / "jaxformers.json").read_text() == (tmp_path / "fresh" / "jaxformers.json").read_text()
  got, want = params_of(d), params_of(tmp_path / "fresh")
  assert got.keys() == want.keys() and len(got) > 10
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_convert_onto_a_file_is_refused_even_with_overwrite(hf_factory, tmp_path, capsys):
  src, _ = hf_factory("BertModel")
  f = tmp_path / "model.bin"
  f.write_bytes(b"\x00user data")
  for extra in ((), ("--overwrite",)):
    code, err = cli(capsys, "convert", src, f, *extra)
    assert code == 2 and f"{f} is an existing file, not a directory: nothing was written" in err
    assert f.read_bytes() == b"\x00user data"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def test_export_refuses_non_empty_file_and_unwritable_destinations(hf_factory, tmp_path, capsys):
  src, _ = hf_factory("BertModel")
  d = tmp_path / "hf"
  d.mkdir()
  (d / "config.json").write_text('{"mine": 1}\n')
  (d / "README.md").write_text("read me\n")
  before = hashes(tmp_path)
  code, err = cli(capsys, "export", src, d)
  assert code == 2 and f"{d} is not empty (README.md, config.json): nothing was written" in err
  code, err = cli(capsys, "export", src, d / "README.md")
  assert code == 2 and "is an existing file, not a directory" in err
  code, err = cli(capsys, "export", src, d / "README.md" / "out")
  assert code == 2 and f"cannot write the HF checkpoint to {d / 'README.md' / 'out'}: {d / 'README.md'} is not a " \
                       f"directory; nothing was written" in err
  assert hashes(tmp_path) == before
  if Path("/proc/self").is_dir():   # a directory nobody can create entries in, root included
    code, err = cli(capsys, "export", src, "/proc/jaxformers-export")
    assert code == 2 and "cannot write the HF checkpoint to /proc/jaxformers-export" in err
  if os.geteuid() != 0:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, err = cli(capsys, "export", src, locked / "out")
    assert code == 2 and f"{locked} is not writable" in err


def test_export_overwrite_replaces_only_config_and_weights(hf_factory, tmp_path, capsys):
  src, _ = hf_factory("BertModel")
  d = tmp_path / "hf"
  d.mkdir()
  (d / "config.json").write_text('{"old": 1}\n')
  (d / "tokenizer.json").write_text('{"tok": 1}\n')
  assert cli(capsys, "export", src, d, "--overwrite")[0] == 0
  assert cli(capsys, "export", src, tmp_path / "fresh")[0] == 0
  assert (d / "tokenizer.json").read_text() == '{"tok": 1}\n'
  for name in ("config.json", "model.safetensors"):
    assert (d / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()
  assert leftovers(tmp_path) == []


def test_save_pretrained_refuses_and_survives_interruptions(hf_factory, tmp_path, monkeypatch):
  import orbax.checkpoint as ocp
  from jaxformers.checkpoints import files
  src, _ = hf_factory("BertModel")
  model = jaxformers.from_pretrained(src)
  d = tmp_path / "native"
  jaxformers.save_pretrained(model, d)
  (d / "notes.txt").write_text("mine\n")
  before = hashes(d)
  with pytest.raises(CheckpointError, match="is not empty .* overwrite=True"):
    jaxformers.save_pretrained(model, d)
  assert hashes(d) == before

  # interrupted while writing: the old checkpoint is untouched and no temporary directory is left
  def interrupted(*a, **k):
    raise KeyboardInterrupt
  with monkeypatch.context() as m:
    m.setattr(ocp.StandardCheckpointer, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
      jaxformers.save_pretrained(model, d, overwrite=True)
  assert hashes(d) == before and leftovers(tmp_path) == []

  # a rename failing half-way through the swap: every old file is still somewhere the error names
  real, calls = os.replace, []

  def flaky(a, b):
    calls.append(a)
    if len(calls) == 3:
      raise OSError(5, "Input/output error")
    real(a, b)
  with monkeypatch.context() as m:
    m.setattr(files.os, "replace", flaky)
    with pytest.raises(CheckpointError, match=r"the previous files are in (\S+), the new ones in") as e:
      jaxformers.save_pretrained(model, d, overwrite=True)
  old = Path(str(e.value).split("the previous files are in ")[1].split(",")[0])
  kept = {k.split("/", 1)[1]: v for k, v in hashes(d).items()}
  kept.update({k.split("/", 1)[1]: v for k, v in hashes(old).items()})
  assert {k.split("/", 1)[1]: v for k, v in before.items()}.items() <= kept.items()
