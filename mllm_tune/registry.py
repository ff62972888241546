"""Name -> class registries filled from an explicit list of modules (tuning methods, penalties).

A class is marked with `mark(cls, name)` (its package's `@register(name)` decorator does that);
`collect(module, registry, error, what)` then adds every marked class that `module` itself
defines. Registration happens where the package lists its modules, never as a side effect of
importing one.
"""
from __future__ import annotations

import dataclasses
from types import ModuleType


def mark(cls: type, name: str) -> type:
  cls.name = name
  cls._registry_name = name
  return cls


def collect(module: ModuleType, registry: dict, error: type[Exception], what: str) -> None:
  """Adds the classes `module` defines with a registry name; a name taken by another class
  raises `error` naming both modules."""
  for obj in vars(module).values():
    if (isinstance(obj, type) and "_registry_name" in vars(obj)
        and obj.__module__ == module.__name__):
      name = obj._registry_name
      if registry.get(name, obj) is not obj:
        raise error(f"{what} name '{name}' is registered twice "
                    f"({registry[name].__module__}, {module.__name__})")
      registry[name] = obj


def instantiate(registry: dict, name: str, options: dict, error: type[Exception], what: str):
  """`registry[name](**options)`; an unknown name or option raises `error` listing the known
  names or the class's fields (`what`: "tuning method", "penalty", ...)."""
  if name not in registry:
    raise error(f"unknown {what} '{name}'; known: {', '.join(sorted(registry))}")
  cls = registry[name]
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(options) - fields)
  if unknown:
    raise error(f"{what.split()[-1]} '{name}' has no option(s) {unknown}; options: "
                f"{sorted(fields)}")
  return cls(**options)
