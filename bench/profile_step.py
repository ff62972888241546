"""Where the time of one mllm_tune training step goes on XLA:CPU: per-op thread time.

    python bench/profile_step.py --mode lora            # the throughput.py config, batch 4 x 512
    python bench/profile_step.py --mode full --top 40

Runs the jitted step of `bench/throughput.py` (same model, batch and trainable set) twice to
warm up, traces two more steps with `jax.profiler`, and sums the duration of every XLA thunk by
name over all threads (the thunks of one step run on two threads, so the total can exceed
the step's wall time). Each row names the fused op, its result shape and the JAX
operation it came from (HLO metadata), e.g. `transpose(jvp(Llava))/llm/lm_head/dot_general` is
the LM head's backward matmul. Groups at the end: dots (`ynn_fusion`/`dot`), copies and
transposes, the rest. Numbers are per step.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))


def op_table(hlo_text: str) -> dict[str, tuple[str, str]]:
  """HLO instruction name -> (result shape, JAX op_name) from the optimized module's text."""
  pat = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+) .*?op_name=\"([^\"]+)\"", re.M)
  return {m.group(1): (m.group(2), m.group(3)) for m in pat.finditer(hlo_text)}


def thunk_times(trace_dir: str, ops: dict) -> collections.Counter:
  """Total duration (ns) per HLO instruction of `ops` over every thread of the trace."""
  from jax._src.lib import _profile_data
  path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
  times: collections.Counter = collections.Counter()
  for plane in _profile_data.ProfileData.from_file(path).planes:
    for line in plane.lines:
      for ev in line.events:
        if ev.name in ops:
          times[ev.name] += ev.duration_ns
  return times


def compiler_options(pairs: list[str]) -> dict:
  """["key=value", ...] -> {key: value} with true/false as bools (XLA's per-jit options)."""
  out = {}
  for kv in pairs:
    key, sep, value = kv.partition("=")
    if not sep or not key:
      raise SystemExit(f"--compiler_option wants KEY=VALUE, got {kv!r}")
    out[key] = {"true": True, "false": False}.get(value.lower(), value)
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--mode", default="lora", choices=["lora", "full"])
  ap.add_argument("--model_dir", default="")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--attention_impl", default="lse")
  ap.add_argument("--top", type=int, default=30)
  ap.add_argument("--loss_chunk", type=int, default=256, help="0: full logits")
  ap.add_argument("--compiler_option", action="append", default=[], metavar="KEY=VALUE",
                  help="XLA option for this jit, e.g. xla_cpu_use_xnnpack=false (repeatable)")
  args = ap.parse_args()
  import jax

  import mllm_tune as mt
  import throughput
  model_dir = args.model_dir
  if not model_dir:
    model_dir = os.path.join(tempfile.mkdtemp(), "llava")
    throughput.hf_model().save_pretrained(model_dir)
  model, params = mt.load_pretrained(model_dir, attention_impl=args.attention_impl)
  ids, px, _ = throughput.make_batch(args.batch, args.seq)
  step, frozen, state, batch = throughput.jax_train_step(args.mode, model, params, ids, px,
                                                              args.loss_chunk)
  step = step.lower(frozen, state, batch).compile(
      compiler_options=compiler_options(args.compiler_option))
  ops = op_table(step.as_text())
  for _ in range(2):
    state, metrics = step(frozen, state, batch)
    jax.block_until_ready(metrics["loss"])
  trace_dir = tempfile.mkdtemp()
  t0 = time.perf_counter()
  with jax.profiler.trace(trace_dir):
    for _ in range(2):
      state, metrics = step(frozen, state, batch)
      jax.block_until_ready(metrics["loss"])
  wall = (time.perf_counter() - t0) / 2
  times = thunk_times(trace_dir, ops)
  total = sum(times.values())
  print(f"{args.mode} step: {wall:.2f} s wall (traced), {total / 2e9:.2f} s thunk time\n")
  print(f"{'ms':>8} {'%':>5}  {'op':30} {'shape':34} from")
  for name, ns in times.most_common(args.top):
    shape, origin = ops.get(name, ("", ""))
    print(f"{ns / 2e6:8.1f} {100 * ns / total:5.1f}  {name[:30]:30} {shape[:34]:34} "
          f"{origin[-70:]}")
  groups: collections.Counter = collections.Counter()
  for name, ns in times.items():
    kind = ("dots" if name.startswith(("ynn_fusion", "dot")) else
            "copies/transposes" if "copy" in name or "transpose" in name else "other")
    groups[kind] += ns
  print("\n" + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in groups.most_common()))


if __name__ == "__main__":
  main()
