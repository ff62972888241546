"""Offline demo. Until the benchmark issue lands, this is the foundation's end-to-end path:
build a tiny LLaVA, write it as a Hugging Face directory, read it back (bit-exact), convert to the
native orbax format and back, and run batched greedy generation with images."""
from __future__ import annotations

import os
import time

import jax
import numpy as np

from mllm_tune.models.config import LLMConfig, LlavaConfig, VisionConfig


def tiny_llava_config() -> LlavaConfig:
  return LlavaConfig(
      vision=VisionConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                          image_size=56, patch_size=14),
      llm=LLMConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256),
      image_token_id=255)


def run_smoke_demo(out: str) -> None:
  import mllm_tune as mt
  from mllm_tune.checkpoints.native import load_native, save_native
  t0 = time.time()
  model = mt.build_model(tiny_llava_config())
  params = mt.init_params(model, jax.random.key(0))
  hf_dir, native_dir = os.path.join(out, "hf"), os.path.join(out, "native")
  mt.save_pretrained(hf_dir, model, params)
  model, loaded = mt.load_pretrained(hf_dir)
  same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params),
                                                  jax.tree.leaves(loaded)))
  save_native(native_dir, model, loaded)
  model, params = load_native(native_dir)
  n_img = model.config.image_seq_len
  rows = [[1, 7] + [255] * n_img + [9, 10], [1, 30, 31, 32]]
  width = max(map(len, rows))
  ids = np.array([[0] * (width - len(r)) + r for r in rows])  # left-padded with id 0
  mask = (np.arange(width)[None] >= width - np.array([[len(r)] for r in rows])).astype(np.int32)
  px = np.random.RandomState(0).rand(1, 56, 56, 3).astype(np.float32)
  t1 = time.time()
  new = mt.generate(model, params, ids, mask, px, max_new_tokens=16)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"tiny LLaVA: {n_params:,} params; HF round trip bit-exact: {same}")
  print(f"wrote {hf_dir} (transformers-loadable) and {native_dir} (orbax)")
  print(f"greedy tokens (image+text prompt, text-only prompt):\n{np.asarray(new)}")
  print(f"generate {time.time() - t1:.2f}s (incl. compile); total {time.time() - t0:.2f}s")
