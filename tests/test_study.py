"""The layout study script: every cell measured, the table and plot written, a rerun skips finished cells."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxformers.train import run
from tests.train_helpers import ROOT, load_config

sys.path.insert(0, str(ROOT / "benchmarks"))
import study  # noqa: E402

FIELDS = ("layout", "recipe", "metric", "metric_name", "train_tokens_per_s", "infer_tokens_per_s", "num_params",
          "flops_per_token", "finetune_dir")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A few-step serial*2 classifier on the embedded data: the study's source checkpoint."""
  wd = tmp_path_factory.mktemp("source") / "run"
  run(load_config("tiny", "steps=4", model__hidden_dropout=0.0, model__attention_dropout=0.0), wd)
  return str(wd)


def args(source, workdir, *extra):
  return ["--init_from", source, "--layouts", "serial*2;fourier*2", "--recipes", "direct,healed",
          "--data", "embedded", "--workdir", str(workdir), "--heal_steps", "3", "--finetune_steps", "3",
          "--max_length", "32", "--batch_size", "8", "--max_train_examples", "32", "--infer_batch", "4",
          "--repeats", "2", *extra]


def test_study_measures_every_cell_and_resumes(source, tmp_path, capsys):
  out = study.main(args(source, tmp_path))
  cells = out["cells"]
  assert sorted(cells) == ["fourier*2 | direct", "fourier*2 | healed", "serial*2 | direct",
                           "serial*2 | healed"]
  for c in cells.values():
    assert all(k in c for k in FIELDS), sorted(c)
    assert 0 <= c["metric"] <= 1 and c["metric_name"] == "accuracy"
    assert c["train_tokens_per_s"] > 0 and c["infer_tokens_per_s"] > 0
  assert out["reference"] == "serial*2 | direct"
  # healing used the attention losses only where the student has attention
  assert cells["serial*2 | healed"]["heal"]["losses"] == {"hidden": 1.0, "attention": 1.0, "value": 1.0}
  assert cells["fourier*2 | healed"]["heal"]["losses"] == {"hidden": 1.0}
  # the healed cells fine-tuned after a healing run of their own; the direct ones did not heal
  assert (tmp_path / "cells" / "fourier-2-healed" / "heal" / "summary.json").is_file()
  assert not (tmp_path / "cells" / "fourier-2-direct" / "heal").exists()
  assert cells["fourier*2 | healed"]["finetune_init_from"] == str(tmp_path / "cells" / "fourier-2-healed" / "heal")
  assert cells["fourier*2 | direct"]["finetune_init_from"] == source
  # the same parameter count for both recipes of a layout; a Fourier block has no attention weights
  assert cells["serial*2 | direct"]["num_params"] == cells["serial*2 | healed"]["num_params"]
  assert cells["fourier*2 | direct"]["num_params"] < cells["serial*2 | direct"]["num_params"]
  # the serial model does more work per token than one with a Fourier block (XLA's count, same shape)
  assert cells["fourier*2 | direct"]["flops_per_token"] < cells["serial*2 | direct"]["flops_per_token"]
  md = (tmp_path / "study.md").read_text()
  assert md.count("| `") == 4 + 4 + 1 and "`serial*2` *" in md and "gap closed" in md   # cells, Pareto, healing
  assert (tmp_path / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  saved = json.loads((tmp_path / "study.json").read_text())
  assert sorted(saved["cells"]) == sorted(cells)
  stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("summary.json")}
  assert len(stamps) == 6                       # 4 fine-tunings, 2 healing runs
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert last.startswith(f"wrote {tmp_path / 'study.json'} ") and str(tmp_path / "study.png") in last \
      and str(tmp_path / "study.md") in last                # the run ends by saying where its outputs are

  again = study.main(args(source, tmp_path))
  err = capsys.readouterr().err
  assert err.count("skip ") == 4 and "skip serial*2 | healed seed 0: finished" in err
  assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("summary.json")} == stamps
  assert {k: c["metric"] for k, c in again["cells"].items()} == {k: c["metric"] for k, c in cells.items()}


