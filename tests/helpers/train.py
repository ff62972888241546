"""Shared helpers for trainer tests: tiny configs and subprocess runners."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import ROOT  # noqa: F401  (re-exported: trainer tests import it from here)


def tiny_cfg(run_dir: str, method: str = "full", steps: int = 5, **train):
  from configs import base
  from configs.methods import lora
  c = base.get_config()
  c.run_dir = run_dir
  if method == "lora":
    c.method = lora.get_config()
    c.method.targets = r"llm/layers_\d+/(attn/(q|v)_proj|mlp/down_proj)"
    c.method.rank = 4
  c.optimizer.learning_rate = 3e-3
  c.optimizer.schedule = "constant"
  c.train.steps = steps
  c.train.log_every = 1
  c.train.save_every = 0
  c.train.update(train)
  c.data.batch_size = 8
  c.data.seq_len = 16
  return c


def run_cli(args: list[str], env_extra: dict | None = None, devices: int = 1, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **(env_extra or {}))
  return subprocess.run([sys.executable, "-m", "mllm_tune.cli", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def losses(run_dir: str) -> dict[int, float]:
  out = {}
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      out[r["step"]] = r["loss"]
  return out
