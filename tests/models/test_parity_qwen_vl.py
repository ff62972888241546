"""Qwen2-VL and Qwen2.5-VL against transformers: logits, M-RoPE positions, window partition,
greedy generation, checkpoints both ways and PEFT adapters, on padded batches with a row of two
images of different grids, a one-image row and a text-only row."""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import vision_utils

import mllm_tune as mt
from mllm_tune.models import qwen_vl_host
from mllm_tune.models.qwen_vl import VISION_IDS
from mllm_tune.models.config import ConfigError, config_from_dict, config_from_hf, config_to_dict
from tests.helpers import qwen_vl_tiny as qt
from tests.helpers.hf_parity import (assert_same_tensors, check_peft_lora_both_ways,
                                     safetensors_tensors)

ATOL = 1e-4
BUILDERS = {"qwen2_vl": qt.qwen2_vl, "qwen2_5_vl": qt.qwen2_5_vl}
SIDES = ["right", "left", "right"]


def _load(family, tmp_path, dtype=None, **kw):
  hf_model = BUILDERS[family](**kw)
  d = str(tmp_path / family)
  (hf_model.to(dtype) if dtype else hf_model).save_pretrained(d)
  return hf_model, d, *mt.load_pretrained(d)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_logits_match_transformers(family, tmp_path):
  hf_model, _, model, params = _load(family, tmp_path)
  assert model.config.hf_layout == "hub" and model.config.model_type == family
  enc = qt.batch(SIDES)
  kw = mt.hf_inputs(model, enc)
  assert kw["pixel_values"].shape == (128, qt.PATCH_DIM)  # 76 patches, bucketed to 64s
  assert ("vision_window_ids" in kw) == (family == "qwen2_5_vl")
  ours = np.asarray(model.apply({"params": params}, **kw))
  ref = qt.hf_logits(hf_model, enc)
  real = enc["attention_mask"].astype(bool)
  np.testing.assert_allclose(ours[real], ref[real], atol=ATOL, rtol=0)
  if family == "qwen2_5_vl":  # the windows matter: all-full attention gives other logits
    full = dict(kw, vision_window_ids=np.zeros_like(kw["vision_window_ids"]))
    assert np.abs(np.asarray(model.apply({"params": params}, **full)) - ours)[real].max() > 1e-3


def _blocked(kw: dict, grids, k: int) -> dict:
  """The flat patch buffer of `kw` as one block of `k` rows per image (zero rows after its
  own), the pack tables' merged-token rows re-numbered to the blocks."""
  counts = [t * h * w for t, h, w in grids]
  starts = np.cumsum([0] + counts[:-1])
  out = dict(kw)
  for key in ("pixel_values",) + VISION_IDS:
    if key in kw:
      x = np.zeros((len(grids), k) + kw[key].shape[1:], kw[key].dtype)
      for i, (s, c) in enumerate(zip(starts, counts)):
        x[i, :c] = kw[key][s:s + c]
      out[key] = x
  to_block = np.concatenate([i * k // 4 + np.arange(c // 4) for i, c in enumerate(counts)])
  out["pack_index"] = np.where(kw["pack_weight"] != 0, to_block[kw["pack_index"]], 0)
  return out


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_blocked_patch_rows_give_the_flat_buffer_logits(family, tmp_path):
  """Patch rows as (N, K, ...) blocks no image crosses: attention per block, same logits."""
  _, _, model, params = _load(family, tmp_path)
  kw = mt.hf_inputs(model, qt.batch(SIDES))
  flat = np.asarray(model.apply({"params": params}, **kw))
  blocked = _blocked(kw, qt.GRIDS, 48)  # the largest image has 48 patches
  assert blocked["pixel_values"].shape == (3, 48, qt.PATCH_DIM)
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, **blocked)), flat,
                             atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_rope_index_matches_transformers(side, tmp_path):
  hf_model = qt.qwen2_vl()
  enc = qt.batch(side)
  ref_pos, ref_delta = hf_model.model.get_rope_index(
      torch.tensor(enc["input_ids"]), torch.tensor(enc["mm_token_type_ids"]),
      torch.tensor(enc["image_grid_thw"]), attention_mask=torch.tensor(enc["attention_mask"]))
  pos, delta = qwen_vl_host.get_rope_index(enc["input_ids"], enc["mm_token_type_ids"],
                                           enc["image_grid_thw"], 2, enc["attention_mask"])
  np.testing.assert_array_equal(pos, ref_pos.numpy())
  np.testing.assert_array_equal(delta, ref_delta.numpy().ravel())
  assert delta.tolist() == [-8, -3, 0]  # 12 + 1 and 6 image tokens, a text-only row


