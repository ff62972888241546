"""The layout of tests/ (tests/README.md): every package of `mllm_tune` has its tests folder at the
same relative path, every tests folder is a Python package (so equal basenames in different folders
import under distinct names), shared code lives in tests/helpers/, and no module under tests/
imports a test module (function-local imports and subprocess scripts in strings included)."""
from __future__ import annotations

import ast
import os

from tests.helpers import ROOT

TESTS = os.path.join(ROOT, "tests")
PKG = os.path.join(ROOT, "mllm_tune")
NOT_A_PACKAGE = {"helpers", "perf"}  # tests/ folders that mirror no package (perf/: the scripts)


def _folders(top: str) -> list[str]:
  """Folders under `top` (itself included) as paths relative to `top`, '.' for `top`."""
  out = []
  for root, dirs, _ in os.walk(top):
    dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
    out.append(os.path.relpath(root, top))
  return out


def _modules(node: ast.AST):
  """Module names an import statement can bind: `from a import b` gives "a" and "a.b"."""
  if isinstance(node, ast.Import):
    for a in node.names:
      yield a.name
  elif isinstance(node, ast.ImportFrom):
    mod = "." * node.level + (node.module or "")
    yield mod
    for a in node.names:
      yield f"{mod}.{a.name}"


def _imports(path: str):
  """(line, module) for every import in the file, and for every import line of a string
  constant (the scripts tests hand to a subprocess)."""
  tree = ast.parse(open(path).read(), path)
  for node in ast.walk(tree):
    for mod in _modules(node):
      yield node.lineno, mod
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
      for line in node.value.splitlines():
        line = line.strip()
        if line.startswith(("import ", "from ")):
          try:
            stmt = ast.parse(line).body[0]
          except SyntaxError:
            continue
          for mod in _modules(stmt):
            yield node.lineno, mod


def _has_tests(d: str) -> bool:
  path = os.path.join(TESTS, d)
  return os.path.isdir(path) and any(f.startswith("test_") and f.endswith(".py")
                                     for f in os.listdir(path))


def test_every_package_has_its_tests_folder_and_every_tests_folder_is_a_package():
  packages = [d for d in _folders(PKG)
              if d != "." and os.path.exists(os.path.join(PKG, d, "__init__.py"))]
  assert packages
  missing = [d for d in packages if not _has_tests(d)]
  assert not missing, f"mllm_tune packages without tests/<package>/test_*.py: {missing}"
  folders = _folders(TESTS)
  no_init = [d for d in folders if not os.path.exists(os.path.join(TESTS, d, "__init__.py"))]
  assert not no_init, f"tests folders without __init__.py (equal basenames would clash): {no_init}"
  stray = [d for d in folders if d != "." and d.split(os.sep)[0] not in NOT_A_PACKAGE
           and not os.path.isdir(os.path.join(PKG, d))]
  assert not stray, f"tests folders that mirror no mllm_tune package: {stray}"


def test_only_test_modules_outside_helpers():
  bad = []
  for d in _folders(TESTS):
    for f in sorted(os.listdir(os.path.join(TESTS, d))):
      if f.endswith(".py") and d.split(os.sep)[0] != "helpers":
        if not (f.startswith("test_") or f == "__init__.py" or (d == "." and f == "conftest.py")):
          bad.append(os.path.join(d, f))
      elif f.startswith("test_") and f.endswith(".py"):
        bad.append(os.path.join(d, f))
  assert not bad, f"helpers belong in tests/helpers/, tests outside it: {bad}"


def test_no_module_under_tests_imports_a_test_module():
  bad = []
  for d in _folders(TESTS):
    for f in sorted(os.listdir(os.path.join(TESTS, d))):
      if f.endswith(".py"):
        path = os.path.join(TESTS, d, f)
        for line, mod in _imports(path):
          if any(part.startswith(("test_", "conftest")) for part in mod.split(".")):
            bad.append(f"{os.path.relpath(path, ROOT)}:{line} imports {mod}")
  assert not bad, "test modules import helpers (tests/helpers/), not each other:\n" + "\n".join(bad)
