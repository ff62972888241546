"""Shared helpers for trainer tests: tiny configs and subprocess runners."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from tests.helpers import ROOT  # noqa: F401  (re-exported: trainer tests import it from here)
from tests.helpers.env import cpu_env


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


def lora_train_args(model_dir: str, data_dir: str, run_dir: str, steps: int, batch_size: int,
                    *extra: str, seq_len: int = 160, learning_rate: float = 1e-2) -> list[str]:
  """`mllm-tune train` arguments: the LoRA recipe on `model_dir`, LLaVA JSON data written by
  `write_llava_dataset(data_dir, ...)`, a loss line every step and one checkpoint at the end;
  `extra` adds or overrides `--config.*` flags."""
  return ["train", "--config=configs/experiments/llava_lora.py", "--no-progress",
          f"--config.model.path={model_dir}",
          f"--config.data.json_path={os.path.join(data_dir, 'data.json')}",
          f"--config.data.image_folder={os.path.join(data_dir, 'images')}",
          f"--config.data.seq_len={seq_len}", f"--config.data.batch_size={batch_size}",
          "--config.data.num_workers=0", f"--config.train.steps={steps}",
          "--config.train.log_every=1", f"--config.train.save_every={steps}",
          f"--config.run_dir={run_dir}", f"--config.optimizer.learning_rate={learning_rate}",
          *extra]


def run_cli(args: list[str], env_extra: dict | None = None, devices: int = 1, timeout=600):
  env = cpu_env(devices, **(env_extra or {}))
  return subprocess.run([sys.executable, "-m", "mllm_tune.cli", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def run_processes(n: int, args: list[str], cwd: str, devices_per_proc: int = 1,
                  timeout: int = 600) -> tuple[subprocess.CompletedProcess, list[str]]:
  """`launch/local_multiprocess.sh n` (n local processes forming one jax.distributed job) with
  `mllm-tune train` arguments; returns the result and each process's log (written in cwd)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, PYTHON=sys.executable, DEVICES_PER_PROC=str(devices_per_proc),
             PORT=str(port))
  res = subprocess.run(["bash", f"{ROOT}/launch/local_multiprocess.sh", str(n), *args],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  logs = []
  for i in range(n):
    with open(os.path.join(cwd, f"proc_{i}.log")) as f:
      logs.append(f.read())
  return res, logs


def losses(run_dir: str, key: str = "loss") -> dict[int, float]:
  """step -> metrics.jsonl's `key` (the loss by default)."""
  out = {}
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      out[r["step"]] = r[key]
  return out
