"""Side-by-side throughput: mllm_tune (JAX) vs transformers (+ peft) on the same LLaVA config.

    python bench/throughput.py                       # driver: all modes, alternating, report
    python bench/throughput.py --worker jax --mode lora --out r.json   # one measurement

Each measurement is its own process (so peak RSS is per framework), and the driver alternates
jax/torch runs `--repeats` times per mode. Same weights (the HF model is saved once and loaded
by both), same batch, same dtype (float32 on CPU: XLA:CPU has no fast bf16 dots), same trainable
set. Modes: `full` (all weights trained, AdamW), `lora` (r=16 on every LLM linear, vision tower
and everything else frozen, AdamW), `generate` (greedy, KV cache), `load` (HF checkpoint read).

FLOPs are counted analytically: per token, a matmul with an (in, out) weight costs 2*in*out
forward; backward costs 2x that when the weight is trained (input and weight gradients) and 1x
when it is frozen (input gradient only, needed upstream); attention adds 4*T*d per layer per
token forward (QK^T and PV, causal not discounted) and 2x that backward. MFU = achieved FLOP/s /
`--peak_gflops` (200 on this machine's 2 cores, DESIGN.md section 5).

Both frameworks' workers run with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (`--no_hugetlb` to
leave the environment alone): glibc then asks for transparent huge pages for large blocks, which
removes most page faults from fresh per-step buffers (XLA:CPU allocates its temporaries anew on
every call); the setting is the same for both sides.
"""
from __future__ import annotations

import argparse
import json
import math
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

LORA_TARGETS = r"llm/layers_\d+/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"
SIZES = dict(vocab=32000, hidden=512, inter=1376, layers=8, heads=8, kv=8,
             v_hidden=384, v_inter=1536, v_layers=6, v_heads=6, image=224, patch=16)


def hf_model(s=SIZES):
  import torch
  from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig,
                            LlavaForConditionalGeneration)
  torch.manual_seed(0)
  vc = CLIPVisionConfig(hidden_size=s["v_hidden"], intermediate_size=s["v_inter"],
                        num_hidden_layers=s["v_layers"], num_attention_heads=s["v_heads"],
                        image_size=s["image"], patch_size=s["patch"])
  tc = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                   num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                   num_key_value_heads=s["kv"], max_position_embeddings=2048)
  cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=s["vocab"] - 1)
  return LlavaForConditionalGeneration(cfg)


