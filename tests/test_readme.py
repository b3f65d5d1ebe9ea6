"""The examples of the README and of the pages under docs/ run as written.

Convention: every fenced block in README.md and docs/*.md carries a tag on its opening line.
``python`` and ``bash`` blocks are run by this test; ``text`` blocks (layout lists, the file
tree) are not code. A code block that cannot run here says so on its tag line with
``no-test: <reason>`` (e.g. ```` ```bash no-test: needs the GLUE data ````), which keeps
every exclusion visible in the page itself. An untagged fence, an unknown tag or a
``no-test`` without a reason fails the test.

Python blocks run one by one, each in a fresh namespace, in a temporary working directory,
with the placeholder checkpoint paths replaced: ``path/to/bert-base-uncased`` by the real
all-MiniLM-L6-v2 directory, ``path/to/roberta-base`` by a small random RoBERTa written by
transformers, ``path/to/parallel-roberta-large`` by a PAF checkpoint made from it, and the
training run ``runs/default`` by a short run of ``configs/tiny.py``. Hub ids resolve from an
offline Hub cache holding all-MiniLM-L6-v2. Bash blocks run each ``jaxformers ...`` line through
the CLI's ``main`` (the console script's entry point) and each ``python ...`` line with this
interpreter, in order, and each must exit 0.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import jaxformers
from jaxformers.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(.*)$")


def readme_blocks() -> list[tuple[str, str, str | None, str]]:
  """``("FILE:line", language, no-test reason or None, code)`` for every fenced block of README.md and docs/*.md."""
  return [b for page in PAGES for b in page_blocks(page)]


def page_blocks(page: Path) -> list[tuple[str, str, str | None, str]]:
  name = str(page.relative_to(ROOT))
  blocks, lines, i = [], page.read_text().splitlines(), 0
  while i < len(lines):
    m = FENCE.match(lines[i])
    if not m:
      i += 1
      continue
    info, start = m.group(1).strip(), i + 1
    end = next(j for j in range(start, len(lines)) if lines[j].startswith("```"))
    lang, _, rest = info.partition(" ")
    reason = None
    if rest:
      key, _, reason = rest.partition(":")
      assert key.strip() == "no-test" and reason.strip(), f"{name}:{start}: tag {info!r}: expected " \
          f"'<language>' or '<language> no-test: <reason>'"
      reason = reason.strip()
    blocks.append((f"{name}:{start}", lang, reason, "\n".join(lines[start:end])))
    i = end + 1
  return blocks


BLOCKS = readme_blocks()


def test_every_block_is_tagged_and_every_exclusion_has_a_reason():
  for line, lang, reason, _ in BLOCKS:
    assert lang in ("python", "bash", "text"), f"{line}: fence tag {lang!r}; use python, bash or text"
    assert lang != "text" or reason is None, f"{line}: text blocks are not run, no-test is meaningless"
  run = [b for b in BLOCKS if b[1] in ("python", "bash") and b[2] is None]
  assert len(run) >= 4, "the README's runnable examples went missing"
  assert any(b[0].startswith("README.md:") for b in run), "the README itself has no runnable example"
  assert len(README.read_text().splitlines()) < 400, "README.md is the user's guide: keep it under 400 lines"


@pytest.fixture(scope="module")
def placeholders(minilm_dir, hf_factory, tmp_path_factory):
  from conftest import make_hf
  roberta = tmp_path_factory.mktemp("roberta-base")
  make_hf(roberta, "RobertaForMaskedLM", num_hidden_layers=4)
  paf = tmp_path_factory.mktemp("parallel-roberta-large")
  jaxformers.export_hf(jaxformers.from_pretrained(roberta, layout="parallel*4"), paf)
  from jaxformers.train import run
  from train_helpers import load_config
  trained = tmp_path_factory.mktemp("runs") / "default"
  run(load_config("tiny", "steps=2"), trained)
  return {"path/to/bert-base-uncased": str(minilm_dir), "path/to/roberta-base": str(roberta),
          "path/to/parallel-roberta-large": str(paf), "runs/default": str(trained)}


def substitute(code: str, placeholders: dict[str, str]) -> str:
  for name, path in placeholders.items():
    code = code.replace(name, path)
  assert "path/to/" not in code, f"a placeholder path without a stand-in: {code}"
  return code


def shell_commands(code: str) -> list[list[str]]:
  joined = re.sub(r"\\\n", " ", code)
  return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


@pytest.mark.slow
@pytest.mark.parametrize("line,lang,code", [(b[0], b[1], b[3]) for b in BLOCKS if b[1] != "text" and b[2] is None],
                         ids=[f"{b[0]}-{b[1]}" for b in BLOCKS if b[1] != "text" and b[2] is None])
def test_readme_example_runs_as_written(line, lang, code, placeholders, hub_cache, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  code = substitute(code, placeholders)
  if lang == "python":
    exec(compile(code, line, "exec"), {"__name__": "__readme__"})
    return
  for argv in shell_commands(code):
    if argv[0] == "python":
      p = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
      assert p.returncode == 0, f"{line}: {shlex.join(argv)} exited {p.returncode}: {p.stderr[-2000:]}"
      continue
    assert argv[0] == "jaxformers", f"{line}: no way to run {argv[0]!r} here; tag the block no-test"
    code = main(argv[1:])
    assert code == 0, f"{line}: {shlex.join(argv)} exited {code}: {capsys.readouterr().err}"
