"""Several layout studies (one per task) on one page: a Pareto table and a panel per task, with each task's
conclusion and the goal's verdict, as the README shows them.

  python benchmarks/study_summary.py "Rotten Tomatoes=/tmp/studies/rt" "IMDB=/tmp/studies/imdb" --out docs/studies

Each argument is ``TASK=DIR`` with ``DIR`` a finished ``benchmarks/study.py`` workdir (its ``study.json``). Writes
``OUT/summary.md`` (per task: data, budget, seeds and the machine, then :func:`study.pareto_lines`) and
``OUT/summary.png`` (one panel per task, three a row, :func:`study.draw`), and prints the markdown.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import study as S  # noqa: E402

PANELS_A_ROW = 3


def load(spec: str) -> tuple[str, dict]:
  name, sep, d = spec.partition("=")
  if not sep or not name or not d:
    raise SystemExit(f"{spec!r}: expected TASK=DIR (a task's name and the workdir of a finished study)")
  path = Path(d) / "study.json"
  try:
    study = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise SystemExit(f"{spec!r}: cannot read {path} ({e}); expected the workdir of a finished benchmarks/study.py run")
  if "conclusion" not in study or not study.get("cells"):
    raise SystemExit(f"{path}: the study has not finished (no conclusion); run benchmarks/study.py to its end first")
  keys = [k for k in study["cells"] if "speedup" in study["cells"][k]]
  return name, dict(study, cells={k: study["cells"][k] for k in keys})


def header(name: str, study: dict) -> str:
  s = study["settings"]
  seeds = study.get("seeds") or [s["seed"]]
  data = s["data"].get("train_file", s["data"]["source"])
  cell = next(iter(study["cells"].values()))
  tries = (study.get("budget_search") or {}).get("trials", [])
  timed = [r for c in study["cells"].values() for r in c.get("runs", {}).values()] + tries
  wall = sum(r.get("wall_time_s", 0.0) for r in timed)
  untimed = sum("wall_time_s" not in t for t in tries)
  budget = f" (and {untimed} budget {'try' if untimed == 1 else 'tries'} not timed)" if untimed else ""
  chosen = " (chosen by `--budget auto`)" if tries else ""
  return (f"### {name}\n\nData `{data}` ({cell['runs'][str(seeds[0])].get('train_examples', '?')} training, "
          f"{len(study['eval_labels'])} validation examples); heal {s['heal_steps']} steps, fine-tune "
          f"{s['finetune_steps']} steps{chosen}, batch {s['batch_size']}, max_length {s['max_length']}, "
          f"{len(seeds)} seed(s) a cell; inference batch {study['inference_shape'][0]}x{study['inference_shape'][1]} "
          f"on {study['cpu']} ({study['devices']}); {wall / 60:.0f} minutes of training and scoring{budget}; measured "
          f"{study.get('measured_at', '?')}.")


def main(argv=None) -> str:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("studies", nargs="+", help="TASK=DIR, one per task")
  p.add_argument("--out", type=Path, required=True, help="where summary.md and summary.png go")
  a = p.parse_args(argv)
  studies = [load(x) for x in a.studies]
  parts = []
  for name, study in studies:
    metric = next(iter(study["cells"].values()))["metric_name"]
    lines = [header(name, study), ""] + S.pareto_lines(study, metric)
    if study.get("budget_check"):
      lines += ["", study["budget_check"]["text"]]
    parts.append("\n".join(lines))
  text = "\n\n".join(parts) + "\n"
  a.out.mkdir(parents=True, exist_ok=True)
  (a.out / "summary.md").write_text(text)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cols = min(len(studies), PANELS_A_ROW)
  rows = -(-len(studies) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 5 * rows), squeeze=False)
  layouts = list(dict.fromkeys(c["layout"] for _, study in studies for c in study["cells"].values()))
  for ax, (name, study) in zip(axes.flat, studies):     # one colour a layout on every panel
    S.draw(ax, study, title=f"{name}: metric vs inference speed-up\n(o direct, ^ healed, s healed+kd; 95% intervals)",
           layouts=layouts)
  for ax in list(axes.flat)[len(studies):]:
    ax.set_axis_off()
  fig.tight_layout()
  fig.savefig(a.out / "summary.png", dpi=110)
  plt.close(fig)
  print(text)
  print(f"wrote {a.out / 'summary.md'} and {a.out / 'summary.png'}", file=sys.stderr)
  return text


if __name__ == "__main__":
  main()