def make_batch(batch: int, seq: int, s=SIZES, seed: int = 0):
  import numpy as np
  rng = np.random.RandomState(seed)
  n_img = (s["image"] // s["patch"]) ** 2
  ids = rng.randint(3, s["vocab"] - 2, size=(batch, seq)).astype(np.int32)
  ids[:, 0] = 1
  ids[:, 1:1 + n_img] = s["vocab"] - 1
  px = rng.randn(batch, s["image"], s["image"], 3).astype(np.float32)
  return ids, px, n_img


def flops_per_step(mode: str, batch: int, seq: int, s=SIZES, lora_r: int = 16) -> float:
  d, f, L = s["hidden"], s["inter"], s["layers"]
  kvd = d * s["kv"] // s["heads"]
  mats = [(d, d), (d, kvd), (d, kvd), (d, d), (d, f), (d, f), (f, d)]
  llm_w = L * sum(i * o for i, o in mats)
  head_w = d * s["vocab"]
  n_img = (s["image"] // s["patch"]) ** 2 + 1
  vd, vf, vL = s["v_hidden"], s["v_inter"], s["v_layers"]
  vis_w = vL * (4 * vd * vd + 2 * vd * vf)
  tok = batch * seq
  att = L * 4 * seq * d * tok
  vis_att = vL * 4 * n_img * vd * batch * n_img
  fwd = 2 * (llm_w + head_w) * tok + att + 2 * vis_w * batch * n_img + vis_att
  if mode == "full":
    return 3 * fwd
  lora = L * sum(lora_r * (i + o) for i, o in mats) * 2 * tok
  # frozen LLM: input grads only (1x); vision frozen and not differentiated; LoRA: 3x
  llm_fwd = 2 * (llm_w + head_w) * tok + att
  return fwd + llm_fwd + 3 * lora


# ----------------------------------------------------------------------------- workers
def jax_worker(mode, model_dir, batch, seq, steps, new_tokens):
  import jax
  import numpy as np
  import mllm_tune as mt
  out = {}
  t0 = time.perf_counter()
  model, params = mt.load_pretrained(model_dir)
  jax.block_until_ready(params)
  out["load_s"] = time.perf_counter() - t0
  ids, px, n_img = make_batch(batch, seq)
  if mode == "load":
    out["warm_load_s"] = []
    for _ in range(3):
      del model, params
      t0 = time.perf_counter()
      model, params = mt.load_pretrained(model_dir)
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
    return out
  step, frozen, state, b = jax_train_step(mode, model, params, ids, px)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = step(frozen, state, b)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - t)
  out["times"] = times[2:]
  out["loss0"] = None
  return out


def jax_train_step(mode, model, params, ids, px, loss_chunk: int = 256):
  """(jitted step, frozen, state, batch) for `mode` "full" (AdamW on everything) or "lora";
  `loss_chunk`: positions per chunk of the fused head + CE (0: full logits)."""
  import jax
  import jax.numpy as jnp
  import optax
  import mllm_tune as mt
  from mllm_tune.train.step import StepFns, TrainState, train_step
  if mode == "full":
    method = mt.tuning.get("freeze", preset="full")
  else:
    method = mt.tuning.get("lora", rank=16, alpha=32, targets=LORA_TARGETS)
  variables = method.init_variables(jax.random.key(0), params)
  mask = method.trainable(variables)
  trainable, frozen = mt.tuning.partition(variables, mask)
  opt = mt.tuning.build_optimizer(method, variables, mask, trainable, optax.adamw(1e-5))
  fns = StepFns(model, method, opt, loss_chunk=loss_chunk)
  state = TrainState(jnp.zeros((), jnp.int32), trainable, opt.init(trainable),
                     jax.random.key(0))
  batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones_like(ids),
           "loss_mask": jnp.ones_like(ids), "pixel_values": jnp.asarray(px)}
  step = jax.jit(lambda f, s, b: train_step(fns, f, s, b), donate_argnums=(1,))
  return step, frozen, state, batch


