"""The layout study's statistics: the numpy functions on hand-built examples, and a two-seed tiny study whose mean,
standard deviation and bootstrap intervals in study.json equal ones recomputed here from its saved predictions."""
import json
import sys

import numpy as np
import pytest

from tests.train_helpers import ROOT, train_losses

sys.path.insert(0, str(ROOT / "benchmarks"))
import study  # noqa: E402
import study_stats  # noqa: E402
from tests.test_study import source  # noqa: E402,F401 (the study tests' source checkpoint, built once per module)


# --- the functions ------------------------------------------------------------------------------------------------
def test_metrics_equal_the_trainers():
  from jaxformers.train.metrics import classification_metrics, regression_metrics
  rng = np.random.default_rng(0)
  y3, p3 = rng.integers(0, 3, 200), rng.integers(0, 3, (4, 200))
  y2, p2 = rng.integers(0, 2, 200), rng.integers(0, 2, (4, 200))
  yr, pr = rng.normal(size=200), rng.normal(size=(4, 200)).round(1)        # rounded: ties in the ranks
  for name, y, p in (("accuracy", y3, p3), ("matthews_corr", y3, p3), ("f1", y2, p2)):
    got = study_stats.metric(name, p, y)
    assert got.shape == (4,)
    for row, g in zip(p, got):
      assert g == pytest.approx(classification_metrics(y, row, name)[name], abs=1e-12)
      assert study_stats.metric(name, row, y) == pytest.approx(g, abs=1e-15)
  for name in ("pearson", "spearman"):
    for row, g in zip(pr, study_stats.metric(name, pr, yr)):
      assert g == pytest.approx(regression_metrics(yr, row)[name], abs=1e-12)
  assert study_stats.metric("matthews_corr", np.zeros(5, int), np.array([0, 1, 0, 1, 1])) == 0.0   # undefined: 0
  assert study_stats.metric("f1", np.zeros(4, int), np.zeros(4, int)) == 0.0
  assert study_stats.metric("pearson", np.ones(4), np.arange(4.0)) == 0.0
  with pytest.raises(ValueError, match="metric 'bleu'"):
    study_stats.metric("bleu", p2, y2)


def test_mean_sd_bootstrap_and_pareto_on_known_answers():
  assert study_stats.mean_sd([0.5]) == (0.5, None)                          # one seed: no deviation
  assert study_stats.mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)                 # ddof=1
  y = np.array([0, 1, 2, 1, 0, 2, 2, 1])
  p = np.array([0, 1, 1, 1, 2, 2, 0, 1])
  assert study_stats.paired_bootstrap("accuracy", p, p, y) == (0.0, 0.0)    # the same predictions: no difference
  assert study_stats.paired_bootstrap("accuracy", [p, p], p, y) == (0.0, 0.0)
  assert study_stats.paired_bootstrap("accuracy", y, (y + 1) % 3, y) == (1.0, 1.0)   # always right vs always wrong
  # one example of eight differs: the difference is 1/8 times that example's count in the resample
  q = p.copy()
  q[1] = 0
  d = study_stats.bootstrap_differences("accuracy", p, q, y, resamples=50, seed=3)
  rng = np.random.default_rng(3)
  counts = np.array([(rng.integers(0, 8, size=8) == 1).sum() for _ in range(50)])
  np.testing.assert_allclose(d, counts / 8, atol=1e-12)
  lo, hi = study_stats.paired_bootstrap("accuracy", p, q, y, resamples=50, seed=3)
  assert (lo, hi) == (np.percentile(counts / 8, 2.5), np.percentile(counts / 8, 97.5)) and lo <= hi
  # the Pareto front of (metric, speed-up): (0.7, 1.2) is dominated by (0.8, 1.5); equal points both stay
  pts = [(0.9, 1.0), (0.8, 1.5), (0.7, 1.2), (0.95, 0.5), (0.8, 1.5), (0.6, float("nan"))]
  assert study_stats.pareto_front(pts) == [True, True, False, True, True, False]
  # the fastest point keeping >= 95% of a reference metric of 0.8 (>= 0.76)
  assert study_stats.fastest_keeping([(0.77, 1.3), (0.75, 2.0), (0.79, 1.1)], 0.8) == 0
  assert study_stats.fastest_keeping([(0.70, 1.3), (0.75, 2.0)], 0.8) is None
  assert study_stats.fastest_keeping([(0.5, 1.3)], 0.0) is None


