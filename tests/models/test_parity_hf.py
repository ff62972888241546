"""Logit and greedy-generation parity with transformers' PyTorch models (float32, CPU)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import mllm_tune as mt
from tests.helpers import hf_tiny

ATOL = 1e-4


def _pixels(n: int, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randn(n, 28, 28, 3).astype(np.float32)


def _mm_batch(per_image: int):
  """Row 0: one image, right-padded; row 1: two images, left-padded; row 2: text only."""
  img = hf_tiny.image_tokens
  rows = [[1, 5] + img(per_image, 1) + [7, 8, 9],
          [1, 3] + img(per_image, 1) + [4] + img(per_image, 1) + [6, 11, 12, 13],
          [1, 20, 21, 22]]
  return hf_tiny.padded_batch(rows, ["right", "left", "right"]), _pixels(3)


def _save(hf_model, tmp_path, name="hf", **kw) -> str:
  d = str(tmp_path / name)
  hf_model.save_pretrained(d, **kw)
  return d


def _check_logits(model, params, hf_model, ids, mask, px=None):
  ours = np.asarray(model.apply({"params": params}, ids, mask, pixel_values=px))
  ref = hf_tiny.hf_logits(hf_model, ids, mask, px)
  real = mask.astype(bool)
  assert ours.shape == ref.shape and ours.dtype == np.float32
  np.testing.assert_allclose(ours[real], ref[real], atol=ATOL, rtol=0)
  return ours


@pytest.mark.parametrize("build", [hf_tiny.clip_llama, hf_tiny.siglip_qwen2],
                         ids=["clip_llama", "siglip_qwen2"])
def test_llava_logits_padded_batch_with_images(build, tmp_path):
  hf_model = build()
  model, params = mt.load_pretrained(_save(hf_model, tmp_path))
  (ids, mask), px = _mm_batch(model.config.image_seq_len)
  _check_logits(model, params, hf_model, ids, mask, px)


def test_siglip_qwen2_config_is_what_the_test_claims(tmp_path):
  hf_model = hf_tiny.siglip_qwen2()
  d = _save(hf_model, tmp_path)
  model, params = mt.load_pretrained(d)
  c = model.config
  assert c.llm.qkv_bias and c.llm.tie_word_embeddings and "lm_head" not in params["llm"]
  assert c.vision.use_head and "head" in params["vision"]
  assert c.vision_feature_select_strategy == "full" and c.image_seq_len == 4


def test_llava_generate_matches_hf(tmp_path):
  hf_model = hf_tiny.clip_llama()
  model, params = mt.load_pretrained(_save(hf_model, tmp_path))
  (ids, mask), px = _mm_batch(model.config.image_seq_len)
  ids, mask = mt.eval.generate.left_pad(ids, mask)
  ours = np.asarray(mt.generate(model, params, ids, mask, px, max_new_tokens=20))
  ref = hf_tiny.hf_generate(hf_model, ids, mask, px, max_new_tokens=20)
  np.testing.assert_array_equal(ours, ref)


def test_generate_right_padded_prompts_are_moved_left(tmp_path):
  hf_model = hf_tiny.qwen2(tie_word_embeddings=True)
  model, params = mt.load_pretrained(_save(hf_model, tmp_path))
  rows = [[1, 5, 6, 7, 8, 9], [1, 30, 31]]
  ids_r, mask_r = hf_tiny.padded_batch(rows, "right")
  ids_l, mask_l = hf_tiny.padded_batch(rows, "left")
  ours = np.asarray(mt.generate(model, params, ids_r, mask_r, max_new_tokens=20))
  np.testing.assert_array_equal(ours, hf_tiny.hf_generate(hf_model, ids_l, mask_l))


def test_generate_stops_at_eos_like_hf(tmp_path):
  hf_model = hf_tiny.llama()
  model, params = mt.load_pretrained(_save(hf_model, tmp_path))
  ids, mask = hf_tiny.padded_batch([[1, 5, 6, 7], [1, 40, 41, 42, 43, 44]], "left")
  free = hf_tiny.hf_generate(hf_model, ids, mask, max_new_tokens=12)
  eos = int(free[0, 3])  # a token row 0 emits mid-way: it must stop there, padded after
  ref = hf_tiny.hf_generate(hf_model, ids, mask, max_new_tokens=12, eos_token_id=eos)
  ours = np.asarray(mt.generate(model, params, ids, mask, max_new_tokens=12, eos_token_id=eos,
                                pad_token_id=0))
  assert ref.shape[1] <= 12
  np.testing.assert_array_equal(ours[:, :ref.shape[1]], ref)
  assert (ours[0, 4:] == 0).all()


LLM_CASES = {
    # GQA with 6 query heads on 2 kv heads (neither 1 nor the head count)
    "llama_gqa": lambda: hf_tiny.llama(hidden_size=48, num_attention_heads=6,
                                       num_key_value_heads=2, attention_bias=True,
                                       mlp_bias=True),
    "llama3_rope": lambda: hf_tiny.llama(
        hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64}),
    "linear_rope": lambda: hf_tiny.llama(rope_parameters={"rope_type": "linear",
                                                          "rope_theta": 10000.0,
                                                          "factor": 4.0}),
    "qwen2_tied": lambda: hf_tiny.qwen2(tie_word_embeddings=True),
    "mistral_sliding": lambda: hf_tiny.mistral(sliding_window=16),
}


@pytest.mark.parametrize("name", sorted(LLM_CASES))
def test_llm_logits(name, tmp_path):
  hf_model = LLM_CASES[name]()
  model, params = mt.load_pretrained(_save(hf_model, tmp_path))
  rng = np.random.RandomState(0)
  long_row = rng.randint(3, 99, size=120).tolist()  # long enough for llama3's scaled band
  ids, mask = hf_tiny.padded_batch([long_row, long_row[:50], long_row[:7]],
                                   ["right", "left", "left"])
  _check_logits(model, params, hf_model, ids, mask)


def test_llama3_rope_inverse_frequencies_match_hf():
  import torch  # noqa: F401
  from transformers import LlamaConfig
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  from mllm_tune.models.config import llm_config_from_hf
  from mllm_tune.models.llm import rope_inv_freq
  for rope in ({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192},
               {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}):
    hf_cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32,
                         max_position_embeddings=131072, rope_parameters=dict(rope))
    ref, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_cfg, "cpu")
    ours = rope_inv_freq(llm_config_from_hf(hf_cfg.to_dict()).rope, 128)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)
    assert np.ptp(ours / ref.numpy()) > 0 or rope["rope_type"] == "linear"


def test_sharded_hf_checkpoint(tmp_path):
  hf_model = hf_tiny.clip_llama()
  d = _save(hf_model, tmp_path, max_shard_size="40KB")
  with open(os.path.join(d, "model.safetensors.index.json")) as f:
    shards = set(json.load(f)["weight_map"].values())
  assert len(shards) > 2
  model, params = mt.load_pretrained(d)
  (ids, mask), px = _mm_batch(model.config.image_seq_len)
  _check_logits(model, params, hf_model, ids, mask, px)


def test_logits_do_not_depend_on_padding(tmp_path):
  hf_model = hf_tiny.clip_llama()
  model, params = mt.load_pretrained(_save(hf_model, tmp_path))
  per = model.config.image_seq_len
  row = [1, 5] + hf_tiny.image_tokens(per, 1) + [7, 8, 9]
  px = _pixels(1)
  alone = np.asarray(model.apply({"params": params}, np.array([row]), np.ones((1, len(row))),
                                 pixel_values=px))
  ids, mask = hf_tiny.padded_batch([row, row + [3] * 4], "left")
  batched = np.asarray(model.apply({"params": params}, ids, mask,
                                   pixel_values=np.concatenate([px, px])))
  np.testing.assert_allclose(batched[0, 4:], alone[0], atol=1e-5)