def test_study_refuses_another_budget_in_the_same_workdir(source, tmp_path):
  saved = study.settings(study.parse_args(args(source, tmp_path)), {"source": "embedded"})
  saved["heal_steps"] = 7
  (tmp_path / "study.json").write_text(json.dumps({"settings": saved, "cells": {}}))
  with pytest.raises(SystemExit, match=r"its finished cells used heal_steps=7, this run asks for 3"):
    study.main(args(source, tmp_path))


def test_bad_layout_and_data_are_named(source, tmp_path):
  with pytest.raises(SystemExit, match=r"--layouts: 'serial\*2,bogus'"):
    study.main(args(source, tmp_path, "--layouts", "serial*2,bogus"))
  with pytest.raises(SystemExit, match=r"--data .*nothere: expected 'embedded', a CSV / TSV / JSONL file, or a directory holding data.json"):
    study.main(args(source, tmp_path, "--data", str(tmp_path / "nothere")))
  assert not (tmp_path / "study.json").exists()


def test_data_file_with_column_flags_and_help_shows_defaults(tmp_path, capsys):
  """``--data FILE --eval FILE`` with column flags gives the same data settings a data.json would (classes inferred
  when --label_names is not given); a bad column is named before anything trains."""
  for name in ("train", "dev"):
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"claim": f"c{i}", "y": ["no", "yes"][i % 2]}) + "\n"
                                                    for i in range(6)))
  a = study.parse_args(["--init_from", "x", "--workdir", str(tmp_path / "w"), "--data", str(tmp_path / "train.jsonl"),
                        "--eval", str(tmp_path / "dev.jsonl"), "--text", "claim", "--label", "y"])
  d = study.data_settings(a.data, a)
  assert d == {"source": "files", "train_file": str(tmp_path / "train.jsonl"), "eval_file": str(tmp_path / "dev.jsonl"),
               "text_a_column": "claim", "text_b_column": "", "label_column": "y", "label_names": "",
               "num_labels": 0}
  c = study.finetune_config(a, d, "x", "serial*2")
  from jaxformers.train.tasks import make_task
  assert make_task(c).label_names == ("no", "yes")
  a.text = "sentence"
  with pytest.raises(SystemExit, match=r"train.jsonl: missing column 'sentence'"):
    study.data_settings(a.data, a)
  a.eval = ""
  with pytest.raises(SystemExit, match=r"a data file needs --eval FILE"):
    study.data_settings(a.data, a)
  with pytest.raises(SystemExit):
    study.parse_args(["--help"])
  out = capsys.readouterr().out
  assert "(default: 200)" in out and "(default: embedded)" in out and "(default: 0.0001)" in out


def test_sigterm_ends_the_study_with_one_line(source, tmp_path):
  import os
  import signal
  import subprocess
  import time
  p = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "study.py"),
                        *args(source, tmp_path, "--finetune_steps", "100000", "--recipes", "direct")],
                       cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))   # no accelerator plugin's start-up log
  deadline = time.time() + 240
  while time.time() < deadline and not list(tmp_path.glob("cells/*/finetune/tokenizer.json")):
    time.sleep(0.5)                              # the first cell's run has started
  time.sleep(3)
  p.send_signal(signal.SIGTERM)
  out, err = p.communicate(timeout=240)
  lines = [l for l in err.splitlines() if l.startswith("study.py")]
  assert p.returncode == 128 + signal.SIGTERM, err[-2000:]
  assert "Traceback" not in err and len(lines) == 1, err[-2000:]
  assert "stopped by SIGTERM" in lines[0] and f"{tmp_path}/study.json" in lines[0]


