"""Qwen2.5-VL-shaped LoRA training step: mllm_tune (JAX) vs transformers + peft, same run.

    python perf/qwen_step.py                      # CPU: both frameworks alternating; report
    python perf/qwen_step.py --preset tiny        # seconds, for a dry run
    python perf/qwen_step.py --preset qwen7b --platform gpu --dtype bfloat16 --seq 2048 \
        --lora_rank 128 --results results/gpu_qwen7b.md      # one H100/H200
    python perf/qwen_step.py --worker jax --model_dir D --out r.json    # one measurement

The model (Qwen2.5-VL vision tower with window attention and full-attention blocks, 2x2
PatchMerger, Qwen2 LLM with M-RoPE) gets random weights: on CPU transformers builds and saves
them once and both workers load the same checkpoint; with `--init random` (the GPU default) the
driver writes only config.json and each worker builds its own weights on its device. The batch:
`--batch` rows of `--seq` tokens, each row one image of a different patch grid (tall, wide,
square, small), processor-layout arrays (`pixel_values` (patches, 1176), `image_grid_thw`);
transformers gets them as they are, we get `mt.hf_inputs` of the same arrays (host M-RoPE
positions, vision segment/window ids). LoRA (alpha = 2 r) on every LLM linear, vision tower and
merger frozen, AdamW; each worker is its own process, alternated `--repeats` times (median step
time); both run in the same environment, the default one unless `--glibc_tunables` sets
`GLIBC_TUNABLES` for both (`glibc.malloc.hugetlb=1`, transparent huge pages, speeds up both on
some steps but makes transformers' step times erratic: see results/qwen_cpu.md).

MFU counts model FLOPs analytically (`flops_per_step`, the rules of perf/throughput.py): the
frozen vision tower forward only (windowed layers attend within their window, full layers within
their image), the LLM forward plus its input gradients, 3x for the LoRA matmuls. Peak memory: the
device allocator's peak on GPU, RSS on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "perf"))

from bench_models import jax_step, time_steps  # noqa: E402

TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
              vision_end_token_id=151653)
PRESETS = {  # vision: depth, hidden, inter, heads, out, window (px), full blocks; LLM; grids
    "qwen7b": dict(v_depth=32, v_hidden=1280, v_inter=3420, v_heads=16, window=112,
                   fullatt=[7, 15, 23, 31], hidden=3584, inter=18944, layers=28, heads=28, kv=4,
                   vocab=152064, mrope=[16, 24, 24], theta=1e6,
                   grids=[(1, 32, 32), (1, 24, 40), (1, 40, 24), (1, 28, 28)]),
    "cpu": dict(v_depth=4, v_hidden=128, v_inter=256, v_heads=4, window=56, fullatt=[3],
                hidden=512, inter=1376, layers=6, heads=8, kv=4, vocab=8000, mrope=[8, 12, 12],
                theta=1e6, grids=[(1, 16, 16), (1, 12, 20), (1, 20, 12), (1, 8, 8)]),
    "tiny": dict(v_depth=2, v_hidden=32, v_inter=64, v_heads=2, window=56, fullatt=[1],
                 hidden=64, inter=128, layers=2, heads=4, kv=2, vocab=512, mrope=[2, 3, 3],
                 theta=1e4, grids=[(1, 8, 8), (1, 4, 12), (1, 12, 4), (1, 4, 4)]),
}
PATCH, MERGE, TEMPORAL = 14, 2, 2
HF_TARGETS = (r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|"
              r"mlp\.(gate|up|down)_proj)")


def hf_config(p):
  from transformers import Qwen2_5_VLConfig
  vocab = p["vocab"]  # small vocabularies: the special tokens are its last four ids
  tokens = TOKENS if vocab > max(TOKENS.values()) else {k: vocab - 4 + i for i, k in
                                                          enumerate(TOKENS)}
  text = dict(vocab_size=vocab, hidden_size=p["hidden"], intermediate_size=p["inter"],
              num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
              num_key_value_heads=p["kv"], max_position_embeddings=32768, rms_norm_eps=1e-6,
              rope_parameters={"rope_type": "default", "rope_theta": p["theta"],
                               "mrope_section": p["mrope"]})
  if vocab <= max(TOKENS.values()):
    text.update(bos_token_id=vocab - 6, eos_token_id=vocab - 5, pad_token_id=vocab - 6)
  vision = dict(depth=p["v_depth"], hidden_size=p["v_hidden"], intermediate_size=p["v_inter"],
                num_heads=p["v_heads"], out_hidden_size=p["hidden"], patch_size=PATCH,
                spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, window_size=p["window"],
                fullatt_block_indexes=p["fullatt"], tokens_per_second=2)
  return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                          **tokens)


def make_batch(cfg: dict, p: dict, batch: int, seq: int, seed: int = 0) -> dict:
  """Processor-layout numpy arrays: each row `<|vision_start|> image pads <|vision_end|>` at
  position 4, then text; patch rows for the grids in `p` (cycled)."""
  import numpy as np
  grids = [p["grids"][r % len(p["grids"])] for r in range(batch)]
  rng = np.random.RandomState(seed)
  ids = rng.randint(10, min(cfg[k] for k in TOKENS), size=(batch, seq))  # text below specials
  for r, (t, h, w) in enumerate(grids):
    n = t * h * w // MERGE ** 2
    if n + 8 > seq:
      raise SystemExit(f"--seq {seq} is shorter than an image run ({n} tokens)")
    ids[r, 4] = cfg["vision_start_token_id"]
    ids[r, 5:5 + n] = cfg["image_token_id"]
    ids[r, 5 + n] = cfg["vision_end_token_id"]
  n_patch = sum(t * h * w for t, h, w in grids)
  return {"input_ids": ids, "attention_mask": np.ones_like(ids),
          "pixel_values": rng.randn(n_patch, 3 * TEMPORAL * PATCH * PATCH).astype(np.float32),
          "image_grid_thw": np.asarray(grids, np.int64)}


def text_targets(ids, image_token_id: int):
  """Loss mask with no target at image tokens (LLaVA-style training data)."""
  return (ids != image_token_id).astype("int32")


def flops_per_step(p: dict, batch: int, seq: int, rank: int) -> float:
  """LoRA step FLOPs (see the module docstring)."""
  d, f, L, vocab = p["hidden"], p["inter"], p["layers"], p["vocab"]
  kvd = d * p["kv"] // p["heads"]
  mats = [(d, d), (d, kvd), (d, kvd), (d, d), (d, f), (d, f), (f, d)]
  tok = batch * seq
  llm_fwd = 2 * (L * sum(i * o for i, o in mats) + d * vocab) * tok + L * 4 * seq * d * tok
  vd, vf = p["v_hidden"], p["v_inter"]
  win = (p["window"] // PATCH) ** 2
  vis = 0
  for t, h, w in [p["grids"][r % len(p["grids"])] for r in range(batch)]:
    n = t * h * w
    per_layer = 2 * (4 * vd * vd + 3 * vd * vf) * n
    full = len(p["fullatt"])
    vis += p["v_depth"] * per_layer + 4 * vd * n * (full * n + (p["v_depth"] - full) * win)
    vis += 2 * 3 * TEMPORAL * PATCH * PATCH * vd * n  # patch embedding
    m = MERGE ** 2 * vd
    vis += 2 * (m * m + m * d) * n // MERGE ** 2  # merger MLP
  lora = L * sum(rank * (i + o) for i, o in mats) * 2 * tok
  return vis + 2 * llm_fwd + 3 * lora


def jax_worker(args):
  import jax
  import jax.numpy as jnp
  import mllm_tune as mt
  p = PRESETS[args.preset]
  if args.init == "checkpoint":
    model, params = mt.load_pretrained(args.model_dir, dtype=args.dtype, param_dtype=args.dtype)
  else:
    from mllm_tune.checkpoints.hf import read_config
    from mllm_tune.models import build_model, init_params
    model = build_model(read_config(args.model_dir, args.dtype, args.dtype))
    params = init_params(model, jax.random.key(0))
  with open(os.path.join(args.model_dir, "config.json")) as f:
    enc = make_batch(json.load(f), p, args.batch, args.seq)
  kw = dict(mt.hf_inputs(model, enc))
  if args.loss_on == "text":
    kw["loss_mask"] = text_targets(enc["input_ids"], model.config.image_token_id)
  kw["pixel_values"] = jnp.asarray(kw["pixel_values"], args.dtype)
  step, frozen, state, batch = jax_step(model, params, kw, "lora", args.lora_rank)
  del params
  times, loss = time_steps(step, frozen, state, batch, args.steps)
  out = {"times": times, "loss": loss}
  if jax.devices()[0].platform == "gpu":
    out["peak_device_mb"] = jax.devices()[0].memory_stats()["peak_bytes_in_use"] / 2**20
  return out


def torch_worker(args):
  import torch
  from peft import LoraConfig, get_peft_model
  from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration
  torch.manual_seed(0)
  dev = torch.device("cuda" if args.platform == "gpu" else "cpu")
  dtype = getattr(torch, args.dtype)
  cls = Qwen2_5_VLForConditionalGeneration
  if args.init == "checkpoint":
    model = cls.from_pretrained(args.model_dir, dtype=dtype).to(dev)
  else:
    with torch.device(dev):
      model = cls._from_config(AutoConfig.from_pretrained(args.model_dir), dtype=dtype)
  with open(os.path.join(args.model_dir, "config.json")) as f:
    enc = make_batch(json.load(f), PRESETS[args.preset], args.batch, args.seq)
  model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                           target_modules=HF_TARGETS))
  model.train()
  t = {k: torch.tensor(v, device=dev) for k, v in enc.items()}
  t["pixel_values"] = t["pixel_values"].to(dtype)
  ids = t["input_ids"]
  labels = ids.clone()
  if args.loss_on == "text":
    labels[ids == model.config.image_token_id] = -100  # ignored by the cross-entropy
  opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5,
                          weight_decay=0.0)
  sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    logits = model(**t).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             labels[:, 1:].reshape(-1), ignore_index=-100)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    times.append(time.perf_counter() - t0)
  out = {"times": times[2:], "loss": float(loss.detach())}
  if dev.type == "cuda":
    out["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20
  return out


def build_model_dir(preset: str, init: str) -> str:
  d = tempfile.mkdtemp(prefix="qwen_perf_")
  cfg = hf_config(PRESETS[preset])
  if init == "random":
    cfg.save_pretrained(d)
    return d
  import torch
  from transformers import Qwen2_5_VLForConditionalGeneration
  torch.manual_seed(0)
  Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(d)
  return d


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--worker", choices=["jax", "torch"])
  ap.add_argument("--model_dir", default="")
  ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
  ap.add_argument("--platform", default="cpu", choices=["cpu", "gpu"])
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--init", default="", choices=["", "checkpoint", "random"],
                  help="default: checkpoint on CPU, random on GPU")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--loss_on", default="all", choices=["all", "text"],
                  help="positions with a target: every next token, or only text tokens (image "
                       "tokens get none, as in LLaVA training data)")
  ap.add_argument("--steps", type=int, default=8)
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--lora_rank", type=int, default=16)
  ap.add_argument("--peak_gflops", type=float, default=0.0,
                  help="peak FLOP/s for MFU in GFLOP/s (default: 200 on CPU, 989000 on GPU)")
  ap.add_argument("--glibc_tunables", default="",
                  help="GLIBC_TUNABLES for both workers, e.g. glibc.malloc.hugetlb=1")
  ap.add_argument("--out", default="")
  ap.add_argument("--results", default=os.path.join(ROOT, "results", "qwen_cpu.md"))
  args = ap.parse_args()
  args.init = args.init or ("random" if args.platform == "gpu" else "checkpoint")
  if args.worker:
    res = (jax_worker if args.worker == "jax" else torch_worker)(args)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(args.out, "w") as f:
      json.dump(res, f)
    return
  if args.preset == "tiny":
    args.seq, args.steps, args.repeats = min(args.seq, 128), 4, 1
  model_dir = build_model_dir(args.preset, args.init)
  args.load_before = os.getloadavg()[0]
  runs = {"jax": [], "torch": []}
  for rep in range(args.repeats):
    for w in ("jax", "torch"):
      out = os.path.join(model_dir, f"{w}{rep}.json")
      cmd = [sys.executable, __file__, "--worker", w, "--model_dir", model_dir, "--preset",
             args.preset, "--platform", args.platform, "--dtype", args.dtype, "--init",
             args.init, "--batch", str(args.batch), "--seq", str(args.seq), "--steps",
             str(args.steps), "--lora_rank", str(args.lora_rank), "--loss_on", args.loss_on,
             "--out", out]
      env = {**os.environ, "PYTHONPATH": ROOT, "GLIBC_TUNABLES": args.glibc_tunables}
      if args.platform == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
      subprocess.run(cmd, check=True, env=env)
      with open(out) as f:
        runs[w].append(json.load(f))
  report(runs, args)


def report(runs, args):
  import importlib.metadata as md
  p = PRESETS[args.preset]
  med = {w: statistics.median(x for r in rs for x in r["times"]) for w, rs in runs.items()}
  mem = {w: max(r.get("peak_device_mb", r["peak_rss_mb"]) for r in rs) for w, rs in runs.items()}
  peak = args.peak_gflops or (989000.0 if args.platform == "gpu" else 200.0)
  fl = flops_per_step(p, args.batch, args.seq, args.lora_rank)
  mfu = {w: fl / med[w] / (peak * 1e9) for w in med}
  vers = ", ".join(f"{k} {md.version(k)}" for k in ("jax", "torch", "transformers", "peft"))
  kind = "device" if args.platform == "gpu" else "RSS"
  lines = [
      f"# Qwen2.5-VL-shaped LoRA step, {args.platform.upper()} ({time.strftime('%Y-%m-%d')})",
      "",
      f"`python perf/qwen_step.py {' '.join(sys.argv[1:])}` ({vers}; {os.cpu_count()} CPUs). "
      f"Preset `{args.preset}`: vision {p['v_depth']}x{p['v_hidden']} (window {p['window']} px, "
      f"full blocks {p['fullatt']}), LLM {p['layers']}x{p['hidden']} (heads {p['heads']}/"
      f"{p['kv']}, vocab {p['vocab']}); grids {p['grids']}; {args.init} weights, {args.dtype}; "
      f"LoRA r={args.lora_rank} on every LLM linear. Median step over {args.repeats} "
      f"alternating process runs x {args.steps - 2} timed steps; MFU against {peak:.0f} "
      f"GFLOP/s ({fl / 1e12:.2f} TFLOP per step). Environment for both: "
      f"{'GLIBC_TUNABLES=' + args.glibc_tunables if args.glibc_tunables else 'default'}. "
      "Host load average (1 min) before / after: "
      f"{getattr(args, 'load_before', float('nan')):.1f} / {os.getloadavg()[0]:.1f} (other "
      "work on the cores slows both sides, transformers more; only a quiet host's ratio "
      "counts).", "",
      f"| preset | batch x seq | mllm_tune step | transformers + peft | speed-up | MFU ours / "
      f"theirs | peak {kind} MB ours / theirs |", "|---|---|---|---|---|---|---|",
      f"| {args.preset} | {args.batch} x {args.seq} | {1e3 * med['jax']:.0f} ms | "
      f"{1e3 * med['torch']:.0f} ms | **{med['torch'] / med['jax']:.2f}x** | "
      f"{100 * mfu['jax']:.0f}% / {100 * mfu['torch']:.0f}% | {mem['jax']:.0f} / "
      f"{mem['torch']:.0f} |", "",
      f"Last training loss (random weights, same batch): ours {runs['jax'][0]['loss']:.4f}, "
      f"transformers {runs['torch'][0]['loss']:.4f}" + (" (same checkpoint)." if args.init ==
      "checkpoint" else " (each framework's own random init)."), ""]
  text = "\n".join(lines)
  print(text)
  if args.results and args.preset != "tiny":
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "w") as f:
      f.write(text)
    with open(os.path.splitext(args.results)[0] + "_runs.json", "w") as f:
      json.dump(runs, f, indent=1)


if __name__ == "__main__":
  main()
