"""jaxformers.encode gives sentence-transformers' vectors for all-MiniLM-L6-v2, in input order, whatever the packing."""
import numpy as np
import pytest

import jaxformers
from jaxformers.cli import main
from jaxformers.data import embedded


def ragged_texts(n: int) -> list[str]:
  """Real text of many lengths: standard-library docstrings cut at varying points (a few empty)."""
  corpus = embedded.stdlib_corpus()
  return [corpus[i % len(corpus)][: (i * 53) % 900] for i in range(n)]


@pytest.fixture(scope="module")
def reference(minilm_dir):
  from sentence_transformers import SentenceTransformer
  st = SentenceTransformer(str(minilm_dir), device="cpu")
  return lambda texts: st.encode(texts, batch_size=64, convert_to_numpy=True)


def cosine(a, b):
  return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


@pytest.mark.parametrize("n", [1, 7, 1000])
def test_vectors_equal_sentence_transformers(minilm_dir, reference, n):
  texts = ragged_texts(n)
  ours, ref = jaxformers.encode(minilm_dir, texts), reference(texts)
  assert ours.shape == ref.shape == (n, 384)
  assert cosine(ours, ref).min() >= 0.9999
  np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, rtol=1e-5)   # normalised, as the directory says


def test_packing_and_chunking_change_nothing(minilm_dir):
  texts = ragged_texts(40)
  packed = jaxformers.encode(minilm_dir, texts, batch_tokens=512)
  alone = jaxformers.encode(minilm_dir, texts, max_segments=1, batch_tokens=4096)     # one text a row
  np.testing.assert_allclose(packed, alone, atol=2e-6)
  shuffled = np.random.default_rng(0).permutation(40)
  again = jaxformers.encode(minilm_dir, [texts[i] for i in shuffled])
  np.testing.assert_allclose(again, packed[shuffled], atol=2e-6)                  # input order is kept
  streamed = jaxformers.encode(minilm_dir, texts, batch_tokens=512, tokenize_block=7)   # rows carried across blocks
  np.testing.assert_allclose(streamed, packed, atol=2e-6)


def test_repeated_calls_compile_once_and_bfloat16_agrees(minilm_dir):
  from jaxformers.packing import _jitted_chunk
  model, tok = jaxformers.from_pretrained(minilm_dir), jaxformers.load_tokenizer(minilm_dir)
  texts, kw = ragged_texts(12), dict(tokenizer=tok, pooling="mean", normalize=True, max_length=128, batch_tokens=512)
  f32 = jaxformers.encode(model, texts, **kw)
  compiled = _jitted_chunk()._cache_size()
  again = jaxformers.encode(model, texts[::-1], **kw)
  assert _jitted_chunk()._cache_size() == compiled                 # same model structure and settings: no compile
  np.testing.assert_allclose(again[::-1], f32, atol=2e-6)
  bf16 = jaxformers.encode(model, texts, dtype="bfloat16", **kw)
  assert model.config.dtype == "float32"                           # the caller's model is left as it was
  assert 0.9995 <= cosine(bf16, f32).min() < 0.999999, cosine(bf16, f32).min()   # measured 0.99987


def test_pooling_modes_match_numpy(minilm_dir):
  texts = ["A short sentence.", "Another, somewhat longer sentence about encoders."]
  model = jaxformers.from_pretrained(minilm_dir)
  tok = jaxformers.load_tokenizer(minilm_dir)
  unpadded = tok.__class__.from_str(tok.to_str())
  unpadded.no_padding()                      # the file pads to 128; here one text is its own unpadded row
  for text, i in zip(texts, range(2)):
    ids = np.asarray([unpadded.encode(text).ids])
    h = np.asarray(model(ids, np.ones_like(ids)).last_hidden_state[0])
    want = {"cls": h[0], "mean": h.mean(0), "max": h.max(0)}
    for pooling, v in want.items():
      got = jaxformers.encode(model, texts, tokenizer=tok, pooling=pooling, normalize=False)[i]
      np.testing.assert_allclose(got, v, atol=2e-5, err_msg=pooling)


@pytest.fixture(scope="module")
def st_parts(minilm_dir):
  from sentence_transformers import SentenceTransformer
  st = SentenceTransformer(str(minilm_dir), device="cpu")
  assert [type(m).__name__ for m in st] == ["Transformer", "Pooling", "Normalize"]
  return st, jaxformers.encode(minilm_dir, ragged_texts(9)[2:])     # and the directory's own vectors


@pytest.mark.parametrize("given", [dict(normalize=False), dict(pooling="cls"), dict(max_length=16),
                                   dict(pooling="max", normalize=False, max_length=20)],
                         ids=["normalize_off", "pooling_cls", "max_length_16", "pooling_max_normalize_off_max_length_20"])