def test_the_budget_check_on_hand_built_learning_curves():
  """``still_improving``: the last evaluation minus the best of the first half (steps <= half the last step) against
  the half-width of the metric's interval; rising, flat, peaked and one-point curves."""
  check = study_stats.still_improving
  rising = [(10, 0.50), (20, 0.60), (30, 0.70), (40, 0.80)]
  r = check(rising, 0.05)
  assert r["improving"] is True and r["steps"] == 40 and r["best_earlier"] == 0.60
  assert r["gain"] == pytest.approx(0.20) and r["last"] == 0.80
  flat = [(10, 0.50), (20, 0.80), (30, 0.79), (40, 0.81)]          # the first half already reached it
  f = check(flat, 0.05)
  assert f["improving"] is False and f["gain"] == pytest.approx(0.01)
  assert check(flat, 0.005)["improving"] is True                     # a narrower interval tells the 0.01 apart
  assert check([(40, 0.81), (10, 0.5), (20, 0.8)], 0.05) == f         # order of the evaluations does not matter
  assert check([(5, 0.2), (10, 0.9), (15, 0.95), (20, 0.7)], 0.05)["improving"] is False   # peaked, then fell
  assert check([(10, 0.5), (20, 0.53), (40, 0.56)], 0.05)["improving"] is False  # rising within the noise
  assert check([(10, 0.5), (20, 0.53), (40, 0.56)], 0.05)["best_earlier"] == 0.53  # step 20 is the first half's
  for cannot_tell in ([(40, 0.8)], [], [(30, 0.1), (40, 0.9)]):      # nothing at steps <= 20
    assert check(cannot_tell, 0.05)["improving"] is None and check(cannot_tell, 0.05)["gain"] is None
  # the half-width comes from the interval of one cell's metric: the paired bootstrap's draws, one metric
  y = np.array([0, 1, 2, 1, 0, 2, 2, 1])
  p = np.array([0, 1, 1, 1, 2, 2, 0, 1])
  rng = np.random.default_rng(7)
  values = []
  for _ in range(40):
    idx = rng.integers(0, 8, size=8)
    values.append(np.mean([np.mean(row[idx] == y[idx]) for row in (p, y)]))   # two seeds, averaged
  lo, hi = study_stats.bootstrap_interval("accuracy", [p, y], y, resamples=40, seed=7)
  np.testing.assert_allclose([lo, hi], np.percentile(values, [2.5, 97.5]), atol=1e-12)
  assert study_stats.bootstrap_interval("accuracy", y, y) == (1.0, 1.0)


# --- a two-seed study -------------------------------------------------------------------------------------------
def args(source, workdir, *extra):
  return ["--init_from", source, "--layouts", "serial*2;fourier*2", "--recipes", "direct", "--data", "embedded",
          "--workdir", str(workdir), "--finetune_steps", "8", "--lr", "3e-3", "--max_length", "32",
          "--batch_size", "8", "--max_train_examples", "64", "--infer_batch", "4", "--repeats", "1", "--seeds", "2",
          *extra]


def accuracy(preds, labels):
  return float(np.mean(np.asarray(preds) == np.asarray(labels)))