def test_bigbench_task_converts_to_csv_with_a_grouped_seeded_split(tmp_path, capsys):
  import csv
  import bigbench_to_csv
  examples = []
  for i in range(20):                            # two contrasting evidences per claim, as in VitaminC
    for j, label in enumerate(("True", "False") if i % 2 else ("Neither", "True")):
      examples.append({"input": f"Page {i}: evidence {i}.{j}\nfirst line\nClaim: claim number {i} .",
                       "target_scores": {"True": int(label == "True"), "False": int(label == "False"),
                                         "Neither": int(label == "Neither")}})
  task = tmp_path / "task.json"
  task.write_text(json.dumps({"name": "t", "examples": examples}))
  bigbench_to_csv.main([str(task), "--out", str(tmp_path / "a"), "--validation-fraction", "0.2"])
  out = capsys.readouterr().out
  counts = {line.split(":")[0]: dict(kv.split("=") for kv in line.split("; ")[1].split(", "))
            for line in out.splitlines()}
  assert "train: 32 examples" in out and "validation: 8 examples" in out
  assert {k: int(counts["train"][k]) + int(counts["validation"][k]) for k in counts["train"]} == \
      {"True": 20, "False": 10, "Neither": 10}
  rows = {s: list(csv.DictReader((tmp_path / "a" / f"{s}.csv").open())) for s in ("train", "validation")}
  assert rows["train"][0].keys() == {"claim", "evidence", "label"}
  claims = {s: {r["claim"] for r in rs} for s, rs in rows.items()}
  assert not claims["train"] & claims["validation"] and len(claims["validation"]) == 4   # a claim stays whole
  r = next(r for r in rows["train"] if r["claim"] == "claim number 3 .")
  assert r["evidence"] in ("Page 3: evidence 3.0 first line", "Page 3: evidence 3.1 first line")
  meta = json.loads((tmp_path / "a" / "data.json").read_text())
  assert meta["label_names"] == "True,False,Neither" and meta["num_labels"] == 3
  assert study.data_settings(str(tmp_path / "a"))["train_file"] == str((tmp_path / "a" / "train.csv").resolve())
  bigbench_to_csv.main([str(task), "--out", str(tmp_path / "b"), "--validation-fraction", "0.2"])
  assert (tmp_path / "b" / "train.csv").read_text() == (tmp_path / "a" / "train.csv").read_text()   # seeded
  bigbench_to_csv.main([str(task), "--out", str(tmp_path / "c"), "--max-examples", "5", "--max-validation", "3"])
  assert len(list(csv.DictReader((tmp_path / "c" / "train.csv").open()))) == 5
  (tmp_path / "bad.json").write_text(json.dumps({"examples": [{"input": "no separator", "target_scores": {"a": 1}}]}))
  with pytest.raises(SystemExit, match=r"example 0's input has no separator '\\nClaim: '"):
    bigbench_to_csv.main([str(tmp_path / "bad.json"), "--out", str(tmp_path / "d")])


def test_movie_reviews_to_csv_splits_one_corpus_and_the_study_reads_it(tmp_path, capsys):
  import csv
  import movie_reviews_to_csv as mr
  corpus = tmp_path / "combined_movie_reviews.csv"
  with corpus.open("w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["text", "label", "source"])
    for i in range(30):
      w.writerow([f"snippet {i} ,  rather   {'good' if i % 3 else 'bad'}", int(i % 3 != 0), "rotten_tomatoes"])
    w.writerow(["snippet 0 ,  rather   bad", 0, "rotten_tomatoes"])        # a repeated text stays in one split
    for i in range(5):
      w.writerow([f"a long review {i}<br /><br />more", i % 2, "imdb"])
  mr.main(["--source", "rotten_tomatoes", "--csv", str(corpus), "--out", str(tmp_path / "rt"),
           "--validation-fraction", "0.2"])
  out = capsys.readouterr().out
  assert out.splitlines() == [line for line in out.splitlines() if line.startswith(("train:", "validation:"))]
  rows = {s: list(csv.DictReader((tmp_path / "rt" / f"{s}.csv").open())) for s in ("train", "validation")}
  assert len(rows["train"]) + len(rows["validation"]) == 31 and len(rows["validation"]) in (6, 7)
  texts = {s: [r["text"] for r in rs] for s, rs in rows.items()}
  assert not set(texts["train"]) & set(texts["validation"])
  assert "snippet 0 , rather bad" in texts["train"] + texts["validation"]        # whitespace collapsed
  assert {r["label"] for rs in rows.values() for r in rs} == {"negative", "positive"}
  assert sum(r["label"] == "negative" for rs in rows.values() for r in rs) == 11
  data = study.data_settings(str(tmp_path / "rt"))
  assert data["label_names"] == "negative,positive" and data["train_file"] == str(tmp_path / "rt" / "train.csv")
  mr.main(["--source", "imdb", "--csv", str(corpus), "--out", str(tmp_path / "imdb"), "--validation-fraction", "0.2"])
  imdb = list(csv.DictReader((tmp_path / "imdb" / "train.csv").open()))
  assert all("<br" not in r["text"] for r in imdb) and len(imdb) == 4
  with pytest.raises(SystemExit, match="no rows with source 'imdb'"):
    (tmp_path / "empty.csv").write_text("text,label,source\nx,0,rotten_tomatoes\n")
    mr.main(["--source", "imdb", "--csv", str(tmp_path / "empty.csv"), "--out", str(tmp_path / "e")])


def _vader_sdist(path, files: dict[str, str]):
  """A stand-in for the vaderSentiment source distribution: ``files`` inside the nested ground-truth archive."""
  import io
  import tarfile

  def add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))

  inner = io.BytesIO()
  with tarfile.open(fileobj=inner, mode="w:gz") as t:
    for name, text in files.items():
      add(t, f"hutto_ICWSM_2014/{name}", text.encode())
  with tarfile.open(path, "w:gz") as t:
    add(t, "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz", inner.getvalue())
    add(t, "vaderSentiment-3.3.2/setup.py", b"")


