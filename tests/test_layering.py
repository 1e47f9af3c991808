"""The package's import graph: no cycles, and lower layers never import higher ones."""

import ast
import os
import pathlib

import cuma_jax

PACKAGE_DIR = os.path.dirname(cuma_jax.__file__)
# Layers, lowest first: a module may import its own layer and those below it.
LAYERS = (
  ("registry", "errors", "platforms", "fields", "sharding", "params", "fingerprint"),
  ("layers",),
  ("models", "checkpoints", "data"),
  ("tiny",),  # offline stand-ins: below the training loop and the presets that warm them up
  ("training", "encoders", "generation"),
  ("evaluation", "schema", "presets", "overrides"),
  ("runtime", "analysis", "figures"),
  ("tasks",),
  ("api", "interop"),
  ("main", "param_count", "plan", "export"),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _module_name(path):
  rel = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))[: -len(".py")]
  parts = rel.split(os.sep)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path, modules):
  """cuma_jax modules imported by the file at ``path`` (at any depth in the file)."""
  found = set()
  for node in ast.walk(ast.parse(pathlib.Path(path).read_text())):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.startswith("cuma_jax"))
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cuma_jax"):
      # `from cuma_jax.x import y` imports the submodule cuma_jax.x.y when there is one,
      # else the name y of cuma_jax.x.
      for alias in node.names:
        submodule = f"{node.module}.{alias.name}"
        found.add(submodule if submodule in modules else node.module)
  return found


def _graph():
  modules = {}
  for root, _, files in os.walk(PACKAGE_DIR):
    for f in files:
      if f.endswith(".py"):
        modules[_module_name(os.path.join(root, f))] = os.path.join(root, f)
  return {
    m: sorted(i for i in _imports(p, modules) if i in modules and i != m)
    for m, p in modules.items()
  }


def _layer(module):
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_has_a_layer():
  unranked = sorted({_layer(m) for m in _graph()} - set(RANK) - {"__init__"})
  assert not unranked, f"add {unranked} to LAYERS"


def test_lower_layers_never_import_higher_ones():
  violations = [
    f"{m} (layer {RANK[_layer(m)]}) imports {i} (layer {RANK[_layer(i)]})"
    for m, imports in _graph().items()
    if _layer(m) in RANK
    for i in imports
    if _layer(i) in RANK and RANK[_layer(i)] > RANK[_layer(m)]
  ]
  assert not violations, "\n".join(violations)


def test_import_graph_has_no_cycle():
  graph = _graph()
  state, stack, cycles = {}, [], []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in graph.get(node, ()):
      if state.get(nxt) == "open":
        cycles.append(stack[stack.index(nxt) :] + [nxt])
      elif nxt not in state:
        visit(nxt)
    stack.pop()
    state[node] = "done"

  for node in graph:
    if node not in state:
      visit(node)
  assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_checker_finds_a_planted_cycle(monkeypatch):
  """The cycle test can fail: a graph with a -> b -> a is reported."""
  planted = {"cuma_jax.a": ["cuma_jax.b"], "cuma_jax.b": ["cuma_jax.a"]}
  monkeypatch.setattr(__import__(__name__), "_graph", lambda: planted)
  try:
    test_import_graph_has_no_cycle()
  except AssertionError as e:
    assert "cuma_jax.a -> cuma_jax.b -> cuma_jax.a" in str(e)
  else:
    raise AssertionError("a planted cycle was not found")