def torch_worker(mode, model_dir, batch, seq, steps, new_tokens):
  import torch
  from transformers import LlavaForConditionalGeneration
  torch.manual_seed(0)
  out = {}
  t0 = time.perf_counter()
  model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
  out["load_s"] = time.perf_counter() - t0
  ids, px, n_img = make_batch(batch, seq)
  ids_t = torch.tensor(ids, dtype=torch.long)
  px_t = torch.tensor(px.transpose(0, 3, 1, 2).copy())
  if mode == "load":
    out["warm_load_s"] = []
    for _ in range(3):
      del model
      t0 = time.perf_counter()
      model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
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
        times.append(time.perf_counter() - t)
    out["times"] = times[1:]
    out["new_tokens"] = batch * new_tokens
    return out
  if mode == "lora":
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(
        r=16, lora_alpha=32, target_modules=r"model\.language_model\.layers\.\d+\."
        r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"))
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    logits = model(input_ids=ids_t, pixel_values=px_t).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             ids_t[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t)
  out["times"] = times[2:]
  return out


# ----------------------------------------------------------------------------- driver
def run_worker(args):
  fn = jax_worker if args.worker == "jax" else torch_worker
  res = fn(args.mode, args.model_dir, args.batch, args.seq, args.steps, args.new_tokens)
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
  ap.add_argument("--peak_gflops", type=float, default=200.0)
  ap.add_argument("--no_hugetlb", action="store_true")
  ap.add_argument("--out", default="")
  ap.add_argument("--results", default=os.path.join(ROOT, "bench", "results", "cpu.md"))
  args = ap.parse_args()
  if args.worker:
    return run_worker(args)
  tmp = tempfile.mkdtemp()
  model_dir = args.model_dir or os.path.join(tmp, "llava")
  if not args.model_dir:
    hf_model().save_pretrained(model_dir)
  rows = {}
  for mode in args.modes.split(","):
    for rep in range(args.repeats):
      for fw in ("jax", "torch"):
        out = os.path.join(tmp, f"{mode}_{fw}_{rep}.json")
        cmd = [sys.executable, __file__, "--worker", fw, "--mode", mode, "--model_dir",
               model_dir, "--batch", str(args.batch), "--seq", str(args.seq), "--steps",
               str(args.steps if mode != "generate" else 4), "--new_tokens",
               str(args.new_tokens), "--out", out]
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        if not args.no_hugetlb:
          env["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
        subprocess.run(cmd, check=True, env=env)
        with open(out) as f:
          rows.setdefault((mode, fw), []).append(json.load(f))
  report(rows, args, model_dir)


def checkpoint_params(model_dir: str) -> int:
  """Parameter count of the safetensors files in `model_dir` (from their headers)."""
  from safetensors import safe_open
  n = 0
  for f in sorted(os.listdir(model_dir)):
    if f.endswith(".safetensors"):
      with safe_open(os.path.join(model_dir, f), "np") as st:
        n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
  return n


def report(rows, args, model_dir):
  size_gb = sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir)
                if f.endswith(".safetensors")) / 1e9
  n_params = checkpoint_params(model_dir)
  lines = ["# CPU throughput: mllm_tune (JAX) vs transformers + peft (PyTorch)", "",
           f"Date: {time.strftime('%Y-%m-%d')}; machine: {platform.processor() or platform.machine()}"
           f", {os.cpu_count()} cores; versions: {json.dumps(versions())}", "",
           f"Model: LLaVA (CLIP ViT {SIZES['v_layers']}x{SIZES['v_hidden']} @ {SIZES['image']}px"
           f" + Llama {SIZES['layers']}x{SIZES['hidden']}, vocab {SIZES['vocab']}), "
           f"{n_params / 1e6:.1f}M params, float32; batch {args.batch} x {args.seq} tokens "
           f"(1 image each); generation: prompt {(SIZES['image'] // SIZES['patch']) ** 2 + 32} "
           f"tokens, {args.new_tokens} new, batch {args.batch}.", "",
           f"Command: `python bench/throughput.py --batch {args.batch} --seq {args.seq} "
           f"--steps {args.steps} --repeats {args.repeats}"
           f"{' --no_hugetlb' if args.no_hugetlb else ''}` (each number: median over "
           f"{args.repeats} alternating process runs of the per-run median step time, "
           f"{args.steps - 2} timed steps per run after 2 warm-up steps; environment for both: "
           f"{'default' if args.no_hugetlb else 'GLIBC_TUNABLES=glibc.malloc.hugetlb=1'})", "",
           "| mode | ours | transformers(+peft) | ratio (ours/theirs speed) | ours MFU | theirs MFU "
           "| ours peak RSS MB | theirs peak RSS MB |", "|---|---|---|---|---|---|---|---|"]
  summary = {}
  for mode in args.modes.split(","):
    res = {fw: rows[(mode, fw)] for fw in ("jax", "torch")}
    rss = {fw: max(r["peak_rss_mb"] for r in res[fw]) for fw in res}
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
    fl = flops_per_step(mode, args.batch, args.seq)
    mfu = {fw: fl / med[fw] / (args.peak_gflops * 1e9) for fw in med}
    lines.append(f"| {mode} step | {med['jax'] * 1e3:.0f} ms ({tok / med['jax']:.0f} tok/s) | "
                 f"{med['torch'] * 1e3:.0f} ms ({tok / med['torch']:.0f} tok/s) | "
                 f"{med['torch'] / med['jax']:.2f} | {100 * mfu['jax']:.0f}% | "
                 f"{100 * mfu['torch']:.0f}% | {rss['jax']:.0f} | {rss['torch']:.0f} |")
    summary[mode] = med
  text = "\n".join(lines) + "\n"
  print(text)
  os.makedirs(os.path.dirname(args.results), exist_ok=True)
  with open(args.results, "w") as f:
    f.write(text)
  with open(os.path.splitext(args.results)[0] + "_runs.json", "w") as f:
    json.dump({f"{m}/{fw}": runs for (m, fw), runs in rows.items()}, f, indent=1)


if __name__ == "__main__":
  main()