def test_vader_corpora_give_a_polarity_task_with_whole_documents_and_a_pair_task(tmp_path, capsys):
  import csv
  import vader_to_csv as vd
  ratings = {f"{d}_{s}": (-1) ** d * (0.3 + 0.4 * s) for d in range(1, 11) for s in range(4)}
  amazon = "".join(f"{k}\t{v:.3f}\tdoc {k.split('_')[0]} says   &quot;{k}&quot;\r\n" for k, v in ratings.items())
  tweets = "".join(f"{i}\t{(i % 9 - 4) * 0.9:.2f}\ttweet {i} &amp; more\r\n" for i in range(1, 61))
  sdist = tmp_path / "vaderSentiment-3.3.2.tar.gz"
  _vader_sdist(sdist, {vd.FILES["amazon"]: amazon, vd.FILES["tweets"]: tweets})
  vd.main(["--source", "amazon", "--sdist", str(sdist), "--out", str(tmp_path / "a"), "--margin", "0.5"])
  rows = {s: list(csv.DictReader((tmp_path / "a" / f"{s}.csv").open())) for s in ("train", "validation")}
  kept = {k: v for k, v in ratings.items() if abs(v) > 0.5}                   # 0.3 and 0.7 ... : 30 of 40
  assert sum(map(len, rows.values())) == len(kept) == 30
  for r in rows["train"] + rows["validation"]:
    key = r["text"].split('"')[1]
    assert r["text"] == f'doc {key.split("_")[0]} says "{key}"'                # entities decoded, spaces collapsed
    assert r["label"] == ("positive" if kept[key] > 0 else "negative")
  docs = {s: {r["text"].split()[1] for r in rs} for s, rs in rows.items()}
  assert not docs["train"] & docs["validation"] and len(docs["validation"]) == 2   # a review stays whole
  assert study.data_settings(str(tmp_path / "a"))["label_names"] == "negative,positive"

  capsys.readouterr()
  vd.main(["--source", "tweets", "--sdist", str(sdist), "--out", str(tmp_path / "p"), "--task", "compare",
           "--partners", "3", "--gap", "1.5"])
  rating = {f"tweet {i} & more": (i % 9 - 4) * 0.9 for i in range(1, 61)}
  pairs = {s: list(csv.DictReader((tmp_path / "p" / f"{s}.csv").open())) for s in ("train", "validation")}
  assert pairs["train"][0].keys() == {"first", "second", "label"}
  texts = {s: {t for r in rs for t in (r["first"], r["second"])} for s, rs in pairs.items()}
  assert not texts["train"] & texts["validation"]                           # no validation text is trained on
  for r in pairs["train"] + pairs["validation"]:
    a, b = rating[r["first"]], rating[r["second"]]
    assert abs(a - b) >= 1.5 and r["label"] == ("first" if a > b else "second")
  keys = [frozenset((r["first"], r["second"])) for rs in pairs.values() for r in rs]
  assert len(keys) == len(set(keys)) > 60                                  # 60 texts x 3 partners, gap kept
  labels = [r["label"] for rs in pairs.values() for r in rs]
  assert 0.3 < labels.count("first") / len(labels) < 0.7                     # random order
  data = study.data_settings(str(tmp_path / "p"))
  assert (data["text_a_column"], data["text_b_column"], data["label_names"]) == ("first", "second", "first,second")

  _vader_sdist(tmp_path / "empty.tar.gz", {})
  with pytest.raises(SystemExit, match="holds no additional_resources/hutto_ICWSM_2014.tar.gz"):
    vd.read_ground_truth(_plain_tar(tmp_path), "tweets")
  with pytest.raises(SystemExit, match="holds no tweets_GroundTruth.txt"):
    vd.read_ground_truth(tmp_path / "empty.tar.gz", "tweets")
  _vader_sdist(tmp_path / "bad.tar.gz", {vd.FILES["nyt"]: "1_1\t0.5\tfine\n1_2\tnot a number\tx\n"})
  with pytest.raises(SystemExit, match=r"nyt.*line 2: expected 'id<TAB>mean rating<TAB>text'"):
    vd.read_ground_truth(tmp_path / "bad.tar.gz", "nyt")