def test_vision_metadata_matches_transformers_helpers():
  grids = torch.tensor([[1, 6, 8], [1, 2, 2], [1, 4, 6], [2, 4, 4]])
  meta = qwen_vl_host.vision_metadata(grids.numpy(), 2, window_merge=2, rows=200)
  n = int(grids.prod(-1).sum())
  assert meta["vision_segment_ids"][n:].max() == 0 and (meta["vision_pos_hw"][n:] == 0).all()
  np.testing.assert_array_equal(meta["vision_pos_hw"][:n],
                                vision_utils.get_vision_position_ids(grids, 2).numpy())
  cu = vision_utils.get_vision_cu_seqlens(grids).numpy()
  np.testing.assert_array_equal(np.diff(cu), np.bincount(meta["vision_segment_ids"][:n])[1:])
  # the window partition: transformers lists merge units window by window (window_index) with
  # window boundaries cu_window_seqlens (in patches); ours labels each patch's window
  index, cu_win = vision_utils.get_vision_window_index(grids, 2, 56, 14)
  unit_window = np.zeros(n // 4, np.int64)
  bounds = cu_win.numpy() // 4
  for w, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
    unit_window[index.numpy()[a:b]] = w
  ours = meta["vision_segment_ids"][:n:4].astype(np.int64) * 1000 + meta["vision_window_ids"][
      :n:4]
  same_theirs = unit_window[:, None] == unit_window[None, :]
  np.testing.assert_array_equal(ours[:, None] == ours[None, :], same_theirs)
  assert len(set(unit_window.tolist())) > len(grids) + 1  # images really are cut into windows


def test_placeholder_mismatch_raises_eagerly_and_poisons_under_jit(tmp_path):
  _, _, model, params = _load("qwen2_vl", tmp_path)
  enc = qt.batch(SIDES)
  bad = dict(enc, input_ids=enc["input_ids"].copy(),
             mm_token_type_ids=enc["mm_token_type_ids"].copy())
  col = int(np.argmax(enc["input_ids"][1] == qt.IMAGE))
  bad["input_ids"][1, col], bad["mm_token_type_ids"][1, col] = 5, 0
  with pytest.raises(ValueError, match=r"18 image tokens .* yield 19 merged tokens"):
    mt.hf_inputs(model, bad)
  kw = mt.hf_inputs(model, enc)
  kw["input_ids"] = bad["input_ids"]  # tables built for the right ids, ids changed afterwards
  with pytest.raises(ValueError, match="image tokens"):
    model.apply({"params": params}, **kw)
  out = jax.jit(lambda p, kw: model.apply({"params": p}, **kw))(params, kw)
  assert np.isnan(np.asarray(out)).all()
  with pytest.raises(ValueError, match=r"need \['positions'\]"):
    model.apply({"params": params}, **{k: v for k, v in mt.hf_inputs(model, enc).items()
                                       if k != "positions"})


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_greedy_generation_matches_hf_generate(family, tmp_path):
  hf_model, _, model, params = _load(family, tmp_path)
  enc = qt.batch(SIDES)  # ours: rows 0 and 2 right-padded (moved left by generate)
  # eos_token_id=[]: no end token, as HF's explicit eos_token_id=None (ours: None = the
  # checkpoint's generation_config.json)
  ours = np.asarray(mt.generate(model, params, **mt.hf_inputs(model, enc), max_new_tokens=20,
                                eos_token_id=[]))
  left = qt.batch("left")
  with torch.no_grad():
    ref = hf_model.generate(**qt.torch_inputs(left), max_new_tokens=20, do_sample=False,
                            num_beams=1, pad_token_id=0, eos_token_id=None)
  np.testing.assert_array_equal(ours, ref[:, left["input_ids"].shape[1]:].numpy())
  assert all(len(set(row)) > 2 for row in ours.tolist())


def _flat_config(nested: dict) -> dict:
  """The hub's flat config.json form of a transformers 5 (nested) one."""
  d = {k: v for k, v in nested.items() if k != "text_config"}
  text = dict(nested["text_config"])
  rope = text.pop("rope_parameters")
  text.pop("model_type")
  d.update(text, rope_theta=rope["rope_theta"],
           rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
  d["vision_config"] = {k: v for k, v in d["vision_config"].items() if k != "model_type"}
  return d


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_hf_ours_hf_is_bit_exact_and_loads_in_transformers(family, dtype, tmp_path):
  hf_model, src, model, params = _load(family, tmp_path, dtype)
  assert params["vision"]["patch_embed"]["kernel"].shape == (qt.PATCH_DIM, 32)
  assert set(params["projector"]) == {"ln_q", "linear_1", "linear_2"}
  dst = str(tmp_path / "dst")
  mt.save_pretrained(dst, model, params, max_shard_size="40KB")
  assert os.path.exists(os.path.join(dst, "model.safetensors.index.json"))
  assert_same_tensors(safetensors_tensors(src), safetensors_tensors(dst))
  with open(os.path.join(dst, "config.json")) as f:
    written = json.load(f)
  assert written["model_type"] == family and "text_config" in written
  back, info = type(hf_model).from_pretrained(dst, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  enc = qt.batch("right")
  orig = type(hf_model).from_pretrained(src).eval()  # the same loading path as `back`
  np.testing.assert_array_equal(qt.hf_logits(back.eval(), enc), qt.hf_logits(orig, enc))


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_flat_hub_config_in_memory_layout_and_tied_head(family, tmp_path):
  """The hub's flat config.json, the in-memory key names and a tied LM head (no lm_head tensor)
  read the same model; each is written back in the form it was read."""
  hf_model, src, model, params = _load(family, tmp_path, tie_word_embeddings=True)
  assert model.config.llm.tie_word_embeddings and "lm_head" not in params["llm"]
  with open(os.path.join(src, "config.json")) as f:
    nested = json.load(f)
  mem = str(tmp_path / "mem")  # in-memory names, flat config
  os.makedirs(mem)
  state = {k: v.contiguous() for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
  save_file(state, os.path.join(mem, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(mem, "config.json"), "w") as f:
    json.dump(_flat_config(nested), f)
  model2, params2 = mt.load_pretrained(mem)
  assert model2.config.hf_layout == "v5"
  same = dict(hf_json="", hf_layout="", generation_json="")  # mem has no generation_config
  assert dataclasses.replace(model2.config, **same) == dataclasses.replace(model.config, **same)
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  dst = str(tmp_path / "dst")
  mt.save_pretrained(dst, model2, params2)
  assert_same_tensors(safetensors_tensors(mem), safetensors_tensors(dst))
  with open(os.path.join(dst, "config.json")) as f:
    written = json.load(f)
  assert "text_config" not in written and written["rope_scaling"]["mrope_section"] == [2, 1, 1]
  back = type(hf_model).from_pretrained(dst).eval()
  enc = qt.batch("right")
  np.testing.assert_allclose(qt.hf_logits(back, enc), qt.hf_logits(hf_model, enc), atol=1e-6)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_peft_lora_both_ways_with_logit_parity(family, tmp_path):
  hf_model, base_dir, model, params = _load(family, tmp_path)
  check_peft_lora_both_ways(hf_model, base_dir, model, params, qt.batch(SIDES), qt.hf_logits,
                            BUILDERS[family], tmp_path)


def test_config_errors_and_native_round_trip():
  d = qt.qwen2_vl().config.to_dict()
  cfg = config_from_hf(d)
  assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg
  text = dict(d["text_config"], model_type="qwen2")
  with pytest.raises(ConfigError, match="M-RoPE"):
    config_from_hf(text)  # a plain Qwen2 decoder with M-RoPE sections
  wide = dict(d, vision_config=dict(d["vision_config"], hidden_size=48))
  with pytest.raises(ConfigError, match="merger outputs 48 features but the LLM width is 32"):
    config_from_hf(wide)
  rope = dict(d["text_config"]["rope_parameters"], mrope_section=[2, 2, 1])
  with pytest.raises(ConfigError, match=r"mrope_section \[2, 2, 1\] .* head_dim / 2 = 4"):
    config_from_hf(dict(d, text_config=dict(d["text_config"], rope_parameters=rope)))
  with pytest.raises(ConfigError, match="'qwen2_vl', 'qwen2_5_vl', 'qwen3_vl', 'qwen3_vl_moe'"):
    config_from_hf({"model_type": "qwen3_omni_moe"})
