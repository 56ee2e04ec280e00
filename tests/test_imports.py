"""The package's import graph has no cycle, and no module in vlm_jax/ is over 400 lines.

The graph is read statically (ast): every `import` and `from ... import` in a module counts as an
edge, at module level or inside a function, since a function-level import is the same dependency
taken later. `from vlm_jax.x import y` is an edge to module `x.y` when that file exists, else to `x`.
A package's `__init__` is not an edge of the modules inside it (Python imports it on the way, but
a submodule never needs its package's names).
"""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINES = 400


def modules(root: str, package: str) -> dict:
  """{dotted module name: file path} of every .py file under root/package."""
  out = {}
  for d, _, names in os.walk(os.path.join(root, package)):
    for n in names:
      if n.endswith(".py"):
        rel = os.path.relpath(os.path.join(d, n), root)[:-3].split(os.sep)
        out[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = os.path.join(d, n)
  return out


def import_graph(root: str, package: str) -> dict:
  """{module: sorted list of the package's modules it imports}."""
  mods = modules(root, package)
  graph = {}
  for name, path in mods.items():
    is_pkg = path.endswith("__init__.py")
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    targets = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom):
        if node.level:
          base = name.split(".") if is_pkg else name.split(".")[:-1]
          base = base[:len(base) - node.level + 1]
          src = ".".join(base + ([node.module] if node.module else []))
        else:
          src = node.module
        for a in node.names:
          targets.add(f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src)
    graph[name] = sorted(t for t in targets if t in mods and t != name and t != package)
  return graph


def find_cycle(graph: dict):
  """One import cycle as [a, b, ..., a], or None."""
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for n in graph.get(m, ()):
      if state.get(n) == "open":
        return stack[stack.index(n):] + [n]
      if n not in state and (found := visit(n)):
        return found
    stack.pop()
    state[m] = "done"
    return None

  for m in sorted(graph):
    if m not in state and (found := visit(m)):
      return found
  return None


def test_the_package_has_no_import_cycle():
  graph = import_graph(REPO, "vlm_jax")
  assert "vlm_jax.train" in graph and "vlm_jax.checkpoint" in graph["vlm_jax.train"]
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_cycle_is_found_and_named(tmp_path):
  pkg = tmp_path / "pkg"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "sub" / "__init__.py").write_text("from pkg.sub import b\n")
  (pkg / "a.py").write_text("import os\nfrom pkg import sub\n")
  (pkg / "sub" / "b.py").write_text("def f():\n  from pkg.sub import c\n")  # function-level counts
  (pkg / "sub" / "c.py").write_text("from .. import a\n")  # relative import
  graph = import_graph(str(tmp_path), "pkg")
  assert graph["pkg.sub.b"] == ["pkg.sub.c"] and graph["pkg.sub.c"] == ["pkg.a"]
  assert find_cycle(graph) == ["pkg.a", "pkg.sub", "pkg.sub.b", "pkg.sub.c", "pkg.a"]
  (pkg / "sub" / "c.py").write_text("import os\n")
  assert find_cycle(import_graph(str(tmp_path), "pkg")) is None


def test_no_module_is_over_400_lines():
  long = {}
  for name, path in modules(REPO, "vlm_jax").items():
    with open(path) as f:
      n = sum(1 for _ in f)
    if n > MAX_LINES:
      long[name] = n
  assert not long, f"modules over {MAX_LINES} lines (split them by role): {long}"
