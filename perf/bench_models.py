"""Model presets, batches and analytic FLOPs shared by perf/throughput.py and profile_step.py,
and the jitted training step every perf script times (`jax_step`, `time_steps`).

Sizes (`PRESETS`): `cpu` (the ~70M LLaVA of results/cpu.md), `llava7b` (CLIP ViT-L/14-336
+ Llama-2-7B dims), `llava1p5b` (CLIP ViT-B/16 + a 24x2048 Llama, ~1.5B), `tiny` (smoke tests).
FLOPs are counted analytically (see `flops_per_step`).
"""
from __future__ import annotations

import time

LORA_TARGETS = r"llm/layers_\d+/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"
SIZES = dict(vocab=32000, hidden=512, inter=1376, layers=8, heads=8, kv=8,
             v_hidden=384, v_inter=1536, v_layers=6, v_heads=6, image=224, patch=16)
PRESETS = {
    "cpu": SIZES,
    "llava7b": dict(vocab=32064, hidden=4096, inter=11008, layers=32, heads=32, kv=32,
                    v_hidden=1024, v_inter=4096, v_layers=24, v_heads=16, image=336, patch=14),
    "llava1p5b": dict(vocab=32000, hidden=2048, inter=5632, layers=24, heads=16, kv=16,
                      v_hidden=768, v_inter=3072, v_layers=12, v_heads=12, image=224, patch=16),
    "tiny": dict(vocab=512, hidden=64, inter=128, layers=2, heads=4, kv=2,
                 v_hidden=32, v_inter=64, v_layers=1, v_heads=2, image=32, patch=16),
}


def hf_model(s=SIZES):
  import torch
  from transformers import LlavaForConditionalGeneration
  torch.manual_seed(0)
  return LlavaForConditionalGeneration(hf_config(s))


def hf_config(s=SIZES):
  from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
  vc = CLIPVisionConfig(hidden_size=s["v_hidden"], intermediate_size=s["v_inter"],
                        num_hidden_layers=s["v_layers"], num_attention_heads=s["v_heads"],
                        image_size=s["image"], patch_size=s["patch"])
  tc = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                   num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                   num_key_value_heads=s["kv"], max_position_embeddings=2048)
  return LlavaConfig(vision_config=vc, text_config=tc, image_token_index=s["vocab"] - 1)


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
  """Model FLOPs of one training step (`mode` full | lora), counted as perf/throughput.py's
  docstring says: 2 * in * out per token per matmul forward, backward 2x (trained) or 1x
  (frozen, input gradient only), attention 4 * T * d per layer per token forward."""
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


def param_count(s) -> int:
  """Exact parameter count of the HF model for sizes `s` (built on the meta device)."""
  import torch
  from transformers import LlavaForConditionalGeneration
  with torch.device("meta"):
    return sum(p.numel() for p in LlavaForConditionalGeneration(hf_config(s)).parameters())


def jax_step(model, params, batch: dict, mode: str = "lora", lora_rank: int = 16,
             loss_chunk: int = 256, targets: str = LORA_TARGETS):
  """(jitted step, frozen, state, device batch): `mode` "full" (AdamW on everything) or "lora"
  (rank `lora_rank`, alpha 2 * rank, on `targets`, AdamW); `loss_chunk` positions per chunk of
  the fused head + CE (0: full logits). `batch` holds model keyword arrays (numpy or jax);
  `attention_mask` and `loss_mask` default to ones. The state is donated to each call."""
  import jax
  import jax.numpy as jnp
  import optax
  import mllm_tune as mt
  from mllm_tune.train.step import StepFns, TrainState, train_step
  if mode == "full":
    method = mt.tuning.get("freeze", preset="full")
  else:
    method = mt.tuning.get("lora", rank=lora_rank, alpha=2 * lora_rank, targets=targets)
  variables = method.init_variables(jax.random.key(0), params)
  mask = method.trainable(variables)
  trainable, frozen = mt.tuning.partition(variables, mask)
  opt = mt.tuning.build_optimizer(method, variables, mask, trainable, optax.adamw(1e-5))
  fns = StepFns(model, method, opt, loss_chunk=loss_chunk)
  state = TrainState(jnp.zeros((), jnp.int32), trainable, opt.init(trainable),
                     jax.random.key(0))
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  for k in ("attention_mask", "loss_mask"):
    batch.setdefault(k, jnp.ones_like(batch["input_ids"]))
  step = jax.jit(lambda f, s, b: train_step(fns, f, s, b), donate_argnums=(1,))
  return step, frozen, state, batch


def time_steps(step, frozen, state, batch, steps: int) -> tuple[list[float], float]:
  """Wall time of `steps` calls of `step` (each waited for), without the first 2 (compile and
  warm-up), and the last loss."""
  import jax
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = step(frozen, state, batch)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - t)
  return times[2:], float(metrics["loss"])
