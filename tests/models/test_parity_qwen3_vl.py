"""Qwen3-VL (dense) against transformers: logits, the learned position taps, M-RoPE positions,
greedy generation and checkpoints both ways, on a padded batch with a row of two images of
different grids, a one-image row and a text-only row (`tests/helpers/qwen3_vl_tiny.py`)."""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
import torch
from transformers import vision_utils

import mllm_tune as mt
from mllm_tune.models import qwen_vl_host
from mllm_tune.models.config import ConfigError, config_from_dict, config_from_hf, config_to_dict
from mllm_tune.models.qwen_vision import pos_embed_taps
from mllm_tune.models.rope import mrope_axes
from tests.helpers import qwen3_vl_tiny as q3
from tests.helpers import qwen_vl_tiny as qt
from tests.helpers.hf_parity import (assert_same_tensors, check_peft_lora_both_ways,
                                     safetensors_tensors)

ATOL = 1e-4
SIDES = ["right", "left", "right"]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
  """(transformers model, its saved directory, our model, params)."""
  hf_model = q3.qwen3_vl()
  d = str(tmp_path_factory.mktemp("qwen3_vl") / "hf")
  hf_model.save_pretrained(d)
  return hf_model, d, *mt.load_pretrained(d)


def _logits(model, params, kw):
  return np.asarray(model.apply({"params": params}, **kw))


def test_logits_match_transformers(loaded):
  hf_model, _, model, params = loaded
  c = model.config
  assert c.model_type == "qwen3_vl" and c.hf_layout == "v5"
  assert c.llm.qk_norm and c.llm.head_dim == 16 and c.llm.rope.mrope_interleaved
  assert c.vision.deepstack_visual_indexes == q3.DEEPSTACK and c.vision.pos_grid_side == 5
  enc = q3.batch(SIDES)
  kw = mt.hf_inputs(model, enc)
  assert kw["pixel_values"].shape == (128, q3.PATCH_DIM) and "vision_window_ids" not in kw
  ours = _logits(model, params, kw)
  real = enc["attention_mask"].astype(bool)
  np.testing.assert_allclose(ours[real], qt.hf_logits(hf_model, enc)[real], atol=ATOL, rtol=0)
  # each Qwen3-VL part matters: the deepstack mergers, the interleaving, the position table
  proj = params["projector"]
  no_deep = {**params, "projector": {**proj, **{
      k: jax.tree.map(np.zeros_like, v) for k, v in proj.items() if k.startswith("deepstack")}}}
  no_pos = {**params, "vision": {**params["vision"],
                                 "pos_embed": np.zeros_like(params["vision"]["pos_embed"])}}
  chunked = type(model)(dataclasses.replace(c, llm=dataclasses.replace(
      c.llm, rope=dataclasses.replace(c.llm.rope, mrope_interleaved=False))))
  for other in (_logits(model, no_deep, kw), _logits(model, no_pos, kw),
                _logits(chunked, params, kw)):
    assert np.abs(other - ours)[real].max() > 1e-3


def test_unscanned_layers_and_jit_give_the_same_logits(loaded):
  _, _, model, params = loaded
  kw = mt.hf_inputs(model, q3.batch(SIDES))
  ours = _logits(model, params, kw)
  jitted = jax.jit(lambda p, kw: model.apply({"params": p}, **kw))(params, kw)
  np.testing.assert_allclose(np.asarray(jitted), ours, atol=1e-5)
  from mllm_tune.models.kv_cache import unstack_layers
  flat, variables = unstack_layers(model, {"params": params})
  np.testing.assert_allclose(np.asarray(flat.apply(variables, **kw)), ours, atol=1e-5)


def test_position_taps_and_mrope_slots_match_transformers():
  grids = torch.tensor([[1, 6, 8], [1, 2, 2], [2, 4, 6], [1, 10, 4]])
  n = int(grids.prod(-1).sum())
  meta = qwen_vl_host.vision_metadata(grids.numpy(), 2, rows=n + 8)
  index, weight = pos_embed_taps(meta["vision_pos_hw"], meta["vision_segment_ids"], 7)
  ref_i, ref_w = vision_utils.get_vision_interpolation_indices_and_weights(
      grids, 7, mode="bilinear", align_corners=True, spatial_merge_size=2)
  np.testing.assert_array_equal(np.asarray(index)[:n], ref_i.numpy())
  np.testing.assert_array_equal(np.asarray(weight)[:n], ref_w.numpy())
  # interleaved slots: what Qwen3VLTextRotaryEmbedding.recomposition_frequencies picks
  from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding
  for section in ([24, 20, 20], [4, 2, 2], [2, 3, 3]):
    owner = type("Owner", (), {"mrope_section": section})()
    freq = torch.arange(3)[:, None, None, None].expand(3, 1, 1, sum(section)).clone().float()
    picked = Qwen3VLTextRotaryEmbedding.recomposition_frequencies(owner, freq)[0, 0]
    np.testing.assert_array_equal(mrope_axes(tuple(section), sum(section), True),
                                  picked[:sum(section)].numpy())


