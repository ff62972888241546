"""The environment of the suite's subprocesses (CLI runs, multi-device and multi-process
scripts): this process's environment (with the suite's XLA settings from tests/conftest.py),
JAX on the CPU, and `devices` host devices."""
from __future__ import annotations

import os


def cpu_env(devices: int = 1, **extra: str) -> dict[str, str]:
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
  return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags.strip(), **extra}
