"""The import-layer rule of docs/architecture.md: a module of `mllm_tune` imports only modules of
its own layer or a lower one, function-local imports included; no two packages import each other
and no module imports itself back through others. Parsed with `ast` (nothing is imported)."""
from __future__ import annotations

import ast
import os

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mllm_tune")

# Top-level module or package of mllm_tune -> layer (lower never imports higher).
LAYERS = {
    "pytree": 0, "losses": 0, "registry": 0,
    "models": 1,
    "checkpoints": 2, "data": 2,
    "importance": 3,
    "tuning": 4,
    "penalties": 5,
    "eval": 6,
    "posthoc": 7,
    "train": 8,
    "benchmark": 9,
    "cli": 10, "demo": 10, "__init__": 10,
    "configs": 10,  # the shipped training configs (they name benchmark presets)
}
# Modules whose layer differs from their package's.
MODULE_LAYERS = {
    # documented paths kept as aliases of what moved to tuning/ (README names them)
    "mllm_tune.checkpoints.peft": LAYERS["tuning"],
    "mllm_tune.checkpoints.adapters": LAYERS["tuning"],
}
# Known upward edges (importer, imported) that this rule does not allow yet; each says why.
KNOWN: set = set()


def _modules():
  for root, _, files in os.walk(PKG):
    for f in sorted(files):
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PKG))[:-3]
        name = rel.replace(os.sep, ".")
        yield (name[:-len(".__init__")] if name.endswith(".__init__") else name,
               os.path.join(root, f), f == "__init__.py")


MODULES = {name: (path, is_pkg) for name, path, is_pkg in _modules()}


def layer_of(module: str) -> int:
  if module in MODULE_LAYERS:
    return MODULE_LAYERS[module]
  parts = module.split(".")
  return LAYERS["__init__" if len(parts) == 1 else parts[1]]


def imports(module: str) -> set[str]:
  """Every mllm_tune module `module` imports, at any depth of its body."""
  path, is_pkg = MODULES[module]
  package = module if is_pkg else module.rsplit(".", 1)[0]
  out = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        up = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(up + ([node.module] if node.module else []))
      # `from pkg import submodule` imports the submodule
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    else:
      continue
    out.update(t for t in targets if t.split(".")[0] == "mllm_tune" and t != module)
  return out


def test_every_module_has_a_layer():
  missing = sorted({m.split(".")[1] for m in MODULES if "." in m} - set(LAYERS))
  assert not missing, f"packages without a layer in LAYERS: {missing}"


def test_no_import_goes_up_a_layer():
  bad = []
  for module in MODULES:
    for target in imports(module):
      if target not in MODULES:
        raise AssertionError(f"{module} imports {target}, which does not exist")
      if layer_of(target) > layer_of(module) and (module, target) not in KNOWN:
        bad.append(f"{module} (L{layer_of(module)}) -> {target} (L{layer_of(target)})")
  assert not bad, "imports against the layer rule:\n" + "\n".join(sorted(bad))


def test_known_exceptions_still_exist():
  stale = [e for e in KNOWN if e[0] not in MODULES or e[1] not in imports(e[0])]
  assert not stale, f"remove these from KNOWN, the import is gone: {stale}"


def test_no_two_packages_import_each_other():
  pkg = lambda m: m.split(".")[1] if "." in m else "__init__"
  edges = {(pkg(m), pkg(t)) for m in MODULES for t in imports(m) if pkg(m) != pkg(t)
           and (m, t) not in KNOWN and m not in MODULE_LAYERS}
  cycles = sorted(f"{a} <-> {b}" for a, b in edges if (b, a) in edges and a < b)
  assert not cycles, f"package-level import cycles: {cycles}"


def test_no_module_import_cycle():
  graph = {m: {t for t in imports(m) if t in MODULES} for m in MODULES}

  def reaches(start, goal):
    seen, todo = set(), list(graph[start])
    while todo:
      m = todo.pop()
      if m == goal:
        return True
      if m not in seen:
        seen.add(m)
        todo.extend(graph[m])
    return False

  cycles = sorted(f"{m} <-> {t}" for m in graph for t in graph[m] if m < t and reaches(t, m))
  assert not cycles, f"module import cycles (through these edges): {cycles}"
