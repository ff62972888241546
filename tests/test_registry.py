"""`mllm_tune.registry`: explicit registration from a module list, duplicates refused; the
tuning and penalty registries are filled through it."""
from __future__ import annotations

from types import ModuleType

import pytest

import mllm_tune as mt
from mllm_tune import penalties, registry


def _module(name: str, **classes) -> ModuleType:
  mod = ModuleType(name)
  for key, reg_name in classes.items():
    cls = type(key, (), {"__module__": name})
    setattr(mod, key, registry.mark(cls, reg_name) if reg_name else cls)
  return mod


def test_collect_adds_marked_classes_the_module_defines_and_refuses_a_taken_name():
  reg: dict = {}
  mod = _module("pkg.a", A="alpha", B=None)
  mod.Imported = registry.mark(type("Imported", (), {"__module__": "pkg.other"}), "beta")
  registry.collect(mod, reg, ValueError, "thing")
  assert list(reg) == ["alpha"] and reg["alpha"].name == "alpha"  # not B, not the import
  registry.collect(mod, reg, ValueError, "thing")  # the same class again: fine
  with pytest.raises(KeyError, match=r"thing name 'alpha' is registered twice \(pkg.a, pkg.b\)"):
    registry.collect(_module("pkg.b", C="alpha"), reg, KeyError, "thing")


def test_package_registries_hold_every_listed_module():
  assert {"lora", "dora", "pissa", "vera", "spider", "ia3", "freeze"} <= set(mt.tuning.names())
  assert {"ewc", "l2sp", "lwf", "gift", "mas"} <= set(penalties.REGISTRY)
  with pytest.raises(mt.tuning.MethodError, match="registered twice"):
    mt.tuning.api.register_module(_module("elsewhere", X="lora"))


def test_instantiate_names_unknown_names_and_options():
  import dataclasses

  @dataclasses.dataclass
  class Thing:
    size: int = 1
  reg = {"thing": Thing}
  assert registry.instantiate(reg, "thing", {"size": 3}, KeyError, "widget") == Thing(3)
  with pytest.raises(KeyError, match="unknown widget 'thang'; known: thing"):
    registry.instantiate(reg, "thang", {}, KeyError, "widget")
  with pytest.raises(KeyError, match=r"widget 'thing' has no option\(s\) \['sise'\]"):
    registry.instantiate(reg, "thing", {"sise": 3}, KeyError, "widget")
