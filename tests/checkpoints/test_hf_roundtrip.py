"""HF -> ours -> HF: bit-exact tensors, every key layout loads back in transformers."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

import mllm_tune as mt
from mllm_tune.checkpoints import hf as hf_io
from tests.helpers import hf_tiny
from tests.helpers.hf_parity import assert_same_tensors, safetensors_tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("build", [hf_tiny.clip_llama, hf_tiny.siglip_qwen2],
                         ids=["clip_llama", "siglip_qwen2"])
def test_roundtrip_is_bit_exact(build, dtype, tmp_path):
  src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
  build().to(dtype).save_pretrained(src)
  model, params = mt.load_pretrained(src)
  mt.save_pretrained(dst, model, params)
  assert_same_tensors(safetensors_tensors(src), safetensors_tensors(dst))
  with open(os.path.join(dst, "config.json")) as f:
    assert json.load(f)["dtype"] == str(dtype).split(".")[-1]


def test_written_llava_loads_in_transformers_with_identical_logits(tmp_path):
  hf_model = hf_tiny.siglip_qwen2()
  src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
  hf_model.save_pretrained(src)
  model, params = mt.load_pretrained(src)
  mt.save_pretrained(dst, model, params, max_shard_size="30KB")
  assert os.path.exists(os.path.join(dst, "model.safetensors.index.json"))
  back, info = LlavaForConditionalGeneration.from_pretrained(dst, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  ids, mask = hf_tiny.padded_batch([[1, 5] + hf_tiny.image_tokens(4, 1) + [6, 7]], "right")
  px = np.random.RandomState(0).randn(1, 28, 28, 3).astype(np.float32)
  np.testing.assert_array_equal(hf_tiny.hf_logits(back.eval(), ids, mask, px),
                                hf_tiny.hf_logits(hf_model, ids, mask, px))


@pytest.mark.parametrize("layout", sorted(hf_io.LLAVA_LAYOUTS))
def test_every_llava_key_layout_reads_and_writes(layout, tmp_path):
  """Write each layout, check transformers loads it fully, and that we read it back."""
  hf_model = hf_tiny.clip_llama()
  src = str(tmp_path / "src")
  hf_model.save_pretrained(src)
  model, params = mt.load_pretrained(src)
  out = str(tmp_path / layout)
  mt.save_pretrained(out, model, params, layout=layout)
  keys = set(safetensors_tensors(out))
  llm_prefix, head, vision_prefix, _ = hf_io.LLAVA_LAYOUTS[layout]
  assert f"{head}.weight" in keys and any(k.startswith(vision_prefix) for k in keys)
  back, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  for name, p in back.state_dict().items():
    torch.testing.assert_close(p, hf_model.state_dict()[name], rtol=0, atol=0)
  model2, params2 = mt.load_pretrained(out)
  assert model2.config.hf_layout == layout
  for a, b in zip(jax_leaves(params), jax_leaves(params2)):
    np.testing.assert_array_equal(a, b)


def jax_leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("build", [hf_tiny.llama, hf_tiny.mistral,
                                   lambda: hf_tiny.qwen2(tie_word_embeddings=True)],
                         ids=["llama", "mistral", "qwen2_tied"])
def test_bare_llm_roundtrip(build, tmp_path):
  hf_model = build()
  src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
  hf_model.save_pretrained(src)
  model, params = mt.load_pretrained(src)
  mt.save_pretrained(dst, model, params)
  assert_same_tensors(safetensors_tensors(src), safetensors_tensors(dst))
  back = AutoModelForCausalLM.from_pretrained(dst).eval()
  assert type(back) is type(hf_model)
  ids, mask = hf_tiny.padded_batch([[1, 4, 5, 6, 7]], "right")
  np.testing.assert_array_equal(hf_tiny.hf_logits(back, ids, mask),
                                hf_tiny.hf_logits(hf_model, ids, mask))


def test_fresh_model_saves_to_a_loadable_hf_dir(tmp_path):
  """A model built from our config alone (no source checkpoint) exports and loads in HF."""
  import jax
  from mllm_tune.models import build_model, init_params
  from mllm_tune.models.config import LLMConfig, LlavaConfig, VisionConfig
  cfg = LlavaConfig(
      vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                          image_size=28, patch_size=14),
      llm=LLMConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=128),
      image_token_id=99)
  model = build_model(cfg)
  params = init_params(model, jax.random.key(0))
  out = str(tmp_path / "fresh")
  mt.save_pretrained(out, model, params)
  back, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  ids, mask = hf_tiny.padded_batch([[1, 5] + hf_tiny.image_tokens(4, 2) + [6]], "right")
  px = np.random.RandomState(0).randn(2, 28, 28, 3).astype(np.float32)
  ours = np.asarray(model.apply({"params": params}, ids, mask, pixel_values=px))
  np.testing.assert_allclose(ours, hf_tiny.hf_logits(back.eval(), ids, mask, px), atol=1e-4)


def test_tokenizer_and_processor_files_are_copied_with_source_dir(tmp_path):
  """The files a hub checkpoint ships beside its weights (tokenizer, chat template, image and
  video processor configs) travel with `source_dir`; other files (a README, stale weights) do
  not."""
  hf_model = hf_tiny.llama()
  src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
  hf_model.save_pretrained(src)
  aux = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
         "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
         "preprocessor_config.json", "video_preprocessor_config.json",
         "processor_config.json", "tokenizer.model"]
  for fn in aux + ["README.md", "model-00009-of-00009.safetensors"]:
    with open(os.path.join(src, fn), "w") as f:
      f.write(json.dumps({"file": fn}))
  model, params = mt.load_pretrained(src)
  mt.save_pretrained(dst, model, params, source_dir=src)
  for fn in aux:
    with open(os.path.join(dst, fn)) as f:
      assert json.load(f) == {"file": fn}, fn
  assert not os.path.exists(os.path.join(dst, "README.md"))
  assert not os.path.exists(os.path.join(dst, "model-00009-of-00009.safetensors"))