def _plain_tar(tmp_path):
  """A source distribution without the corpora (what a wheel-only package would give)."""
  import tarfile
  path = tmp_path / "plain.tar.gz"
  with tarfile.open(path, "w:gz") as t:
    t.add(__file__, arcname="pkg/setup.py")
  return path


def test_a_searched_layout_is_one_more_entry(tmp_path, capsys):
  """``search:DIR`` takes the layout a finished architecture search wrote to its summary; anything else is named."""
  found = tmp_path / "search"
  found.mkdir()
  (found / "summary.json").write_text(json.dumps({"finished": True, "search": {"layout": "serial,ffn*2,attention"}}))
  assert study.check_layouts(["serial*2", f"search:{found}"]) == ["serial*2", "serial,ffn*2,attention"]
  assert f"search:{found} -> serial,ffn*2,attention" in capsys.readouterr().out
  trained = tmp_path / "trained"
  trained.mkdir()
  (trained / "summary.json").write_text(json.dumps({"finished": True}))
  with pytest.raises(SystemExit, match="holds no found layout"):
    study.check_layouts([f"search:{trained}"])
  with pytest.raises(SystemExit, match=r"cannot read .*missing.*summary\.json"):
    study.check_layouts([f"search:{tmp_path / 'missing'}"])


def test_a_searched_layout_starts_from_the_source_as_the_search_initialised_it(source, tmp_path):
  """A search from the study's own source: its layout's cells start from the source sublayers its chosen positions
  started from (layer 1's, here), not from a re-arrangement by depth (layer 0's); a search from another source is
  re-arranged by depth, and study.md says which."""
  from jaxformers.checkpoints.pretrained import from_pretrained
  from tests.test_search import dotted
  for name, src in (("own", source), ("other", str(tmp_path / "elsewhere"))):
    d = tmp_path / name
    d.mkdir()
    (d / "summary.json").write_text(json.dumps({"finished": True, "search": {
        "layout": "serial", "chosen": ["identity", "identity", "attention", "ffn"],
        "candidates": ["attention", "ffn", "identity"], "source": src}}))
  out = study.main(args(source, tmp_path / "study", "--layouts", f"serial*2;search:{tmp_path / 'own'}", "--recipes",
                        "direct,healed", "--source_recipes", "direct"))
  # --source_recipes: the source's own layout only as the reference
  assert sorted(out["cells"]) == ["serial | direct", "serial | healed", "serial*2 | direct"]
  cell = out["cells"]["serial | direct"]
  arranged = tmp_path / "study" / "arranged" / "serial"
  assert cell["runs"]["0"]["finetune_init_from"] == str(arranged)
  src = dotted(from_pretrained(source))
  got = dotted(from_pretrained(str(arranged)))
  assert sorted(got) == sorted(k for k in src if not k.startswith("encoder.blocks.1."))
  for k, v in got.items():
    np.testing.assert_array_equal(v, src[k.replace("blocks.0.", "blocks.1.")], err_msg=k)
  md = (tmp_path / "study" / "study.md").read_text()
  assert f"Searched layout `serial` (search:{tmp_path / 'own'}): the source arranged as the search initialised it" in md
  out = study.main(args(source, tmp_path / "study2", "--layouts", f"search:{tmp_path / 'other'}", "--recipes",
                        "direct"))
  assert out["cells"]["serial | direct"]["runs"]["0"]["finetune_init_from"] == source
  assert not (tmp_path / "study2" / "arranged").exists()
  md = (tmp_path / "study2" / "study.md").read_text()
  assert f"re-arranged from the source by depth; the search started from {tmp_path / 'elsewhere'}" in md