def test_two_seeds_give_the_statistics_of_their_saved_predictions(source, tmp_path, capsys):
  out = study.main(args(source, tmp_path))
  saved = json.loads((tmp_path / "study.json").read_text())
  assert saved["cells"].keys() == out["cells"].keys() == {"serial*2 | direct", "fourier*2 | direct"}
  labels = np.asarray(saved["eval_labels"])
  ref = saved["cells"][saved["reference"]]
  assert saved["reference"] == "serial*2 | direct" and saved["seeds"] == [0, 1]
  cell_dirs = {"serial*2 | direct": tmp_path / "cells" / "serial-2-direct",
               "fourier*2 | direct": tmp_path / "cells" / "fourier-2-direct"}
  for key, c in saved["cells"].items():
    assert sorted(c["runs"]) == ["0", "1"] and c["seeds"] == [0, 1]
    # seed 0 where a one-seed study had it, seed 1 below the cell; other data orders, so other losses
    assert c["runs"]["0"]["finetune_dir"] == str(cell_dirs[key] / "finetune")
    assert c["runs"]["1"]["finetune_dir"] == str(cell_dirs[key] / "seed1" / "finetune")
    assert train_losses(cell_dirs[key] / "finetune") != train_losses(cell_dirs[key] / "seed1" / "finetune")
    per_seed = []
    for s in ("0", "1"):
      r = c["runs"][s]
      assert len(r["predictions"]) == len(labels) == r["eval_examples"]["validation"]
      per_seed.append(accuracy(r["predictions"], labels))
      assert r["metric"] == pytest.approx(per_seed[-1], abs=1e-6)
      assert r["run_metric"] == pytest.approx(per_seed[-1], abs=1e-6)   # the trainer's own evaluation agrees
    assert c["metric"] == pytest.approx(np.mean(per_seed), abs=1e-6)
    assert c["metric_sd"] == pytest.approx(np.std(per_seed, ddof=1), abs=1e-6)
    # the paired bootstrap, recomputed: 1000 resamples of the examples, seed 1000, seed-averaged accuracies
    rng = np.random.default_rng(1000)
    diffs = []
    for _ in range(1000):
      idx = rng.integers(0, len(labels), size=len(labels))
      mine = np.mean([accuracy(np.asarray(c["runs"][s]["predictions"])[idx], labels[idx]) for s in ("0", "1")])
      theirs = np.mean([accuracy(np.asarray(ref["runs"][s]["predictions"])[idx], labels[idx]) for s in ("0", "1")])
      diffs.append(mine - theirs)
    np.testing.assert_allclose(c["diff_ci95"], np.percentile(diffs, [2.5, 97.5]), atol=1e-6)
    assert c["diff_to_reference"] == pytest.approx(c["metric"] - ref["metric"], abs=1e-12)
    # one cell a layout here, so its layout's speed is its own measurement
    assert c["layout_tokens_per_s"] == c["infer_tokens_per_s"]
    assert c["speedup"] == pytest.approx(c["infer_tokens_per_s"] / ref["infer_tokens_per_s"])
  assert ref["diff_ci95"] == [0.0, 0.0]
  cells = list(saved["cells"].values())
  front = study_stats.pareto_front([(c["metric"], c["speedup"]) for c in cells])
  assert [c["pareto"] for c in cells] == front and any(front)
  assert saved["bootstrap"]["resamples"] == 1000 and saved["bootstrap"]["examples"] == len(labels)
  f = saved["cells"]["fourier*2 | direct"]
  keeps = f["metric"] >= 0.95 * ref["metric"]
  assert saved["fastest_within_95"] == ("fourier*2 | direct" if keeps else None)
  md = (tmp_path / "study.md").read_text()
  # study.md leads with the Pareto table; benchmarks/study_summary.py puts the same table on one page per task
  import study_summary
  pareto = "\n".join(study.pareto_lines(saved, "accuracy"))
  assert md.split("\n\n", 1)[1].startswith(pareto)
  text = study_summary.main([f"Tiny={tmp_path}", f"Again={tmp_path}", "--out", str(tmp_path / "summary")])
  assert text.count(pareto) == 2 and text.startswith("### Tiny\n") and "\n### Again\n" in text
  wall = sum(r["wall_time_s"] for c in saved["cells"].values() for r in c["runs"].values())
  assert f"; {wall / 60:.0f} minutes of training and scoring;" in text
  assert "2 seed(s) a cell" in text and (tmp_path / "summary" / "summary.md").read_text() == text
  assert (tmp_path / "summary" / "summary.png").stat().st_size > 20000
  with pytest.raises(SystemExit, match="expected TASK=DIR"):
    study_summary.main([str(tmp_path), "--out", str(tmp_path / "x")])
  assert "accuracy (mean ± sd)" in md and f"{ref['metric']:.4f} ± {ref['metric_sd']:.4f}" in md
  lo, hi = f["diff_ci95"]
  assert f"{f['diff_to_reference']:+.4f} [{lo:+.4f}, {hi:+.4f}]" in md and "on the front" in md
  assert saved["conclusion"] in md
  assert ("`fourier*2` (direct) keeps >= 95%" if keeps else "No layout other than the reference keeps") in md
  assert (tmp_path / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  # a rerun skips every finished (cell, seed); one with --seeds 1 reports seed 0 alone, without a deviation; a cell
  # saved before seeds (no runs) is scored again from its finished runs, not trained again
  stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("summary.json")}
  assert len(stamps) == 4
  old = dict(saved["cells"]["fourier*2 | direct"])
  for k in ("runs", "seeds", "metric_sd", "metric_seeds"):
    old.pop(k)
  saved["cells"]["fourier*2 | direct"] = old
  (tmp_path / "study.json").write_text(json.dumps(saved))
  capsys.readouterr()
  again = study.main(args(source, tmp_path, "--seeds", "1"))
  err = capsys.readouterr().err
  assert "cell fourier*2 | direct has no per-seed runs" in err
  assert err.count("skip ") == 1 and "skip serial*2 | direct seed 0: finished" in err
  assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("summary.json")} == stamps
  f1 = again["cells"]["fourier*2 | direct"]
  assert f1["runs"]["0"]["predictions"] == f["runs"]["0"]["predictions"] and sorted(f1["runs"]) == ["0"]
  assert sorted(again["cells"]["serial*2 | direct"]["runs"]) == ["0", "1"]       # kept, though not shown
  for c in again["cells"].values():
    assert c["seeds"] == [0] and c["metric_sd"] is None
    assert c["metric"] == pytest.approx(accuracy(c["runs"]["0"]["predictions"], labels), abs=1e-6)
  md = (tmp_path / "study.md").read_text()
  assert " ± " not in md and "seed 0." in md


