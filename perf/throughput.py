"""Side-by-side throughput: mllm_tune (JAX) vs transformers (+ peft) on the same LLaVA config.

    python perf/throughput.py                       # driver: all modes, alternating, report
    python perf/throughput.py --worker jax --mode lora --out r.json   # one measurement
    # GPU (LLaVA-1.5-7B shape, random weights, bf16; see --help):
    python perf/throughput.py --preset llava7b --init random --dtype bfloat16 --seq 2048 \
        --batch 4 --lora_rank 128 --modes lora --peak_gflops 989000 --results results/gpu.md

Each measurement is its own process (so peak RSS is per framework), and the driver alternates
jax/torch runs `--repeats` times per mode. Same weights (the HF model is saved once and loaded
by both), same batch, same dtype (float32 on CPU: XLA:CPU has no fast bf16 dots), same trainable
set. Modes: `full` (all weights trained, AdamW), `lora` (r=16 on every LLM linear, vision tower
and everything else frozen, AdamW), `generate` (greedy, KV cache), `load` (HF checkpoint read).

FLOPs are counted analytically: per token, a matmul with an (in, out) weight costs 2*in*out
forward; backward costs 2x that when the weight is trained (input and weight gradients) and 1x
when it is frozen (input gradient only, needed upstream); attention adds 4*T*d per layer per
token forward (QK^T and PV, causal not discounted) and 2x that backward. MFU = achieved FLOP/s /
`--peak_gflops` (200 on this machine's 2 cores, docs/design.md §5; 989000 = H100/H200 dense
bf16). Peak memory: RSS on CPU, the device allocator's peak on GPU (JAX `memory_stats`, torch
`max_memory_allocated`).

Presets (`--preset`): `cpu` (the ~70M LLaVA above), `llava7b` (CLIP ViT-L/14-336 + Llama-2-7B
dims), `llava1p5b` (CLIP ViT-B/16 + a 24x2048 Llama, ~1.5B) and `tiny` (smoke tests).
`--init random` skips the checkpoint: the driver writes only config.json and each worker builds
random weights on its device (what a 7B GPU run wants); `load` mode needs `--init checkpoint`.

Both frameworks' workers run in the same environment: the default one, or `GLIBC_TUNABLES` set
by `--glibc_tunables` for both (e.g. `glibc.malloc.hugetlb=1`, transparent huge pages for
glibc's large blocks). Until 2026-12-04 the driver set huge pages by default; on this 2-core
host they make transformers' CPU step times erratic (1.1 to 3.0 s for a 1.1 s step) while ours
stay steady, so ratios measured that way flattered us (results/cpu.md, results/qwen_cpu.md).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# presets, batches and FLOPs (profile_step.py and tests use them through this module)
from bench_models import (LORA_TARGETS, PRESETS, flops_per_step, hf_config,  # noqa: E402
                          hf_model, jax_step, make_batch, param_count, time_steps)


# ----------------------------------------------------------------------------- workers
def jax_worker(args):
  import jax
  import numpy as np
  import mllm_tune as mt
  mode, batch, seq, steps, new_tokens = args.mode, args.batch, args.seq, args.steps, args.new_tokens
  on_gpu = jax.devices()[0].platform == "gpu"
  # "auto" is the library's own per-call-site rule (models.attention.choose_attention)
  runtime = dict(attention_impl=args.attention_impl, remat_policy=args.remat_policy)

  load = lambda: jax_model(args.model_dir, args.init, args.dtype, **runtime)
  out = {}
  t0 = time.perf_counter()
  model, params = load()
  jax.block_until_ready(params)
  out["load_s"] = time.perf_counter() - t0
  ids, px, n_img = make_batch(batch, seq, PRESETS[args.preset])
  px = jax.numpy.asarray(px, dtype=args.dtype)
  if mode == "load":
    out["warm_load_s"] = []
    for _ in range(3):
      del model, params
      t0 = time.perf_counter()
      model, params = load()
      jax.block_until_ready(params)
      out["warm_load_s"].append(time.perf_counter() - t0)
    return out
  if mode == "generate":
    prompt = ids[:, :n_img + 32]
    mask = np.ones_like(prompt)
    times = []
    for _ in range(steps):
      t = time.perf_counter()
      res = mt.generate(model, params, prompt, mask, px, max_new_tokens=new_tokens)
      jax.block_until_ready(res)
      times.append(time.perf_counter() - t)
    out["times"] = times[1:]
    out["new_tokens"] = batch * new_tokens
    if on_gpu:
      out["peak_device_mb"] = jax.devices()[0].memory_stats()["peak_bytes_in_use"] / 2**20
    return out
  step, frozen, state, b = jax_train_step(mode, model, params, ids, px,
                                          lora_rank=args.lora_rank)
  del params
  out["times"], _ = time_steps(step, frozen, state, b, steps)
  if on_gpu:
    out["peak_device_mb"] = jax.devices()[0].memory_stats()["peak_bytes_in_use"] / 2**20
  return out


def jax_model(model_dir: str, init: str, dtype: str, **runtime):
  """(model, params) from an HF directory: its weights (`init` "checkpoint") or random weights
  built on the device from its config.json ("random"); params stored in `dtype`."""
  import jax
  import mllm_tune as mt
  if init == "checkpoint":
    return mt.load_pretrained(model_dir, dtype=dtype, param_dtype=dtype, **runtime)
  from mllm_tune.checkpoints.hf import read_config
  from mllm_tune.models import build_model, init_params
  from mllm_tune.models.config import with_runtime
  model = build_model(with_runtime(read_config(model_dir, dtype, dtype), **runtime))
  return model, init_params(model, jax.random.key(0))


def jax_train_step(mode, model, params, ids, px, loss_chunk: int = 256, lora_rank: int = 16):
  """(jitted step, frozen, state, batch) for `mode` "full" or "lora" on token ids and images
  (`bench_models.jax_step`)."""
  return jax_step(model, params, {"input_ids": ids, "pixel_values": px}, mode, lora_rank,
                  loss_chunk)


def torch_worker(args):
  import torch
  from transformers import AutoConfig, LlavaForConditionalGeneration
  mode, batch, seq, steps, new_tokens = args.mode, args.batch, args.seq, args.steps, args.new_tokens
  torch.manual_seed(0)
  dev = torch.device("cuda" if args.platform == "gpu" else "cpu")
  dtype = getattr(torch, args.dtype)

  def load():
    if args.init == "checkpoint":
      return LlavaForConditionalGeneration.from_pretrained(args.model_dir, dtype=dtype).to(dev)
    with torch.device(dev):
      return LlavaForConditionalGeneration._from_config(
          AutoConfig.from_pretrained(args.model_dir), dtype=dtype)

  def sync():
    if dev.type == "cuda":
      torch.cuda.synchronize()
  out = {}
  t0 = time.perf_counter()
  model = load()
  sync()
  out["load_s"] = time.perf_counter() - t0
  ids, px, n_img = make_batch(batch, seq, PRESETS[args.preset])
  ids_t = torch.tensor(ids, dtype=torch.long, device=dev)
  px_t = torch.tensor(px.transpose(0, 3, 1, 2).copy(), device=dev).to(dtype)
  if mode == "load":
    out["warm_load_s"] = []
    for _ in range(3):
      del model
      t0 = time.perf_counter()
      model = load()
      sync()
      out["warm_load_s"].append(time.perf_counter() - t0)
    return out
  if mode == "generate":
    model.eval()
    prompt = ids_t[:, :n_img + 32]
    times = []
    with torch.no_grad():
      for _ in range(steps):
        t = time.perf_counter()
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                       pixel_values=px_t, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0)
        sync()
        times.append(time.perf_counter() - t)
    out["times"] = times[1:]
    out["new_tokens"] = batch * new_tokens
    if dev.type == "cuda":
      out["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out
  if mode == "lora":
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(
        r=args.lora_rank, lora_alpha=2 * args.lora_rank,
        target_modules=r"model\.language_model\.layers\.\d+\."
        r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"))
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    logits = model(input_ids=ids_t, pixel_values=px_t).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             ids_t[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    times.append(time.perf_counter() - t)
  out["times"] = times[2:]
  if dev.type == "cuda":
    out["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20
  return out


# ----------------------------------------------------------------------------- driver
def run_worker(args):
  res = (jax_worker if args.worker == "jax" else torch_worker)(args)
  res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  with open(args.out, "w") as f:
    json.dump(res, f)


def versions() -> dict:
  import importlib.metadata as md
  return {p: md.version(p) for p in ("jax", "flax", "optax", "torch", "transformers", "peft")}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--worker", choices=["jax", "torch"])
  ap.add_argument("--mode", default="lora", choices=["full", "lora", "generate", "load"])
  ap.add_argument("--modes", default="lora,full,generate,load")
  ap.add_argument("--model_dir", default="")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--steps", type=int, default=12)
  ap.add_argument("--new_tokens", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--peak_gflops", type=float, default=200.0,
                  help="peak FLOP/s for MFU, in GFLOP/s (989000: H100/H200 dense bf16)")
  ap.add_argument("--glibc_tunables", default="",
                  help="GLIBC_TUNABLES for both workers, e.g. glibc.malloc.hugetlb=1")
  ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
  ap.add_argument("--platform", default="cpu", choices=["cpu", "gpu"])
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--init", default="checkpoint", choices=["checkpoint", "random"])
  ap.add_argument("--lora_rank", type=int, default=16)
  ap.add_argument("--attention_impl", default="auto",
                  help="auto: the library's per-call-site choice (cuDNN where it runs, else lse)")
  ap.add_argument("--remat_policy", default="none")
  ap.add_argument("--out", default="")
  ap.add_argument("--results", default=os.path.join(ROOT, "results", "cpu.md"))
  args = ap.parse_args()
  if args.worker:
    return run_worker(args)
  if args.init == "random" and "load" in args.modes.split(","):
    raise SystemExit("--modes load needs --init checkpoint")
  tmp = tempfile.mkdtemp()
  model_dir = args.model_dir or os.path.join(tmp, "llava")
  if not args.model_dir:
    if args.init == "random":
      hf_config(PRESETS[args.preset]).save_pretrained(model_dir)
    else:
      hf_model(PRESETS[args.preset]).save_pretrained(model_dir)
  shared = ["--model_dir", model_dir, "--batch", str(args.batch), "--seq", str(args.seq),
            "--new_tokens", str(args.new_tokens), "--preset", args.preset, "--platform",
            args.platform, "--dtype", args.dtype, "--init", args.init, "--lora_rank",
            str(args.lora_rank), "--attention_impl", args.attention_impl, "--remat_policy",
            args.remat_policy]
  rows = {}
  for mode in args.modes.split(","):
    for rep in range(args.repeats):
      for fw in ("jax", "torch"):
        out = os.path.join(tmp, f"{mode}_{fw}_{rep}.json")
        cmd = [sys.executable, __file__, "--worker", fw, "--mode", mode, *shared, "--steps",
               str(args.steps if mode != "generate" else 4), "--out", out]
        env = dict(os.environ)
        if args.platform == "cpu":
          env["JAX_PLATFORMS"] = "cpu"
        if args.glibc_tunables:
          env["GLIBC_TUNABLES"] = args.glibc_tunables
        subprocess.run(cmd, check=True, env=env)
        with open(out) as f:
          rows.setdefault((mode, fw), []).append(json.load(f))
  report(rows, args, model_dir)


def report(rows, args, model_dir):
  s = PRESETS[args.preset]
  size_gb = sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir)
                if f.endswith(".safetensors")) / 1e9
  mem = "device" if args.platform == "gpu" else "RSS"
  n_img = (s["image"] // s["patch"]) ** 2
  lines = [f"# {args.platform.upper()} throughput: mllm_tune (JAX) vs transformers + peft "
           "(PyTorch)", "",
           f"Date: {time.strftime('%Y-%m-%d')}; machine: "
           f"{platform.processor() or platform.machine()}"
           f", {os.cpu_count()} cores; versions: {json.dumps(versions())}", "",
           f"Model (preset {args.preset}, {args.init} weights): LLaVA (CLIP ViT "
           f"{s['v_layers']}x{s['v_hidden']} @ {s['image']}px + Llama {s['layers']}x{s['hidden']}"
           f", vocab {s['vocab']}), {param_count(s) / 1e6:.1f}M params, {args.dtype}; batch "
           f"{args.batch} x {args.seq} tokens (1 image each); LoRA r={args.lora_rank}; "
           f"generation: prompt {n_img + 32} tokens, {args.new_tokens} new, batch {args.batch}.",
           "",
           f"Command: `python perf/throughput.py {' '.join(sys.argv[1:])}` (each number: median "
           f"over {args.repeats} alternating process runs of the per-run median step time, "
           f"{args.steps - 2} timed steps per run after 2 warm-up steps; environment for both: "
           f"{'GLIBC_TUNABLES=' + args.glibc_tunables if args.glibc_tunables else 'default'})",
           "",
           "| mode | ours | transformers(+peft) | ratio (ours/theirs speed) | ours MFU "
           f"| theirs MFU | ours peak {mem} MB | theirs peak {mem} MB |",
           "|---|---|---|---|---|---|---|---|"]
  for mode in args.modes.split(","):
    res = {fw: rows[(mode, fw)] for fw in ("jax", "torch")}
    rss = {fw: max(r.get("peak_device_mb", r["peak_rss_mb"]) for r in res[fw])
           for fw in res}
    if mode == "load":
      t = {fw: statistics.median(r["load_s"] for r in res[fw]) for fw in res}
      w = {fw: statistics.median(x for r in res[fw] for x in r["warm_load_s"]) for fw in res}
      lines.append(f"| load HF checkpoint ({size_gb:.2f} GB), first in the process | "
                   f"{size_gb / t['jax']:.2f} GB/s | {size_gb / t['torch']:.2f} GB/s | "
                   f"{t['torch'] / t['jax']:.2f} | | | {rss['jax']:.0f} | {rss['torch']:.0f} |")
      lines.append(f"| load HF checkpoint again (median of 3 per run) | "
                   f"{size_gb / w['jax']:.2f} GB/s | {size_gb / w['torch']:.2f} GB/s | "
                   f"{w['torch'] / w['jax']:.2f} | | | | |")
      continue
    med = {fw: statistics.median(statistics.median(r["times"]) for r in res[fw]) for fw in res}
    if mode == "generate":
      n = res["jax"][0]["new_tokens"]
      lines.append(f"| generate (greedy, KV cache) | {n / med['jax']:.0f} new tok/s | "
                   f"{n / med['torch']:.0f} new tok/s | {med['torch'] / med['jax']:.2f} | | | "
                   f"{rss['jax']:.0f} | {rss['torch']:.0f} |")
      continue
    tok = args.batch * args.seq
    fl = flops_per_step(mode, args.batch, args.seq, s, args.lora_rank)
    mfu = {fw: fl / med[fw] / (args.peak_gflops * 1e9) for fw in med}
    lines.append(f"| {mode} step | {med['jax'] * 1e3:.0f} ms ({tok / med['jax']:.0f} tok/s) | "
                 f"{med['torch'] * 1e3:.0f} ms ({tok / med['torch']:.0f} tok/s) | "
                 f"{med['torch'] / med['jax']:.2f} | {100 * mfu['jax']:.0f}% | "
                 f"{100 * mfu['torch']:.0f}% | {rss['jax']:.0f} | {rss['torch']:.0f} |")
  text = "\n".join(lines) + "\n"
  print(text)
  os.makedirs(os.path.dirname(args.results), exist_ok=True)
  with open(args.results, "w") as f:
    f.write(text)
  with open(os.path.splitext(args.results)[0] + "_runs.json", "w") as f:
    json.dump({f"{m}/{fw}": runs for (m, fw), runs in rows.items()}, f, indent=1)


if __name__ == "__main__":
  main()
