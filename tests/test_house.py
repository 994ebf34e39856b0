"""House rules of the import graph (issue 28), read from the source with ``ast``:

* the jlr/ import graph has no cycle -- imports inside functions count, since a lazy import
  only hides a cycle until the function runs;
* no module of jlr/, examples/ or benchmarks/ uses another module's private name: neither
  ``from X import _name`` nor ``module._name`` on a module it imported (``_``-prefixed
  module paths such as ``jax._src`` included). What a caller needs is public, e.g. in
  :mod:`jlr.select`.

Run ``python tests/test_house.py`` for the full report.
"""

from __future__ import annotations

import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHECKED = ("jlr", "examples", "benchmarks")


def _private(name: str) -> bool:
  return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _sources(top: str) -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted((ROOT / top).rglob("*.py"))}


JLR = _sources("jlr")


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
  if not node.level:
    return node.module or ""
  base = module.split(".")
  base = base[:len(base) - node.level + (1 if is_package else 0)]
  return ".".join(base + ([node.module] if node.module else []))


def scan(module: str, source: str, label: str, is_package: bool = False
         ) -> tuple[set[str], list[str]]:
  """``(jlr modules imported anywhere in the source, private-name uses)``; ``label``
  (the file) names each use, with its line."""
  tree = ast.parse(source, label)
  deps, bad, modules = set(), [], {}  # modules: local name -> module it is bound to
  where = lambda node: f"{label}:{node.lineno}"  # noqa: E731
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if any(_private(p) for p in alias.name.split(".")):
          bad.append(f"{where(node)}: import {alias.name}")
        if alias.name in JLR:
          deps.add(alias.name)
        if alias.asname:
          modules[alias.asname] = alias.name
        else:
          modules.setdefault(alias.name.split(".")[0], alias.name.split(".")[0])
    elif isinstance(node, ast.ImportFrom):
      source = _absolute(node, module, is_package)
      if source != "__future__" and any(_private(p) for p in source.split(".")):
        bad.append(f"{where(node)}: from {source} import ...")
      for alias in node.names:
        sub = f"{source}.{alias.name}"
        if sub in JLR:
          deps.add(sub)
          modules[alias.asname or alias.name] = sub
        elif source in JLR:
          deps.add(source)
        if _private(alias.name):
          bad.append(f"{where(node)}: from {source} import {alias.name}")
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and _private(node.attr):
      chain, value = [], node.value
      while isinstance(value, ast.Attribute):
        chain.append(value.attr)
        value = value.value
      if isinstance(value, ast.Name) and value.id in modules:
        dotted = ".".join([modules[value.id]] + chain[::-1])
        if dotted == modules[value.id] or dotted in JLR:  # a module, not an object in it
          bad.append(f"{where(node)}: {dotted}.{node.attr}")
  deps.discard(module)
  return deps, bad


def graph() -> tuple[dict[str, set[str]], list[str]]:
  edges, bad = {}, []
  for top in CHECKED:
    for module, path in _sources(top).items():
      deps, b = scan(module, path.read_text(), str(path.relative_to(ROOT)),
                     path.name == "__init__.py")
      bad += b
      if top == "jlr":
        edges[module] = deps
  return edges, bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in sorted(edges.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return out


def test_jlr_import_graph_has_no_cycle():
  edges, _ = graph()
  assert "jlr.transforms" in edges and edges["jlr.transforms"]  # the scan sees imports
  assert cycles(edges) == []


def test_no_module_uses_another_modules_private_names():
  _, bad = graph()
  assert bad == [], "\n".join(bad)


def test_the_checks_catch_what_they_should():
  """A lazy in-function import is an edge; private imports and attributes are named."""
  assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
  src = ("import jax._src.core\nfrom jlr.transforms import _factor\nfrom jlr import svd\n\n"
         "def f():\n  from jlr.report import summary\n  return svd._lowranks, summary\n")
  deps, bad = scan("jlr.probe", src, "probe.py")
  assert deps == {"jlr.transforms", "jlr.svd", "jlr.report"}
  assert [b.split(": ", 1)[1] for b in bad] == [
      "import jax._src.core", "from jlr.transforms import _factor", "jlr.svd._lowranks"]


if __name__ == "__main__":
  edges, bad = graph()
  found = cycles(edges)
  print(f"{len(edges)} jlr modules, {sum(map(len, edges.values()))} import edges")
  print("cycles:", found or "none")
  print("private-name uses:", "none" if not bad else "")
  for b in bad:
    print("  " + b)
  sys.exit(1 if found or bad else 0)


def test_every_source_compiles_without_a_syntax_warning():
  """An invalid escape (``\\ s`` in a docstring) warns on first import today (a
  DeprecationWarning, a SyntaxWarning from Python 3.12) and will be an error: every
  module compiles clean."""
  import warnings
  bad = []
  for top in CHECKED + ("results", "tests"):
    for path in sorted((ROOT / top).rglob("*.py")):
      with warnings.catch_warnings():
        warnings.simplefilter("error", SyntaxWarning)
        warnings.simplefilter("error", DeprecationWarning)
        try:
          compile(path.read_text(), str(path), "exec")
        except SyntaxError as e:
          bad.append(f"{path.relative_to(ROOT)}:{e.lineno}: {e.msg}")
  assert not bad, bad