def test_healed_kd_distils_from_the_reference_which_runs_first(source, tmp_path):
  """healed+kd: the healed cell's healing run, then fine-tuning with the soft labels of the reference's fine-tuned
  model (same seed); the reference runs first though its layout comes last, and records its learning curve."""
  from jaxformers.checkpoints.runs import read_meta
  out = study.main(args(source, tmp_path, "--layouts", "fourier*2;serial*2", "--recipes", "healed+kd,direct"))
  cells = out["cells"]
  assert sorted(cells) == ["fourier*2 | direct", "fourier*2 | healed+kd", "serial*2 | direct", "serial*2 | healed+kd"]
  ref_dir = tmp_path / "cells" / "serial-2-direct" / "finetune"
  teacher = str(ref_dir / "checkpoints" / "3")               # the reference's final state (3 steps, keep 1)
  for lay, name in (("fourier*2", "fourier-2"), ("serial*2", "serial-2")):
    kd = tmp_path / "cells" / f"{name}-healed-kd"             # a file-system-safe directory name
    heal = tmp_path / "cells" / f"{name}-healed" / "heal"     # healing shared with the healed cell (not run here)
    assert (kd / "finetune" / "summary.json").is_file() and not (kd / "heal").exists()
    assert (heal / "summary.json").is_file()
    c = cells[f"{lay} | healed+kd"]
    assert c["kd"] == {"teacher": teacher, "logits": 1.0, "temperature": 2.0}
    assert c["finetune_init_from"] == str(heal) and c["heal"]["losses"]
    config = read_meta(Path(c["model"]))["config"]           # what the fine-tuning run itself was given
    assert config["distill"]["teacher"] == teacher and config["distill"]["logits"] == 1.0
    assert config["distill"]["temperature"] == 2.0 and config["distill"]["task"] == 1.0
    assert config["init_from"] == str(heal) and config["task"] == "classification"
    # the teacher had finished before the student started
    assert (ref_dir / "summary.json").stat().st_mtime_ns < (kd / "finetune" / "metrics.jsonl").stat().st_mtime_ns
  assert read_meta(Path(cells["serial*2 | direct"]["model"]))["config"]["distill"]["teacher"] == ""
  # the reference evaluated every step (a tenth of 3, at least 1); the others only at the end
  ref = out["cells"]["serial*2 | direct"]["runs"]["0"]
  assert ref["eval_every"] == 1 and [s for s, _ in ref["curve"]] == [1, 2, 3]
  assert ref["curve"][-1][1] == pytest.approx(ref["run_metric"])
  assert "curve" not in cells["fourier*2 | direct"]["runs"]["0"]
  b = out["budget_check"]
  assert b["curve"] == ref["curve"] and b["half_width"] == pytest.approx((b["ci95"][1] - b["ci95"][0]) / 2)
  assert b["improving"] == (ref["curve"][-1][1] - ref["curve"][0][1] > b["half_width"])
  md = (tmp_path / "study.md").read_text()
  assert b["text"] in md and ("still improving at 3 steps: the budget may be too small" in b["text"]) == \
      b["improving"]
  assert "healed+kd: fine-tuned from the healed cell's healing run" in md and "gap closed" in md
  with pytest.raises(SystemExit, match=r"healed\+kd distils from the reference, the source's own layout `serial\*2`"):
    study.main(args(source, tmp_path / "b", "--layouts", "fourier*2", "--recipes", "healed+kd,direct"))


