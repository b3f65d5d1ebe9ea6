"""The package as a user installs it: ``python -m build`` makes a wheel from a clean copy of the tracked files, the
wheel installs into a fresh virtual environment, and there the default config trains (train.py and
configs/default.py copied beside it, outside the checkout, so only the installed package can be imported).

No network: the build runs without isolation (the test environment's setuptools) and the fresh environment sees
the test environment's installed packages (jax, flax, ...) through a path file, while the project itself comes from
the wheel alone (installed with --no-deps, the editable checkout's import hook left out).
"""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _env():
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  env["JAX_PLATFORMS"] = "cpu"
  return env


def test_built_wheel_installs_in_a_fresh_venv_and_trains_the_default_config(tmp_path):
  pytest.importorskip("build", reason="the test extra installs build")
  src = tmp_path / "src"
  tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
  for name in filter(None, tracked.decode().split("\0")):
    if (ROOT / name).is_file():
      (src / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(ROOT / name, src / name)
  p = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist")],
                     cwd=src, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  wheels = list((tmp_path / "dist").glob("*.whl"))
  assert [w.name for w in wheels] == ["jaxformers_encoders-0.1.0-py3-none-any.whl"]   # not the index's "jaxformers"

  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
  py = venv / "bin" / "python"
  site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip())
  # the dependencies, as a plain path (no .pth processing there, so no editable jaxformers comes with them)
  (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
  p = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                      str(wheels[0])], capture_output=True, text=True, timeout=300, env=_env())
  assert p.returncode == 0, p.stderr[-3000:]

  run_dir = tmp_path / "user"
  (run_dir / "configs").mkdir(parents=True)
  shutil.copy2(ROOT / "train.py", run_dir / "train.py")
  shutil.copy2(ROOT / "configs" / "default.py", run_dir / "configs" / "default.py")
  p = subprocess.run([str(py), "-c", "import importlib.metadata as m, jaxformers; "
                      "print(jaxformers.__file__, jaxformers.__project__, m.version('jaxformers-encoders'))"],
                     cwd=run_dir, capture_output=True, text=True, timeout=300, env=_env())
  assert p.returncode == 0, p.stderr[-3000:]
  where, project, version = p.stdout.split()
  assert Path(where).is_relative_to(site) and project == "jaxformers-encoders" and version == "0.1.0"
  p = subprocess.run([str(venv / "bin" / "jaxformers"), "layouts"], capture_output=True, text=True, timeout=300,
                     env=_env())
  assert p.returncode == 0 and "serial" in p.stdout, p.stderr[-3000:]
  p = subprocess.run([str(py), "train.py", "--config", "configs/default.py", "--workdir", str(tmp_path / "run"),
                      "--config.train.num_steps=3", "--config.data.max_train_examples=64",
                      "--config.train.progress=False"], cwd=run_dir, capture_output=True, text=True, timeout=900,
                     env=_env())
  assert p.returncode == 0, p.stderr[-3000:]
  assert "final eval: validation/loss=" in p.stdout and "steps=3 " in p.stdout
  assert (tmp_path / "run" / "summary.json").is_file()
