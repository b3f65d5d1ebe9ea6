"""The package's modules import one another without a cycle, counting imports inside functions too."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import jaxformers

PACKAGE = Path(jaxformers.__file__).parent


def module_name(path: Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
  """Every jaxformers module ``path`` imports; ``from a.b import c`` counts ``a.b.c`` when that is a module,
  and ``a.b`` when some imported name is defined there."""
  out = set()
  this = module_name(path)
  package = this if path.name == "__init__.py" else this.rpartition(".")[0]
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      submodules = {f"{base}.{a.name}" for a in node.names} & modules
      out.update(submodules)
      if len(submodules) < len(node.names):   # names defined in ``base`` itself
        out.add(base)
  return {m for m in out if m in modules and m != this}


def import_graph() -> dict[str, set[str]]:
  files = sorted(PACKAGE.rglob("*.py"))
  modules = {module_name(f) for f in files}
  return {module_name(f): imported_modules(f, modules) for f in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """The first cycle found in ``graph`` (module -> modules it imports), as a closed path, or None."""
  colour, stack = {}, []

  def visit(m):
    colour[m] = "grey"
    stack.append(m)
    for n in sorted(graph[m]):
      if colour.get(n) == "grey":
        return stack[stack.index(n):] + [n]
      if n not in colour:
        found = visit(n)
        if found:
          return found
    stack.pop()
    colour[m] = "black"
    return None

  for m in sorted(graph):
    if m not in colour:
      found = visit(m)
      if found:
        return found
  return None


def test_no_import_cycle():
  cycle = find_cycle(import_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_sees_a_cycle():
  graph = {"jaxformers.a": {"jaxformers.b"}, "jaxformers.b": {"jaxformers.c"}, "jaxformers.c": {"jaxformers.a"}}
  assert find_cycle(graph) == ["jaxformers.a", "jaxformers.b", "jaxformers.c", "jaxformers.a"]


def test_kernels_do_not_depend_on_the_model():
  graph = import_graph()
  for m, deps in graph.items():
    if m.startswith("jaxformers.kernels"):
      assert not {d for d in deps if d in ("jaxformers.config", "jaxformers.models", "jaxformers.blocks")}, m


# --- floors ---------------------------------------------------------------------------------------------------------
# A room is a top-level module or a sub-package of jaxformers (a folder counts as one room, whatever its files import
# among themselves). A room's floor is one above the highest room it imports; with no loop between rooms every import
# runs down to a lower floor. The package's face (jaxformers/__init__.py) only hands names on: no room imports it.


def room(module: str) -> str:
  return ".".join(module.split(".")[:2])


def room_graph(graph: dict[str, set[str]]) -> tuple[dict[str, set[str]], dict[tuple[str, str], list[str]]]:
  """Rooms -> the rooms they import, and for each such arrow the module imports behind it."""
  rooms, why = {}, {}
  for m, deps in graph.items():
    if m == "jaxformers":
      continue
    rooms.setdefault(room(m), set())
    for d in deps:
      if d != "jaxformers" and room(d) != room(m):
        rooms[room(m)].add(room(d))
        why.setdefault((room(m), room(d)), []).append(f"{m} -> {d}")
  return rooms, why


def floors(rooms: dict[str, set[str]]) -> dict[str, int]:
  """Each room's floor (1 = imports no other room); raises naming a loop when there is one."""
  cycle = find_cycle(rooms)
  if cycle:
    raise ValueError("rooms import each other in a loop: " + " -> ".join(cycle))
  out = {}

  def floor(r):
    if r not in out:
      out[r] = 1 + max((floor(d) for d in rooms[r]), default=0)
    return out[r]
  for r in rooms:
    floor(r)
  return out


def test_every_import_runs_down_a_floor():
  rooms, why = room_graph(import_graph())
  cycle = find_cycle(rooms)
  if cycle:
    arrows = [f"{a} -> {b}: {', '.join(why[a, b])}" for a, b in zip(cycle, cycle[1:])]
    raise AssertionError("an import runs back up a floor (rooms in a loop):\n  " + "\n  ".join(arrows))
  level = floors(rooms)
  for (a, b), lines in why.items():
    assert level[a] > level[b], f"{a} (floor {level[a]}) imports {b} (floor {level[b]}): {lines}"


def test_no_room_imports_the_package_face():
  graph = import_graph()
  assert not {m for m, deps in graph.items() if "jaxformers" in deps and m != "jaxformers"}


def test_floor_check_sees_an_import_back_up():
  graph = {"jaxformers.low": set(), "jaxformers.mid.a": {"jaxformers.low"}, "jaxformers.mid.b": set(),
           "jaxformers.high": {"jaxformers.mid.b"}}
  rooms, _ = room_graph(graph)
  assert floors(rooms) == {"jaxformers.low": 1, "jaxformers.mid": 2, "jaxformers.high": 3}
  graph["jaxformers.low"] = {"jaxformers.high"}    # the ground floor reaches up: now a loop of rooms
  with pytest.raises(ValueError, match="loop"):
    floors(room_graph(graph)[0])


# --- imports inside functions ----------------------------------------------------------------------------------------
# Function-level imports are for optional or heavy dependencies only, and each says why on its line (a comment):
# jaxformers' own modules are imported at the top, where the floors above can see them.


def unexplained_function_imports(path: Path, root: Path = PACKAGE.parent) -> list[str]:
  lines = path.read_text().split("\n")
  out = []
  for fn in ast.walk(ast.parse("\n".join(lines))):
    if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
      for node in ast.walk(fn):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
          text = "\n".join(lines[node.lineno - 1:node.end_lineno])
          if "#" not in text:
            out.append(f"{path.relative_to(root)}:{node.lineno}: {text.strip()}")
  return sorted(set(out))


def test_function_level_imports_say_why():
  found = [line for f in sorted(PACKAGE.rglob("*.py")) for line in unexplained_function_imports(f)]
  assert not found, "imports inside functions without a comment saying why:\n  " + "\n  ".join(found)


def test_function_import_check_sees_an_unexplained_one(tmp_path):
  f = tmp_path / "probe.py"
  f.write_text("def f():\n  from jaxformers import models\n  import torch  # optional: the torch extra\n")
  assert unexplained_function_imports(f, tmp_path) == ["probe.py:2: from jaxformers import models"]
