"""Data sources: the registry, and how each file format is read (quoting, encodings, record checks)."""
import json
import logging

import ml_collections
import numpy as np
import pytest

from jaxformers.data import sources
from jaxformers.data.files import read_table
from jaxformers.data.sources import SOURCES, DataError
from jaxformers.train.defaults import base_config


def files_config(**kw):
  c = base_config()
  c.data.source = "files"
  for k, v in kw.items():
    c.data[k] = v
  return c.data


def test_registry_names_every_source_and_rejects_unknown_ones():
  assert SOURCES.names() == ["embedded", "files", "glue_tsv", "tfds"]
  c = base_config()
  c.data.source = "hdf5"
  with pytest.raises(DataError, match=r"config.data.source='hdf5': unknown data source 'hdf5'; known: embedded"):
    sources.get_source(c.data)


def test_tsv_fields_are_not_quoted(tmp_path):
  # a field starting with a quote must not swallow the following rows (CSV quoting rules do that)
  rows = ["text\tlabel"] + [f'"quoted start {i}\t{i % 2}' if i % 7 == 0 else f"plain {i}\t{i % 2}" for i in range(96)]
  f = tmp_path / "train.tsv"
  f.write_text("\n".join(rows) + "\n")
  ex = read_table(f, "text", None, "label", label_names=("0", "1"), regression=False)
  assert len(ex) == 96
  assert ex.text_a[0] == '"quoted start 0' and ex.text_a[1] == "plain 1"
  np.testing.assert_array_equal(ex.label, np.arange(96) % 2)


def test_csv_quoted_fields_keep_commas_and_line_breaks(tmp_path, caplog):
  f = tmp_path / "train.csv"
  f.write_text('text,label\n"a, b",1\n"two\nlines",0\nplain,1\n')
  with caplog.at_level(logging.WARNING):
    ex = read_table(f, "text", None, "label", label_names=("0", "1"), regression=False)
  assert ex.text_a == ["a, b", "two\nlines", "plain"]
  assert ex.label.tolist() == [1, 0, 1]
  assert "spans lines 3-4" in caplog.text and "3 records from 5 lines" in caplog.text


def test_csv_row_with_an_unquoted_comma_names_its_line(tmp_path):
  f = tmp_path / "train.csv"
  f.write_text("text,label\nfine,1\nnot, fine,0\n")
  with pytest.raises(DataError, match=r"train.csv line 3: 3 fields, the header has 2 \(a comma inside a text must be "
                                      r"quoted"):
    read_table(f, "text", None, "label", label_names=("0", "1"), regression=False)


def test_non_utf8_file_names_file_and_line(tmp_path):
  f = tmp_path / "train.csv"
  f.write_bytes(b"text,label\nok,1\ncaf\xe9,0\n")
  with pytest.raises(DataError, match=r"train.csv line 3: not UTF-8 text \(byte 0xe9 at offset 19\)"):
    read_table(f, "text", None, "label", label_names=("0", "1"), regression=False)


def test_jsonl_records_must_be_objects_with_the_mapped_keys(tmp_path):
  f = tmp_path / "train.jsonl"
  f.write_text(json.dumps({"text": "a", "label": 1}) + "\n" + json.dumps(["b", 0]) + "\n")
  with pytest.raises(DataError, match=r"train.jsonl line 2: expected a JSON object with keys text, label, got a list"):
    read_table(f, "text", None, "label", label_names=("0", "1"), regression=False)
  f.write_text(json.dumps({"text": "a", "label": 1}) + "\n\n" + json.dumps({"text": "b"}) + "\n")
  with pytest.raises(DataError, match=r"train.jsonl line 3: the record has no key 'label' \(its keys: text\)"):
    read_table(f, "text", None, "label", label_names=("0", "1"), regression=False)
  f.write_text(json.dumps({"txt": "a", "label": 1}) + "\n")
  with pytest.raises(DataError, match=r"missing column 'text' \(did you mean txt\?\)"):
    read_table(f, "text", None, "label", label_names=("0", "1"), regression=False)


def test_files_source_labels_and_splits(tmp_path):
  f = tmp_path / "d.jsonl"
  f.write_text("".join(json.dumps({"q": f"q{i}", "a": f"a{i}", "y": ["neg", "pos"][i % 2]}) + "\n" for i in range(5)))
  d = files_config(train_file=str(f), eval_file=str(f), text_a_column="q", text_b_column="a", label_column="y",
                   label_names="neg,pos", num_labels=2)
  src = sources.get_source(d)
  assert src.labels(d) == sources.Labels(2, ("neg", "pos"), "accuracy")
  ex = src.examples(d, "validation")
  assert ex.text_a == [f"q{i}" for i in range(5)] and ex.text_b == [f"a{i}" for i in range(5)]
  assert ex.label.tolist() == [0, 1, 0, 1, 0]
  assert src.texts(d, "train") == [f"q{i} a{i}" for i in range(5)]
  with pytest.raises(DataError, match=r"needs config.data.test_file for the test split"):
    src.examples(d, "test")
  d.label_names = "neg,pos,other"
  with pytest.raises(DataError, match=r"label_names has 3 names but config.data.num_labels=2"):
    src.check(d)


def test_glue_source_checks_its_config():
  c = base_config()
  c.data.source = "glue_tsv"
  src = sources.get_source(c.data)
  with pytest.raises(DataError, match=r"needs config.data.glue_task \(one of cola, sst2"):
    src.check(c.data)
  c.data.glue_task = "rtee"
  with pytest.raises(DataError, match=r"unknown GLUE task 'rtee' \(did you mean rte"):
    src.check(c.data)
  c.data.glue_task = "mnli"
  with pytest.raises(DataError, match=r"needs config.data.dir"):
    src.check(c.data)
  assert src.eval_splits(c.data) == ("validation_matched", "validation_mismatched")
  assert src.prediction_file(c.data, "test_mismatched") == "MNLI-mm.tsv"
  assert src.labels(c.data).names == ("entailment", "neutral", "contradiction")


def test_a_new_source_is_one_registered_class():
  @SOURCES.register("test_inline")
  class Inline(sources.Source):
    def labels(self, data_cfg):
      return sources.Labels(2, None, "accuracy")

    def examples(self, data_cfg, split):
      return sources.finish("inline", ["x", "y"], None, [0, 1], False)
  try:
    d = ml_collections.ConfigDict({"source": "test_inline"})
    assert sources.load_split(d, "train").text_a == ["x", "y"]
    assert sources.get_source(d).eval_splits(d) == ("validation",)
  finally:
    SOURCES._items.pop("test_inline")
