"""Where the time of one mllm_tune training step goes: per-op device time (GPU) or thread time
(XLA:CPU).

    python perf/profile_step.py --mode lora            # the throughput.py config, batch 4 x 512
    python perf/profile_step.py --mode full --top 40
    # GPU, the 1.5B full fine-tuning run of perf/gpu_targets.sh (random weights, bf16):
    python perf/profile_step.py --mode full --preset llava1p5b --init random \
        --dtype bfloat16 --batch 8 --seq 2048

Runs the jitted step of `perf/throughput.py` (same model, batch and trainable set) twice to
warm up, traces two more steps with `jax.profiler`, and sums the duration of every XLA op by
name: on a GPU the device's "XLA Ops" timeline, on CPU every thread's thunks (the thunks of one
step run on two threads, so the total can exceed the step's wall time). Each row names the
fused op, its result shape and the JAX operation it came from (HLO metadata), e.g.
`transpose(jvp(Llava))/llm/lm_head/dot_general` is the LM head's backward matmul. Groups at the
end: matmuls (cuBLAS/Triton GEMMs, XLA:CPU dots), attention (cuDNN), copies and transposes,
the rest (element-wise and reduction fusions). Numbers are per step.
"""
from __future__ import annotations

import argparse
import collections
import functools
import glob
import os
import re
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "perf"))


def op_table(hlo_text: str) -> dict[str, tuple[str, str, str]]:
  """HLO instruction name -> (result shape, JAX op_name, kind) from the optimized module's
  text; kind is "matmul", "attention", "copy/transpose" or "other"."""
  pat = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+) (.*)$", re.M)
  out = {}
  for m in pat.finditer(hlo_text):
    name, shape, rest = m.groups()
    origin = re.search(r'op_name="([^"]+)"', rest)
    out[name] = (shape, origin.group(1) if origin else "", _kind(name, rest))
  return out


def _kind(name: str, rest: str) -> str:
  if "fmha" in rest or "cudnn" in rest.lower() and "custom-call" in rest:
    return "attention"
  if ("gemm" in rest or "__cublas" in rest or name.startswith(("ynn_fusion", "dot"))
      or " dot(" in rest):
    return "matmul"
  if "copy" in name or "transpose" in name:
    return "copy/transpose"
  return "other"


def op_times(trace_dir: str, ops: dict) -> collections.Counter:
  """Total duration (ns) per HLO instruction of `ops`: on a GPU the device planes' op lines
  ("XLA Ops"), else every thread of the host. Events are matched by instruction name, also
  when the profiler decorates it (`%fusion.3 = ...`, `fusion.3:...`)."""
  times: collections.Counter = collections.Counter()
  for line_name, events in device_lines(trace_dir).items():
    if "XLA Ops" not in line_name and any("XLA Ops" in n for n in device_lines(trace_dir)):
      continue
    for name, ns in events.items():
      key = _instruction(name, ops)
      if key is not None:
        times[key] += ns
  return times


def _instruction(event_name: str, ops: dict) -> str | None:
  if event_name in ops:
    return event_name
  m = re.match(r"%?([\w.\-]+)", event_name)
  return m.group(1) if m and m.group(1) in ops else None


@functools.lru_cache(maxsize=4)
def device_lines(trace_dir: str) -> dict[str, collections.Counter]:
  """"plane/line" -> {event name: total ns} over the GPU planes of the trace (all host
  threads when there is no GPU plane)."""
  try:
    from jax.profiler import ProfileData
  except ImportError:  # older jax
    from jax._src.lib._profile_data import ProfileData
  path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
  planes = list(ProfileData.from_file(path).planes)
  gpu = [p for p in planes if p.name.startswith("/device:GPU")]
  out: dict[str, collections.Counter] = {}
  for plane in gpu or planes:
    for line in plane.lines:
      c = out.setdefault(f"{plane.name}/{line.name}", collections.Counter())
      for ev in line.events:
        c[ev.name] += ev.duration_ns
  return out


def print_kernels(trace_dir: str, top: int, steps: int = 2):
  """The longest events of each GPU line (kernels by name), whatever the op matching found."""
  for line_name, events in device_lines(trace_dir).items():
    total = sum(events.values())
    if not total or "/host:" in line_name:
      continue
    print(f"\n{line_name}: {total / steps / 1e6:.0f} ms per step")
    for name, ns in events.most_common(top):
      print(f"{ns / steps / 1e6:8.1f} {100 * ns / total:5.1f}  {name[:110]}")


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
  ap.add_argument("--preset", default="cpu")
  ap.add_argument("--init", default="checkpoint", choices=["checkpoint", "random"])
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--lora_rank", type=int, default=16)
  ap.add_argument("--attention_impl", default="auto")
  ap.add_argument("--remat_policy", default="none")
  ap.add_argument("--top", type=int, default=30)
  ap.add_argument("--loss_chunk", type=int, default=256, help="0: full logits")
  ap.add_argument("--compiler_option", action="append", default=[], metavar="KEY=VALUE",
                  help="XLA option for this jit, e.g. xla_cpu_use_xnnpack=false (repeatable)")
  args = ap.parse_args()
  import jax

  import throughput
  preset = throughput.PRESETS[args.preset]
  model_dir = args.model_dir
  if not model_dir:
    model_dir = os.path.join(tempfile.mkdtemp(), "llava")
    if args.init == "random":
      throughput.hf_config(preset).save_pretrained(model_dir)
    else:
      throughput.hf_model(preset).save_pretrained(model_dir)
  model, params = throughput.jax_model(model_dir, args.init, args.dtype,
                                       attention_impl=args.attention_impl,
                                       remat_policy=args.remat_policy)
  ids, px, _ = throughput.make_batch(args.batch, args.seq, preset)
  px = jax.numpy.asarray(px, args.dtype)
  step, frozen, state, batch = throughput.jax_train_step(args.mode, model, params, ids, px,
                                                         args.loss_chunk, args.lora_rank)
  del params
  step = step.lower(frozen, state, batch).compile(
      compiler_options=compiler_options(args.compiler_option))
  ops = op_table(step.as_text())
  mem = step.memory_analysis()
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
  times = op_times(trace_dir, ops)
  total = sum(times.values())
  print(f"{args.mode} step ({args.preset}, {args.dtype}, batch {args.batch} x {args.seq}, "
        f"{jax.devices()[0].device_kind}): {wall * 1e3:.0f} ms wall (traced), "
        f"{total / 2e6:.0f} ms op time")
  if mem is not None:
    gb = lambda b: f"{b / 2**30:.2f} GiB"
    print(f"compiled memory: arguments {gb(mem.argument_size_in_bytes)}, outputs "
          f"{gb(mem.output_size_in_bytes)}, aliased {gb(mem.alias_size_in_bytes)}, temporaries "
          f"{gb(mem.temp_size_in_bytes)}")
  print(f"\n{'ms':>8} {'%':>5}  {'op':30} {'shape':34} from")
  for name, ns in times.most_common(args.top):
    shape, origin, _ = ops.get(name, ("", "", ""))
    print(f"{ns / 2e6:8.1f} {100 * ns / total:5.1f}  {name[:30]:30} {shape[:34]:34} "
          f"{origin[-70:]}")
  groups: collections.Counter = collections.Counter()
  for name, ns in times.items():
    groups[ops[name][2]] += ns
  if jax.devices()[0].platform == "gpu":
    print_kernels(trace_dir, args.top)
  print("\n" + ", ".join(f"{k} {100 * v / max(total, 1):.0f}%" for k, v in groups.most_common()))


if __name__ == "__main__":
  main()