def test_the_recipes_of_a_layout_share_its_median_speed_so_the_better_recipe_is_chosen():
  # 40 examples; the reference gets 38 right, ffn*2 direct 37 (97.4% of it), healed 38 (100%), healed+kd 36
  # (94.7%). Measured alone, direct would be the fastest (210 tokens/s) and win the sentence with less accuracy.
  labels = np.tile([0, 1], 20)

  def cell(layout, recipe, correct, tokens_per_s):
    preds = labels.copy()
    preds[:40 - correct] = 1 - preds[:40 - correct]
    return {"layout": layout, "recipe": recipe, "metric_name": "accuracy", "metric": correct / 40, "seeds": [0],
            "runs": {"0": {"predictions": preds.tolist()}}, "infer_tokens_per_s": tokens_per_s,
            "flops_per_token": 1.0}
  cells = {"ffn*2 | direct": cell("ffn*2", "direct", 37, 210.0),        # the reference last: the order is free
           "ffn*2 | healed": cell("ffn*2", "healed", 38, 190.0),
           "ffn*2 | healed+kd": cell("ffn*2", "healed+kd", 36, 200.0),
           "serial*2 | healed": cell("serial*2", "healed", 37, 104.0),
           "serial*2 | direct": cell("serial*2", "direct", 38, 100.0)}
  s = {"cells": cells, "reference": "serial*2 | direct", "eval_labels": labels.tolist()}
  study.statistics(s, list(cells), resamples=200)
  up = {k: c["speedup"] for k, c in cells.items()}
  assert up == {"serial*2 | direct": 1.0, "serial*2 | healed": 1.0, "ffn*2 | direct": 200 / 102,
                "ffn*2 | healed": 200 / 102, "ffn*2 | healed+kd": 200 / 102}
  direct = cells["ffn*2 | direct"]
  assert direct["layout_tokens_per_s"] == 200.0 and direct["infer_tokens_per_s"] == 210
  assert [k for k, c in cells.items() if c["pareto"]] == ["ffn*2 | healed"]
  assert s["fastest_within_95"] == "ffn*2 | healed" and s["goal"]["cell"] == "ffn*2 | healed" and s["goal"]["met"]
  assert s["conclusion"].startswith("`ffn*2` (healed) keeps >= 95% of the reference's accuracy at the highest "
                                    "speed-up: 100.0% [")
  assert s["conclusion"].endswith("] at 1.96x (means over seeds; 95% interval).")


