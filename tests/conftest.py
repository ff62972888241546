"""Test-session setup.

- One torch thread, so PyTorch reference computations do not fight XLA's thread pool for the
  2 cores (oversubscription made HF `generate` calls up to 100x slower).
- A JAX persistent compilation cache in a fresh per-session temporary directory. Many tests build
  the same tiny models and train steps (in this process and in CLI subprocesses, which inherit the
  environment), and XLA compilation is most of their time; a cache hit loads the very executable a
  compile would have produced, so no result changes. The directory starts empty each session, so
  nothing carries over between runs.
- `JAX_DISABLE_MOST_OPTIMIZATIONS=1` (jax's switch for "the cost of optimization is greater
  than that of running a less-optimized program": LLVM optimization level 0 and no expensive LLVM
  passes). The tests run tiny models a few steps, so XLA:CPU's compile time dominates, and this
  cuts the suite's time by about a fifth. It changes how fast the code runs, not what it computes
  (no fast-math); CLI subprocesses inherit it. Nothing in the suite times anything; the speed
  numbers come from `perf/`, which runs with jax's defaults.
- `--xla_cpu_use_fusion_emitters=false` (appended to `XLA_FLAGS`): XLA:CPU emits its fused
  element-wise loops with the older loop emitters instead of the MLIR fusion emitters, which
  compile about a third faster for these programs (a method sweep over a tiny OneVision: 27 ->
  17 s). A code-generation choice, with the same HLO and the same operations; subprocesses
  inherit it (`tests/helpers/env.py` keeps it when it adds host devices). XLA aborts on a flag
  it does not know, so a jaxlib that no longer has this one is asked first (a short subprocess)
  and then runs without it.
- `MLLM_TUNE_CACHE` (the offline benchmark's pre-trained bases) points at a per-session temporary
  directory too: tests never read or write ~/.cache, and the tests that need the tiny bench base
  (`mllm_tune/benchmark/config.py:tiny`) build it once per session and share it.
"""
import atexit
import os
import shutil
import subprocess
import sys
import tempfile

import torch

torch.set_num_threads(1)

_CACHE = tempfile.mkdtemp(prefix="mllm_tune_jax_cache_")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
_LOOP_EMITTERS = "--xla_cpu_use_fusion_emitters=false"


def _xla_accepts(flag: str) -> bool:
  try:
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices('cpu')"],
                           env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flag},
                           capture_output=True, timeout=300)
  except (OSError, subprocess.SubprocessError):
    return False
  return probe.returncode == 0


# xdist workers inherit the first process's environment: only that one asks (and a flag the
# user set either way is left as it is)
if (_LOOP_EMITTERS.split("=")[0] not in os.environ.get("XLA_FLAGS", "")
    and _xla_accepts(_LOOP_EMITTERS)):
  os.environ["XLA_FLAGS"] = " ".join(f for f in (os.environ.get("XLA_FLAGS"), _LOOP_EMITTERS) if f)
os.environ["MLLM_TUNE_CACHE"] = os.path.join(_CACHE, "mllm_tune")

import jax  # noqa: E402  (after the environment: jax reads it at import)

jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)

# On a GPU, JAX runs float32 matmuls in TF32 unless told otherwise (about 1e-3 relative error):
# the parity tests compare float32 logits and gradients against PyTorch / float64 references at
# 1e-4 and below, so the suite asks for full float32 precision there. On CPU this is already
# what XLA does. Training keeps the backend default (README: "Precision on GPU").
if jax.default_backend() == "gpu":
  jax.config.update("jax_default_matmul_precision", "highest")
