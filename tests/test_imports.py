"""The package's modules import one another without a cycle, counting imports inside functions too."""
from __future__ import annotations

import ast
from pathlib import Path

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
