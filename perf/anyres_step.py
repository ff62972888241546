"""LLaVA-OneVision-shaped LoRA training step: mllm_tune (JAX) vs transformers + peft, same run,
plus the number of distinct compiled step programs over a run with mixed image sizes.

    python perf/anyres_step.py                    # driver: both frameworks, alternating; report
    python perf/anyres_step.py --preset tiny      # seconds, for a dry run
    python perf/anyres_step.py --worker jax --out r.json   # one measurement

The model (SigLIP tower + 2-layer-MLP projector + Qwen2 LLM, anyres tiling with OneVision's
unpadding, bilinear downsampling and newline tokens) is built once with random weights by
transformers and saved; both workers load it. The batch: `--batch` rows, each one image of a
different size (tall, wide, square, small) plus text up to `--seq` tokens; transformers gets
its own layout (pixel_values (N, max crops, 3, S, S) + image_sizes), we get `mt.hf_inputs` of
the same arrays. LoRA r=16 (alpha 32) on every LLM linear, AdamW, float32 on CPU; each worker is
its own process and the driver alternates them `--repeats` times (median step time); both run
in the same environment, the default one unless `--glibc_tunables` sets `GLIBC_TUNABLES` for
both (e.g. `glibc.malloc.hugetlb=1`; see results/qwen_cpu.md for what it does to each side).

Compiled programs: `--programs_steps` batches of the regular data pipeline (packing, crop
buckets) over LLaVA-format JSON records whose images take 8 sizes, fed to the jitted LoRA step of
the same model; the count is the jit cache size after the run (one program per batch shape).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "perf"))

from bench_models import jax_step, time_steps  # noqa: E402

PRESETS = {  # vision: hidden, layers, crop, patch; llm: hidden, inter, layers, heads, kv
    "cpu": dict(v_hidden=128, v_inter=512, v_layers=4, v_heads=4, crop=112, patch=14,
                hidden=512, inter=1376, layers=6, heads=8, kv=4, vocab=8000),
    "tiny": dict(v_hidden=32, v_inter=64, v_layers=1, v_heads=2, crop=28, patch=14,
                 hidden=64, inter=128, layers=2, heads=4, kv=2, vocab=512),
}
SIZES_HW = [(300, 200), (180, 420), (224, 224), (90, 120), (512, 256), (150, 600), (64, 64),
            (333, 250)]
HF_TARGETS = (r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|"
              r"mlp\.(gate|up|down)_proj)")
IMAGE_TOKEN = 5


def hf_config(p):
  from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig
  c = p["crop"]
  return LlavaOnevisionConfig(
      vision_config=SiglipVisionConfig(hidden_size=p["v_hidden"], intermediate_size=p["v_inter"],
                                       num_hidden_layers=p["v_layers"],
                                       num_attention_heads=p["v_heads"], image_size=c,
                                       patch_size=p["patch"], vision_use_head=False),
      text_config=Qwen2Config(vocab_size=p["vocab"], hidden_size=p["hidden"],
                              intermediate_size=p["inter"], num_hidden_layers=p["layers"],
                              num_attention_heads=p["heads"], num_key_value_heads=p["kv"],
                              max_position_embeddings=8192),
      image_token_index=IMAGE_TOKEN,
      image_grid_pinpoints=[[c * i, c * j] for i in range(1, 4) for j in range(1, 4)],
      vision_aspect_ratio="anyres_max_4")


def make_batch(cfg, batch: int, seq: int, seed: int = 0):
  """HF-layout arrays: ids (B, T) with one image run per row, pixel_values (B, max crops, 3, S,
  S), image_sizes (B, 2)."""
  import numpy as np
  from mllm_tune.models import hf_inputs as hfi
  sizes = np.asarray([SIZES_HW[i % len(SIZES_HW)] for i in range(batch)])
  crops = hfi.anyres_crop_counts(cfg, sizes)
  tokens = [len(t) for t in hfi.image_tables(cfg, sizes, crops)]
  if max(tokens) + 8 > seq:
    raise SystemExit(f"--seq {seq} is shorter than an image run ({max(tokens)} tokens)")
  rng = np.random.RandomState(seed)
  ids = rng.randint(10, cfg.llm.vocab_size, size=(batch, seq))
  for r, n in enumerate(tokens):
    ids[r, 4:4 + n] = IMAGE_TOKEN
  s = cfg.vision.image_size
  px = np.zeros((batch, max(crops), 3, s, s), np.float32)
  for r, n in enumerate(crops):
    px[r, :n] = rng.randn(n, 3, s, s)
  return ids, px, sizes


def jax_worker(args):
  import mllm_tune as mt
  model, params = mt.load_pretrained(args.model_dir)
  ids, px, sizes = make_batch(model.config, args.batch, args.seq)
  kw = mt.hf_inputs(model, {"input_ids": ids, "pixel_values": px, "image_sizes": sizes})
  if args.loss_on == "text":
    kw["loss_mask"] = (ids != IMAGE_TOKEN).astype("int32")
  step, frozen, state, batch = jax_step(model, params, kw, "lora", 16)
  times, loss = time_steps(step, frozen, state, batch, args.steps)
  out = {"times": times, "loss": loss}
  if args.programs_steps:
    out.update(count_programs(model, params, args))
  return out


def count_programs(model, params, args) -> dict:
  """Run the LoRA step over `programs_steps` batches of the data pipeline (mixed image sizes)."""
  import jax
  from mllm_tune.data.loader import make_batches
  data_json = write_records(args.model_dir, n=400)
  it = make_batches(dict(kind="llava_json", json_path=data_json,
                         image_folder=os.path.join(args.model_dir, "images"), seq_len=args.seq,
                         batch_size=args.batch, packing=True, prefetch=0, num_workers=0,
                         on_error="raise"), args.model_dir, model.config)
  first = dict(next(it))
  step, frozen, state, _ = jax_step(model, params, first, "lora", 16)
  # the step's outputs are committed to the device: so are its inputs from the first call on
  dev = jax.devices()[0]
  state, frozen = jax.device_put((state, frozen), dev)
  shapes, t0 = set(), time.perf_counter()
  for i in range(args.programs_steps):
    b = first if i == 0 else dict(next(it))
    shapes.add((b["input_ids"].shape, b["pixel_values"].shape))
    state, metrics = step(frozen, state, jax.device_put(b, dev))
  jax.block_until_ready(metrics["loss"])
  return {"programs": int(step._cache_size()), "batch_shapes": sorted(map(str, shapes)),
          "crop_buckets": list(it.spec.crop_buckets), "programs_run_s": time.perf_counter() - t0}


def write_records(model_dir: str, n: int) -> str:
  """LLaVA-format JSON with one image (8 sizes) or text only per record."""
  import numpy as np
  from PIL import Image
  rng = np.random.RandomState(0)
  folder = os.path.join(model_dir, "images")
  os.makedirs(folder, exist_ok=True)
  for k, (h, w) in enumerate(SIZES_HW):
    Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(
        os.path.join(folder, f"{k}.png"))
  words = "the a cat dog red blue square circle left right small big".split()
  records = []
  for i in range(n):
    q = " ".join(rng.choice(words, 3 + i % 5))
    a = " ".join(rng.choice(words, 2 + i % 7))
    rec = {"id": str(i), "conversations": [{"from": "human", "value": "<image> " + q},
                                           {"from": "gpt", "value": a}]}
    if i % 5:
      rec["image"] = f"{i % len(SIZES_HW)}.png"
    else:
      rec["conversations"][0]["value"] = q
    records.append(rec)
  path = os.path.join(model_dir, "data.json")
  with open(path, "w") as f:
    json.dump(records, f)
  return path


def torch_worker(args):
  import torch
  from peft import LoraConfig, get_peft_model
  from transformers import LlavaOnevisionForConditionalGeneration
  torch.manual_seed(0)
  model = LlavaOnevisionForConditionalGeneration.from_pretrained(args.model_dir,
                                                                 dtype=torch.float32)
  from mllm_tune.models.config import config_from_hf
  with open(os.path.join(args.model_dir, "config.json")) as f:
    cfg = config_from_hf(json.load(f))
  ids, px, sizes = make_batch(cfg, args.batch, args.seq)
  model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=HF_TARGETS))
  model.train()
  ids_t, px_t, sz_t = torch.tensor(ids), torch.tensor(px), torch.tensor(sizes)
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                          weight_decay=0.0)
  labels = ids_t.clone()
  if args.loss_on == "text":
    labels[ids_t == IMAGE_TOKEN] = -100  # ignored by the cross-entropy
  times = []
  for _ in range(args.steps):
    t = time.perf_counter()
    logits = model(input_ids=ids_t, pixel_values=px_t, image_sizes=sz_t).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             labels[:, 1:].reshape(-1), ignore_index=-100)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t)
  return {"times": times[2:], "loss": float(loss)}


def build_model_dir(preset: str) -> str:
  """Random-weight HF model + tokenizer + processor files in a temp directory."""
  import torch
  from transformers import LlavaOnevisionForConditionalGeneration
  from mllm_tune.benchmark.assets import train_tokenizer
  p = PRESETS[preset]
  torch.manual_seed(0)
  d = tempfile.mkdtemp(prefix="anyres_perf_")
  cfg = hf_config(p)
  tok = train_tokenizer()  # byte-level BPE, ChatML template, `<image>` special
  cfg.image_token_id = tok.convert_tokens_to_ids("<image>")
  global IMAGE_TOKEN
  IMAGE_TOKEN = cfg.image_token_id
  LlavaOnevisionForConditionalGeneration(cfg).save_pretrained(d)
  tok.save_pretrained(d)
  write_processor(d, cfg)
  return d


def write_processor(d: str, cfg) -> None:
  from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
      LlavaOnevisionImageProcessorPil)
  c = cfg.vision_config.image_size
  LlavaOnevisionImageProcessorPil(size={"height": c, "width": c}, image_mean=[0.5] * 3,
                                  image_std=[0.5] * 3,
                                  image_grid_pinpoints=cfg.image_grid_pinpoints
                                  ).save_pretrained(d)
  side = c // cfg.vision_config.patch_size
  with open(os.path.join(d, "processor_config.json"), "w") as f:
    json.dump({"processor_class": "LlavaOnevisionProcessor", "num_image_tokens": side * side,
               "vision_feature_select_strategy": "full",
               "vision_aspect_ratio": cfg.vision_aspect_ratio}, f)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--worker", choices=["jax", "torch"])
  ap.add_argument("--model_dir", default="")
  ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=1024)
  ap.add_argument("--loss_on", default="all", choices=["all", "text"],
                  help="positions with a target: every next token, or only text tokens (image "
                       "tokens get none, as in LLaVA training data)")
  ap.add_argument("--steps", type=int, default=8)
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--programs_steps", type=int, default=200)
  ap.add_argument("--glibc_tunables", default="",
                  help="GLIBC_TUNABLES for both workers, e.g. glibc.malloc.hugetlb=1")
  ap.add_argument("--out", default="")
  ap.add_argument("--results", default=os.path.join(ROOT, "results", "anyres_cpu.md"))
  args = ap.parse_args()
  if args.worker:
    global IMAGE_TOKEN
    with open(os.path.join(args.model_dir, "config.json")) as f:
      IMAGE_TOKEN = json.load(f)["image_token_index"]
    res = (jax_worker if args.worker == "jax" else torch_worker)(args)
    with open(args.out, "w") as f:
      json.dump(res, f)
    return
  if args.preset == "tiny":
    args.seq, args.steps, args.repeats = min(args.seq, 256), 4, 1
    args.programs_steps = min(args.programs_steps, 20)
  model_dir = build_model_dir(args.preset)
  runs = {"jax": [], "torch": []}
  extra = {}
  for rep in range(args.repeats):
    for w in ("jax", "torch"):
      out = os.path.join(model_dir, f"{w}{rep}.json")
      cmd = [sys.executable, __file__, "--worker", w, "--model_dir", model_dir,
             "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
             "--loss_on", args.loss_on,
             "--programs_steps", str(args.programs_steps if (w, rep) == ("jax", 0) else 0),
             "--out", out]
      subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": ROOT,
                                           "GLIBC_TUNABLES": args.glibc_tunables})
      with open(out) as f:
        res = json.load(f)
      runs[w] += res["times"]
      extra.update({k: v for k, v in res.items() if k not in ("times", "loss")})
  report(runs, extra, args)


def report(runs, extra, args):
  import jax
  import torch
  import transformers
  import peft
  jt, tt = statistics.median(runs["jax"]), statistics.median(runs["torch"])
  tunables = f" --glibc_tunables {args.glibc_tunables}" if args.glibc_tunables else ""
  lines = [
      f"# LLaVA-OneVision-shaped LoRA step, CPU ({time.strftime('%Y-%m-%d')})", "",
      f"`python perf/anyres_step.py --preset {args.preset} --batch {args.batch} "
      f"--seq {args.seq} --loss_on {args.loss_on}{tunables}` (jax {jax.__version__}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, peft {peft.__version__}; "
      f"{os.cpu_count()} CPUs).", "",
      "| preset | batch x seq | loss on | mllm_tune step (ms) | transformers + peft (ms) | "
      "speed-up |",
      "|---|---|---|---|---|---|",
      f"| {args.preset} | {args.batch} x {args.seq} | {args.loss_on} | {1e3 * jt:.0f} | "
      f"{1e3 * tt:.0f} | {tt / jt:.2f}x |", ""]
  if "programs" in extra:
    lines += [f"Compiled step programs over {args.programs_steps} packed batches of LLaVA "
              f"JSON with images of {len(SIZES_HW)} sizes: **{extra['programs']}** (crop "
              f"buckets {extra['crop_buckets']}; batch shapes {extra['batch_shapes']}).", ""]
  text = "\n".join(lines)
  print(text)
  if args.results and args.preset != "tiny":
    with open(args.results, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
