"""The notebooks in colabs/: every ``NN_name.py`` (jupytext percent format, the source) has an ``NN_name.ipynb`` pair
with the same cells and no outputs, and every notebook runs headless, top to bottom, on the ``cpu_tiny`` preset
within its time limit, drawing its figures.

Execution: nbclient runs the ``.ipynb`` (what Colab opens) in a fresh IPython kernel from the repository root, with
a cell injected after the ``parameters`` cell that sets ``PRESET = "cpu_tiny"`` and ``WORKDIR`` to a temporary
directory (papermill's convention). A failing cell fails the test with that cell's traceback. Each code cell that
shows a figure (``plt.show()``, ``Image(...)``) must have an ``image/png`` output.

Time limits: the kernel's CPU time (user + system, itself and its children) must stay under ``CPU_LIMIT_S``; on an
otherwise idle 2-core machine the wall time is at most that. The wall-clock limit ``WALL_LIMIT_S`` (for all cells
together) only stops a hung notebook and leaves room for a machine that other jobs share.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COLABS = ROOT / "colabs"
SOURCES = sorted(COLABS.glob("[0-9][0-9]_*.py"))
CPU_LIMIT_S = 180        # each notebook's cpu_tiny run: CPU seconds of its kernel
WALL_LIMIT_S = 480       # all cells of one notebook, wall clock
CPU_PROBE = ("import resource as _r\n_s, _c = _r.getrusage(_r.RUSAGE_SELF), _r.getrusage(_r.RUSAGE_CHILDREN)\n"
             "print('kernel CPU seconds', _s.ru_utime + _s.ru_stime + _c.ru_utime + _c.ru_stime)")
FIGURE_CALLS = ("plt.show()", "display(Image(")

jupytext = pytest.importorskip("jupytext", reason="the test extra installs jupytext")


def cells(nb) -> list[tuple[str, str, tuple]]:
  """What a pair must agree on: each cell's type, source and tags."""
  return [(c.cell_type, c.source.strip(), tuple(c.get("metadata", {}).get("tags", ()))) for c in nb.cells]


def test_notebooks_exist_and_are_numbered():
  names = [p.stem for p in SOURCES]
  assert {"01_quickstart", "02_finetune", "03_layout_study", "04_search", "05_kernels",
          "06_compression"} <= set(names), names
  assert len({n[:2] for n in names}) == len(names), f"two notebooks share a number: {names}"
  strays = sorted(p.name for p in COLABS.glob("*.ipynb") if not p.with_suffix(".py").is_file())
  assert not strays, f"notebooks without a .py source: {strays}"


@pytest.mark.parametrize("src", SOURCES, ids=[p.stem for p in SOURCES])
def test_pair_in_sync_and_outputs_stripped(src):
  ipynb = src.with_suffix(".ipynb")
  assert ipynb.is_file(), f"{ipynb.name} is missing: jupytext --to ipynb {src.relative_to(ROOT)}"
  py_nb, ip_nb = jupytext.read(src), jupytext.read(ipynb)
  assert cells(py_nb) == cells(ip_nb), (f"{src.name} and {ipynb.name} differ; regenerate the notebook: "
                                        f"jupytext --to ipynb --update {src.relative_to(ROOT)}")
  for i, c in enumerate(ip_nb.cells):
    if c.cell_type == "code":
      assert not c.outputs and c.execution_count is None, f"{ipynb.name} cell {i} has outputs: strip them"
  code = [c for c in py_nb.cells if c.cell_type == "code"]
  assert "parameters" in code[0].metadata.get("tags", ()) and 'PRESET = "auto"' in code[0].source, \
      f"{src.name}: the first code cell must be the parameters cell (tag 'parameters') with PRESET = \"auto\""
  install = [c for c in jupytext.read(SOURCES[0]).cells if c.cell_type == "code"][1].source
  assert code[1].source == install, f"{src.name}: the second code cell must be the install cell of {SOURCES[0].name}"


def execute(ipynb: Path, workdir: Path, preset: str = "cpu_tiny"):
  """Run ``ipynb`` in a fresh kernel from the repository root with the preset injected; the executed notebook."""
  import nbformat
  from nbclient import NotebookClient
  nb = nbformat.read(ipynb, as_version=4)
  at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", ()))
  injected = nbformat.v4.new_code_cell(f"PRESET = {preset!r}\nWORKDIR = {str(workdir)!r}",
                                       metadata={"tags": ["injected-parameters"]})
  nb.cells.insert(at + 1, injected)
  nb.cells.append(nbformat.v4.new_code_cell(CPU_PROBE, metadata={"tags": ["injected-cpu-time"]}))
  deadline = time.monotonic() + WALL_LIMIT_S
  client = NotebookClient(nb, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}},
                          timeout_func=lambda cell: max(1, int(deadline - time.monotonic())))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
             HF_HUB_OFFLINE="1", MPLBACKEND="module://matplotlib_inline.backend_inline")
  client.execute(env=env)
  return nb