def test_panels_drawn_with_one_layout_list_colour_a_layout_alike():
  """A summary's panels come from studies whose layouts differ in order and number; given the union of their layouts,
  ``draw`` colours each layout the same on every panel (tab10 by its place in that list)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  def one(*layouts):
    cells = {f"{lay} | direct": {"layout": lay, "recipe": "direct", "metric": 0.5 + i / 10, "metric_name": "accuracy",
                                 "infer_tokens_per_s": 100.0 + i, "speedup": 1.0 + i / 10}
             for i, lay in enumerate(layouts)}
    return {"cells": cells, "reference": f"{layouts[0]} | direct", "inference_shape": [2, 8], "cpu": "cpu",
            "settings": {"seed": 0}}
  studies = [one("serial*2", "ffn*2", "fourier*2"), one("serial*2", "fourier*2")]
  union = ["serial*2", "ffn*2", "fourier*2"]
  fig, axes = plt.subplots(1, 2)
  for ax, s in zip(axes, studies):
    study.draw(ax, s, layouts=union)
  tab10 = plt.get_cmap("tab10")
  for ax, s in zip(axes, studies):
    drawn = {c.get_label(): tuple(c.get_facecolor()[0]) for c in ax.collections if " (direct)" in c.get_label()}
    assert drawn == {f"{lay} (direct)": tuple(tab10(union.index(lay))) for lay in
                     (c["layout"] for c in s["cells"].values())}
  plt.close(fig)


def goal_cells(**cells):
  out = {"ref": {"layout": "serial*6", "recipe": "direct", "metric": 0.8, "speedup": 1.0, "diff_ci95": [0.0, 0.0],
                 "flops_per_token": 20e6, "pareto": True}}
  for k, (metric, lo, hi, up) in cells.items():
    out[k] = {"layout": k, "recipe": "healed", "metric": metric, "speedup": up, "diff_ci95": [lo, hi],
              "flops_per_token": 10e6, "pareto": False}
  return out


def test_goal_needs_the_share_the_intervals_lower_end_and_the_speed_up():
  # a: 97.5% of 0.8, interval [96.25%, 98.75%], 1.6x: met
  cells = goal_cells(a=(0.78, -0.03, -0.01, 1.6), b=(0.79, -0.07, 0.01, 2.0), c=(0.80, -0.01, 0.01, 1.2))
  assert study.share_interval(cells["a"], cells["ref"]) == pytest.approx((96.25, 98.75))
  g = study.goal(cells, ["a", "b", "c"], cells["ref"])
  assert g["met"] and g["cell"] == "a"
  assert g["text"].endswith("met: `a` (healed) keeps 97.5% [96.25%, 98.75%] at 1.60x.".replace("96.25", "96.2")
                            .replace("98.75", "98.8"))
  # without a: b is faster and keeps 98.75% but its interval reaches 91.25% < 93%; c keeps 100% at 1.2x only
  g = study.goal(cells, ["b", "c"], cells["ref"])
  assert not g["met"] and g["cell"] == "b" and "not met; the best layout that fast: `b`" in g["text"]
  g = study.goal(cells, ["c"], cells["ref"])
  assert not g["met"] and g["cell"] is None and "no layout is 1.5x faster" in g["text"]
  # the Pareto lines lead with the fastest cell, its share and interval, FLOPs relative to the reference
  study_ = {"cells": cells, "reference": "ref", "goal": study.goal(cells, ["a", "b", "c"], cells["ref"])}
  lines = study.pareto_lines(study_, "accuracy")
  rows = [line for line in "\n".join(lines).splitlines() if line.startswith("| `")]
  assert rows[0].startswith("| `b` | healed | 0.7900 | 98.8 [91.2, 101.2] | 2.00x | 50% | no |")
  assert rows[-1].startswith("| `serial*6` * | direct | 0.8000 | 100 (reference) | 1.00x | 100% | yes |")
  assert lines[-1] == study_["goal"]["text"]