def test_explicit_options_override_the_sentence_transformers_directory(minilm_dir, st_parts, given):
  """The directory says mean pooling, normalised, 256 tokens; each option given explicitly wins. Reference:
  sentence-transformers with the same modules but that pooling / no Normalize / that max_seq_length."""
  from sentence_transformers import SentenceTransformer, models as st_models
  texts = ragged_texts(9)[2:]
  st_parts, default = st_parts
  transformer = st_parts[0]
  pooling = st_models.Pooling(384, pooling_mode=given.get("pooling", "mean"))
  modules = [transformer, pooling] + ([st_parts[2]] if given.get("normalize", True) else [])
  ref_model = SentenceTransformer(modules=modules, device="cpu")
  ref_model.max_seq_length = given.get("max_length", 256)
  try:
    ref = ref_model.encode(texts, batch_size=8, convert_to_numpy=True)
  finally:
    transformer.max_seq_length = 256
  ours = jaxformers.encode(minilm_dir, texts, **given)
  assert ours.shape == ref.shape == (7, 384)
  assert cosine(ours, ref).min() >= 0.99999, cosine(ours, ref).min()     # measured 0.9999999
  np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), np.linalg.norm(ref, axis=-1), rtol=1e-5)   # 2.4e-7
  assert np.abs(ours - default).max() > 1e-2                             # the option changed the vectors
  if given.get("normalize", True):
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, rtol=1e-5)
  else:
    assert np.abs(np.linalg.norm(ours, axis=-1) - 1.0).min() > 0.1


def test_cli_writes_vectors_in_line_order(minilm_dir, reference, tmp_path, capsys):
  texts = ragged_texts(5)[1:]
  (tmp_path / "t.txt").write_text("\n".join(texts) + "\n")
  assert main(["encode", str(minilm_dir), str(tmp_path / "t.txt"), str(tmp_path / "v.npy")]) == 0
  assert cosine(np.load(tmp_path / "v.npy"), reference(texts)).min() >= 0.9999
  assert main(["encode", str(minilm_dir), str(tmp_path / "t.txt"), str(tmp_path / "v.npy")]) == 2
  assert "exists: nothing was written; use --overwrite" in capsys.readouterr().err


def test_encode_cli_splits_lines_at_newline_only(minilm_dir, tmp_path):
  """U+2028, U+2029, form feed, vertical tab and a lone carriage return stay inside their line (str.splitlines would
  split there); CRLF ends a line like LF; one vector per line of the file, in order."""
  lines = ["first line\u2028still the first", "second\x0cwith a form feed", "third\rwith a lone CR",
           "fourth\x0bvertical tab \u2029 paragraph", "", "last, after an empty one"]
  (tmp_path / "t.txt").write_bytes(("\r\n".join(lines[:3]) + "\n" + "\n".join(lines[3:]) + "\n").encode())
  assert main(["encode", str(minilm_dir), str(tmp_path / "t.txt"), str(tmp_path / "v.npy")]) == 0
  got = np.load(tmp_path / "v.npy")
  assert got.shape == (len(lines), 384)
  np.testing.assert_allclose(got, jaxformers.encode(minilm_dir, lines), atol=2e-6)


def test_encode_of_a_single_string_gives_one_vector(minilm_dir, reference):
  """A str is one text (sentence-transformers gives a 1-D vector for it), not one text per character."""
  one = jaxformers.encode(minilm_dir, "hello world")
  ref = reference("hello world")
  assert one.shape == ref.shape == (384,)
  assert cosine(one, ref) >= 0.9999
  np.testing.assert_array_equal(one, jaxformers.encode(minilm_dir, ["hello world"])[0])


def test_encode_cli_refuses_bad_outputs_and_lengths_in_one_line_before_computing(minilm_dir, tmp_path, capsys,
                                                                                  monkeypatch):
  (tmp_path / "t.txt").write_text("a text\nanother\n")
  (tmp_path / "dir").mkdir()
  computed = []
  monkeypatch.setattr(jaxformers, "encode", lambda *a, **k: computed.append(a))
  d = tmp_path / "dir"
  for out, extra, msg in ((tmp_path / "missing" / "v.npy", [], f"{tmp_path / 'missing'}: no such directory"),
                          (d, ["--overwrite"], f"{d} is a directory: nothing was written"),
                          (d, [], f"{d} is a directory")):
    assert main(["encode", str(minilm_dir), str(tmp_path / "t.txt"), str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err
  assert computed == [] and sorted(p.name for p in tmp_path.iterdir()) == ["dir", "t.txt"]
  assert list((tmp_path / "dir").iterdir()) == []
  monkeypatch.undo()
  for n in ("-5", "0", "1"):
    assert main(["encode", str(minilm_dir), str(tmp_path / "t.txt"), str(tmp_path / "v.npy"), "--max-length", n]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"max_length={n}: expected at least 2 tokens" in err[0], err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "t.txt"]
