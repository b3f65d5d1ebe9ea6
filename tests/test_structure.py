"""The package's shape: short functions, and trainer tasks that see the run only through a frozen context."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from pathlib import Path

import pytest

import jaxformers

PACKAGE = Path(jaxformers.__file__).parent
MAX_LINES = 80


def long_functions(root: Path, limit: int = MAX_LINES) -> list[str]:
  """``file:function:lines`` of every function (methods and nested ones included) under ``root`` longer than
  ``limit`` lines, from its ``def`` line to its last line."""
  out = []
  for path in sorted(root.rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = node.end_lineno - node.lineno + 1
        if n > limit:
          out.append(f"{path.relative_to(root.parent)}:{node.name}:{n}")
  return out


def test_no_function_is_longer_than_80_lines():
  long = long_functions(PACKAGE)
  assert not long, f"functions over {MAX_LINES} lines (file:function:lines): " + ", ".join(long)


def test_the_length_check_sees_a_long_function(tmp_path):
  pkg = tmp_path / "pkg"
  pkg.mkdir()
  body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
  (pkg / "m.py").write_text(f"def short():\n  return 1\n\n\nclass A:\n  def long(self):\n{body}\n")
  assert long_functions(pkg) == [f"pkg/m.py:long:{MAX_LINES + 1}"]


# --- the trainer's tasks ----------------------------------------------------------------------------------------------
HOOKS = ("prepare", "train_batches", "batch_shardings", "finish", "follow_up", "record_follow_up")


def test_task_hooks_take_a_frozen_context_of_plain_values():
  from jaxformers.train.context import TaskContext
  from jaxformers.train.task_base import Task
  assert dataclasses.is_dataclass(TaskContext) and TaskContext.__dataclass_params__.frozen
  for name in HOOKS:
    params = list(inspect.signature(getattr(Task, name)).parameters)
    assert params[1] == "ctx", (name, params)
    hints = typing.get_type_hints(getattr(Task, name))
    assert hints["ctx"] is TaskContext, name


def test_wrappers_forward_every_task_member_explicitly():
  """No ``__getattr__``: Distilled and Searched define (or take from TaskWrapper, which forwards one by one) every
  attribute and method of Task, so none silently falls back to Task's own default."""
  from jaxformers.train.defaults import base_config
  from jaxformers.train.distillation import Distilled
  from jaxformers.train.search import Searched
  from jaxformers.train.task_base import Task, TaskWrapper
  from jaxformers.train.tasks import make_task
  members = {n for n in dir(Task) if not n.startswith("_")} | set(vars(make_task(base_config())))
  for cls in (TaskWrapper, Distilled, Searched):
    assert "__getattr__" not in {n for k in cls.__mro__ for n in vars(k)}, cls
    owner = {n: next(k for k in cls.__mro__ if n in vars(k)) for n in members if any(n in vars(k) for k in cls.__mro__)}
    missing = sorted(n for n in members if owner.get(n, Task) is Task)
    assert not missing, f"{cls.__name__} takes these from Task instead of its inner task: {missing}"


def test_a_run_gives_its_task_a_context_that_cannot_be_changed(tmp_path):
  from jaxformers.train.context import TaskContext
  from jaxformers.train.loop import Run
  from tests.train_helpers import load_config
  r = Run(load_config("tiny", "steps=1"), tmp_path / "run")
  ctx = r.context
  assert isinstance(ctx, TaskContext)
  assert not any(f.name in ("run", "task") for f in dataclasses.fields(ctx))
  with pytest.raises(dataclasses.FrozenInstanceError):
    ctx.max_length = 3
  with pytest.raises(TypeError):
    ctx.special["pad"] = 7
  with pytest.raises(AttributeError):
    ctx.data.batch_size = 1
  assert ctx.max_length == r.max_length and ctx.model_config == r.cfg and ctx.workdir == r.workdir
  assert len(ctx.blocks_with_attention) == r.cfg.num_layers
