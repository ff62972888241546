"""Shared helpers of the config tests (no tests here): the shipped config modules of a folder,
and each loaded both ways (the package's file and the repository's thin copy)."""
from __future__ import annotations

import os

from tests.helpers import ROOT

PACKAGE = os.path.join(ROOT, "mllm_tune", "configs")


def names(sub: str) -> list[str]:
  """Config module names (no `__init__`) of `mllm_tune/configs/<sub>`."""
  folder = os.path.join(PACKAGE, sub)
  return sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py") and f != "__init__.py")


def load_both(sub: str, name: str, arg: str = ""):
  """(the package's config, the thin copy's config) of `<sub>/<name>.py` via `load_config`."""
  from mllm_tune.train.config_io import load_config
  rel = os.path.join(sub, name + ".py")
  suffix = f":{arg}" if arg else ""
  return (load_config(os.path.join(PACKAGE, rel) + suffix),
          load_config(os.path.join(ROOT, "configs", rel) + suffix))