@pytest.mark.parametrize("side", ["right", "left"])
def test_rope_index_matches_transformers(side, loaded):
  hf_model = loaded[0]
  enc = q3.batch(side)
  ref_pos, ref_delta = hf_model.model.get_rope_index(
      torch.tensor(enc["input_ids"]), torch.tensor(enc["mm_token_type_ids"]),
      torch.tensor(enc["image_grid_thw"]), attention_mask=torch.tensor(enc["attention_mask"]))
  pos, delta = qwen_vl_host.get_rope_index(enc["input_ids"], enc["mm_token_type_ids"],
                                           enc["image_grid_thw"], 2, enc["attention_mask"])
  np.testing.assert_array_equal(pos, ref_pos.numpy())
  np.testing.assert_array_equal(delta, ref_delta.numpy().ravel())


def test_greedy_generation_matches_hf_generate(loaded):
  hf_model, _, model, params = loaded
  enc = q3.batch(SIDES)  # ours: rows 0 and 2 right-padded (moved left by generate)
  ours = np.asarray(mt.generate(model, params, **mt.hf_inputs(model, enc), max_new_tokens=12,
                                eos_token_id=[]))
  left = q3.batch("left")
  with torch.no_grad():
    ref = hf_model.generate(**qt.torch_inputs(left), max_new_tokens=12, do_sample=False,
                            num_beams=1, pad_token_id=0, eos_token_id=None)
  np.testing.assert_array_equal(ours, ref[:, left["input_ids"].shape[1]:].numpy())
  assert all(len(set(row)) > 2 for row in ours.tolist())


def test_hf_ours_hf_is_bit_exact_and_loads_in_transformers(loaded, tmp_path):
  hf_model, src, model, params = loaded
  assert params["vision"]["patch_embed"]["bias"].shape == (32,)
  assert set(params["projector"]) == {"ln_q", "linear_1", "linear_2", "deepstack_0",
                                      "deepstack_1"}
  assert params["projector"]["deepstack_0"]["ln_q"]["scale"].shape == (128,)  # after the join
  assert params["llm"]["layers"]["attn"]["q_norm"]["scale"].shape == (3, 16)
  dst = str(tmp_path / "dst")
  mt.save_pretrained(dst, model, params, max_shard_size="40KB")
  assert_same_tensors(safetensors_tensors(src), safetensors_tensors(dst))
  with open(os.path.join(dst, "config.json")) as f:
    written = json.load(f)
  assert written["text_config"]["rope_parameters"]["mrope_interleaved"] is True
  assert written["text_config"]["head_dim"] == 16
  back, info = type(hf_model).from_pretrained(dst, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  enc = q3.batch("right")
  orig = type(hf_model).from_pretrained(src).eval()  # the same loading path as `back`
  np.testing.assert_array_equal(qt.hf_logits(back.eval(), enc), qt.hf_logits(orig, enc))


def _hub_config(saved: dict) -> dict:
  """The Qwen3-VL hub's config.json form of a transformers 5 one: `rope_scaling` + `rope_theta`
  in the text config, vision `model_type` "qwen3_vl", no vision rope_parameters."""
  text = dict(saved["text_config"])
  rope = text.pop("rope_parameters")
  text.update(rope_theta=rope["rope_theta"], rope_scaling={
      "mrope_interleaved": True, "mrope_section": rope["mrope_section"], "rope_type": "default"})
  vision = {k: v for k, v in saved["vision_config"].items() if k != "rope_parameters"}
  return dict(saved, text_config=text, vision_config=dict(vision, model_type="qwen3_vl"))


def test_configs_hub_form_native_round_trip_and_errors(loaded):
  hf_model, _, model, _ = loaded
  saved = hf_model.config.to_dict()
  cfg = config_from_hf(saved)
  assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg
  hub = config_from_hf(_hub_config(saved))
  assert dataclasses.replace(hub, hf_json="") == dataclasses.replace(cfg, hf_json="")
  written = mt.models.config.config_to_hf(hub, "float32")
  assert written["text_config"]["rope_scaling"]["mrope_interleaved"] is True
  assert "rope_parameters" not in written["text_config"]
  assert written["vision_config"]["model_type"] == "qwen3_vl"
  # absent fields take transformers' Qwen3-VL defaults
  bare = dict(saved, text_config={k: v for k, v in saved["text_config"].items()
                                  if k not in ("head_dim", "rope_parameters")})
  llm = config_from_hf(bare).llm
  assert llm.head_dim == 128 and llm.rope.mrope_section == (24, 20, 20)
  assert llm.rope.theta == 5e5 and llm.rope.mrope_interleaved
  bad = dict(saved, vision_config=dict(saved["vision_config"], deepstack_visual_indexes=[2, 1]))
  with pytest.raises(ConfigError, match="deepstack_visual_indexes"):
    config_from_hf(bad)
  with pytest.raises(ConfigError, match="'qwen3_vl'"):
    config_from_hf({"model_type": "qwen3_omni_moe"})


def test_peft_lora_both_ways_with_logit_parity(loaded, tmp_path):
  """PEFT LoRA on the LLM's q / v and the vision blocks' fused qkv, both ways."""
  _, base_dir, model, params = loaded
  check_peft_lora_both_ways(q3.qwen3_vl(), base_dir, model, params, q3.batch(SIDES),
                            qt.hf_logits, q3.qwen3_vl, tmp_path,
                            target_modules=r".*(language_model.*\.(q_proj|v_proj)|visual.*\.qkv)")
