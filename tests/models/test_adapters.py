"""models/adapters.py owns the adapter leaves: every leaf a registered method writes is in its
table, listed with that method as an owner, and the model reads nothing outside it."""
from __future__ import annotations

import ast
import os

import jax
import pytest

import mllm_tune as mt
from mllm_tune import pytree
from mllm_tune.models import adapters
from tests.helpers.tiny_models import tiny_llava

# (method, options): every method that adds leaves, in the variants that add different ones
CASES = [("lora", dict(dropout=0.1)), ("rslora", {}), ("dora", {}), ("pissa", {}),
         ("lorasculpt", {}), ("vera", dict(dropout=0.1)), ("bitfit", dict(add_missing_bias=True)),
         ("ia3", {}),
         ("adapter", {}), ("parallel_adapter", {}), ("prompt_tuning", dict(num_virtual_tokens=2)),
         ("prefix_tuning", dict(num_virtual_tokens=2)),
         ("prefix_tuning", dict(num_virtual_tokens=2, prefix_projection=False)),
         ("llama_adapter", dict(adapter_len=2, adapter_layers=2)),
         ("llama_adapter", dict(adapter_len=2, adapter_layers=2, gate_fn="tanh")),
         ("vpt", dict(num_tokens=2, dropout=0.1)), ("vpt", dict(num_tokens=2, deep=True))]


@pytest.mark.parametrize("name,options", CASES)
def test_every_leaf_a_method_writes_is_in_the_table(name, options):
  _, params, _ = tiny_llava()
  variables = mt.tuning.get(name, **options).init_variables(jax.random.key(0), params)
  leaves = {p.rsplit("/", 1)[-1] for p in pytree.flatten(variables["adapters"])}
  assert leaves, f"{name} added no adapter leaves"
  for leaf in leaves:
    assert leaf in adapters.LEAVES, f"{name} writes '{leaf}', which models/adapters.py lacks"
    assert name in adapters.LEAVES[leaf].methods, f"'{leaf}' does not list {name} as an owner"


def test_the_table_has_no_unwritten_leaf():
  written = {m for leaf in adapters.LEAVES.values() for m in leaf.methods}
  assert written <= set(mt.tuning.names()), sorted(written - set(mt.tuning.names()))


def test_model_code_spells_no_leaf_name():
  """models/*.py (but adapters.py) read leaves through the constants, never by literal."""
  root = os.path.join(os.path.dirname(adapters.__file__))
  for f in sorted(os.listdir(root)):
    if not f.endswith(".py") or f == "adapters.py":
      continue
    tree = ast.parse(open(os.path.join(root, f)).read())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
             and getattr(n.func, "attr", "") in ("get_variable", "has_variable")]
    for call in calls:
      for arg in call.args[1:]:
        assert not (isinstance(arg, ast.Constant) and arg.value in adapters.LEAVES), (
            f"models/{f}:{call.lineno} spells adapter leaf {arg.value!r}")