@pytest.mark.slow
@pytest.mark.parametrize("src", SOURCES, ids=[p.stem for p in SOURCES])
def test_notebook_runs_on_cpu_tiny(src, tmp_path):
  import nbformat
  t0 = time.monotonic()
  nb = execute(src.with_suffix(".ipynb"), tmp_path)
  elapsed = time.monotonic() - t0
  nbformat.write(nb, tmp_path / f"{src.stem}.executed.ipynb")
  cpu = float(nb.cells[-1].outputs[0]["text"].split()[-1])
  print(f"{src.stem}: {elapsed:.0f} s wall, {cpu:.0f} s kernel CPU")
  assert cpu < CPU_LIMIT_S, f"{src.stem} used {cpu:.0f} s of CPU on cpu_tiny (limit {CPU_LIMIT_S} s)"
  shown = 0
  for i, c in enumerate(nb.cells):
    if c.cell_type != "code" or not any(f in c.source for f in FIGURE_CALLS):
      continue
    pngs = [o for o in c.outputs if "image/png" in o.get("data", {})]
    assert pngs, f"{src.stem} cell {i} draws a figure but its output has no image/png"
    shown += len(pngs)
  assert shown >= 1, f"{src.stem} shows no figure"


def test_presets_resolve_by_backend_and_name():
  from jaxformers import colab
  assert [colab.auto_name(b) for b in ("tpu", "gpu", "cuda", "rocm", "cpu")] == ["tpu", "gpu", "gpu", "gpu",
                                                                                 "cpu_tiny"]
  p = colab.preset("auto")                       # the tests run on CPU
  assert p.name == "cpu_tiny" and p.backend == "cpu"
  assert colab.preset("gpu").quickstart["checkpoint"] == colab.BERT
  # offline, cpu_tiny reads the MiniLM files of the weights package, not the Hub
  assert Path(p.quickstart["checkpoint"], "config.json").is_file()
  with pytest.raises(ValueError, match=r"PRESET='v5e': unknown preset; expected one of auto, tpu, gpu, cpu_tiny"):
    colab.preset("v5e")
  with pytest.raises(AttributeError, match=r"preset 'cpu_tiny' has no settings for 'no_such_notebook'"):
    p.no_such_notebook
  # every preset has settings for the same notebooks, with the same keys
  shapes = {name: {nb: sorted(s) for nb, s in notebooks.items()} for name, notebooks in colab.PRESETS.items()}
  assert shapes["tpu"] == shapes["gpu"] and sorted(shapes["cpu_tiny"]) == sorted(shapes["tpu"]), shapes


def test_a_failing_cell_fails_with_its_error(tmp_path):
  import nbformat
  from nbclient.exceptions import CellExecutionError
  nb = nbformat.v4.new_notebook(cells=[
      nbformat.v4.new_code_cell('PRESET = "auto"', metadata={"tags": ["parameters"]}),
      nbformat.v4.new_code_cell("from jaxformers import colab\ncolab.preset(PRESET + '_typo')"),
      nbformat.v4.new_code_cell("print('not reached')")])
  path = tmp_path / "99_broken.ipynb"
  nbformat.write(nb, path)
  with pytest.raises(CellExecutionError, match=r"PRESET='cpu_tiny_typo': unknown preset"):
    execute(path, tmp_path)


@pytest.mark.parametrize("src", SOURCES, ids=[p.stem for p in SOURCES])
def test_every_notebook_installs_with_the_one_install_cell(src):
  from jaxformers import colab
  code = [c for c in jupytext.read(src).cells if c.cell_type == "code"]
  assert 'JAXFORMERS_SOURCE = ""' in code[0].source, f"{src.name}: the parameters cell sets JAXFORMERS_SOURCE"
  assert code[1].source.strip() == colab.INSTALL_CELL.strip(), \
      f"{src.name}: the second code cell must be jaxformers.colab.INSTALL_CELL word for word"


def test_install_cell_tells_this_project_from_the_unrelated_jaxformers(tmp_path):
  """The cell's check reads the marker of whatever ``jaxformers`` is importable: the index's unrelated package
  (here a stand-in with its version line) is not this project, the checkout is; the installed wheel's
  distribution name is checked in tests/test_wheel.py."""
  import subprocess
  import sys
  from jaxformers import colab
  other = tmp_path / "other" / "jaxformers"
  other.mkdir(parents=True)
  (other / "__init__.py").write_text('__version__ = "0.0.1.dev1"\n')
  check = colab.INSTALL_CELL.split("\nif importlib.util.find_spec")[0] + "\nprint(this_jaxformers())\n"
  for path, want in ((other.parent, "False"), (ROOT, "True")):
    p = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(path)!r})\n" + check],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert p.stdout.strip() == want, (path, p.stdout, p.stderr[-2000:])
  # the jax stack is pinned to what the runtime has: a constraints file of its jax* / libtpu* / nvidia-* versions
  assert '"-c", "/tmp/jaxformers-keep.txt"' in colab.INSTALL_CELL and '"jax", "libtpu", "nvidia-"' in \
      colab.INSTALL_CELL


def test_auto_preset_refuses_a_cpu_backend_on_an_accelerator_runtime(monkeypatch):
  from jaxformers import colab
  for var in ("COLAB_TPU_ADDR", "TPU_NAME", "TPU_ACCELERATOR_TYPE"):
    monkeypatch.delenv(var, raising=False)
  import shutil
  monkeypatch.setattr(shutil, "which", lambda _: None)      # no nvidia-smi
  assert colab.accelerator_hint() is None or Path("/dev/accel0").exists()
  monkeypatch.setenv("TPU_NAME", "local")
  assert colab.accelerator_hint() == "$TPU_NAME is set"
  with pytest.raises(RuntimeError, match=r"PRESET='auto' found only jax's cpu backend, but this runtime has an "
                                         r"accelerator \(\$TPU_NAME is set\)"):
    colab.preset("auto")
  assert colab.preset("cpu_tiny").name == "cpu_tiny"     # named explicitly, the CPU run is the user's choice