def test_budget_auto_doubles_the_reference_until_its_curve_flattens(source, tmp_path, monkeypatch, capsys):
  """``--budget auto`` on a tiny study. The learning curves are hand-made (the curve reader is replaced: a tiny
  model's curve over a few steps is noise): rising for a 2-step run, flat for a 4-step one, so 4 steps is chosen,
  recorded, and used by every cell; the chosen run becomes the reference's, and a rerun trains nothing."""
  def curve(workdir, metric):
    steps = json.loads((Path(workdir) / "summary.json").read_text())["total_steps"]
    if steps <= 2:
      return [[1, 0.1], [2, 0.9]]
    return [[s, 0.5] for s in range(1, steps + 1)]
  monkeypatch.setattr(study, "learning_curve", curve)
  out = study.main(args(source, tmp_path, "--recipes", "direct", "--budget", "auto", "--finetune_steps", "2",
                        "--max_finetune_steps", "16"))
  s = out["settings"]
  assert (s["budget"], s["budget_from_steps"], s["max_finetune_steps"], s["finetune_steps"]) == ("auto", 2, 16, 4)
  search = out["budget_search"]
  assert search["chosen"] == 4 and search["plateaued"] is True
  assert [(t["steps"], t["improving"], t["eval_every"]) for t in search["trials"]] == [(2, True, 1), (4, False, 1)]
  ref_dir = tmp_path / "cells" / "serial-2-direct" / "finetune"
  assert search["trials"][-1]["moved_to"] == str(ref_dir) and not (tmp_path / "budget" / "finetune-4").exists()
  assert (tmp_path / "budget" / "finetune-2" / "summary.json").is_file()
  for lay in ("serial-2", "fourier-2"):
    assert json.loads((tmp_path / "cells" / f"{lay}-direct" / "finetune" / "summary.json").read_text())[
        "total_steps"] == 4
  assert out["cells"]["serial*2 | direct"]["runs"]["0"]["run_metric"] == pytest.approx(search["trials"][-1]["metric"])
  assert json.loads((tmp_path / "study.json").read_text())["settings"]["finetune_steps"] == 4
  md = (tmp_path / "study.md").read_text()
  assert "`--budget auto` chose 4 fine-tuning steps for every cell" in md and "fine-tune 4 steps" in md
  assert "2 (still improving), 4 (flat)" in md and "learning curve has flattened by 4 steps" in md
  err = capsys.readouterr().err
  assert "budget: 2 fine-tuning steps:" in err and "still improving" in err
  stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("summary.json")}
  assert len(stamps) == 3                                   # the 2-step trial and the two cells
  again = study.main(args(source, tmp_path, "--recipes", "direct", "--budget", "auto", "--finetune_steps", "2",
                          "--max_finetune_steps", "16"))
  assert "budget:" not in capsys.readouterr().err and again["budget_search"] == search
  assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("summary.json")} == stamps
  # the one-page summary counts the budget tries in the study's wall time
  import study_summary
  assert all(t["wall_time_s"] > 0 for t in search["trials"])
  timed = json.loads(json.dumps(out))
  for t in timed["budget_search"]["trials"]:
    t["wall_time_s"] = 300.0
  cells = sum(r["wall_time_s"] for c in out["cells"].values() for r in c["runs"].values())
  head = study_summary.header("Auto", timed)
  assert "fine-tune 4 steps (chosen by `--budget auto`)" in head
  assert f"; {(cells + 600) / 60:.0f} minutes of training and scoring;" in head
  del timed["budget_search"]["trials"][0]["wall_time_s"]
  assert (f"; {(cells + 300) / 60:.0f} minutes of training and scoring (and 1 budget try not timed);"
          in study_summary.header("Auto", timed))

  # a curve that never flattens stops at --max_finetune_steps, and study.md says the budget may be too small
  monkeypatch.setattr(study, "learning_curve", lambda workdir, metric: [[1, 0.1], [2, 0.5], [3, 0.9]])
  out = study.main(args(source, tmp_path / "cap", "--recipes", "direct", "--layouts", "serial*2", "--budget", "auto",
                        "--finetune_steps", "2", "--max_finetune_steps", "3"))
  assert [t["steps"] for t in out["budget_search"]["trials"]] == [2, 3] and out["settings"]["finetune_steps"] == 3
  assert out["budget_search"]["plateaued"] is False and out["budget_check"]["improving"] is True
  assert "The reference is still improving at 3 steps: the budget may be too small" in \
      (tmp_path / "cap" / "study.md").read_text()
