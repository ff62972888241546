"""LLaVA-OneVision videos through `mt.hf_inputs` against transformers: every frame a crop of
its own, its features bilinearly pooled to half size per side (`apply_pooling`), one
`image_newline` after each video; logits and greedy generation on a padded batch with an image
and a video in one row, a video-only row and a text-only row. The tower takes 42-pixel crops
(3 x 3 features, pooled to 2 x 2: uneven bilinear taps)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                          Qwen2Config, SiglipVisionConfig)

import mllm_tune as mt
from mllm_tune.models import hf_inputs as hfi
from tests.helpers.hf_tiny import IMAGE_TOKEN, INIT, _llm_kwargs, padded_batch, positions

VIDEO, CROP, FRAMES = 98, 42, 3
PINPOINTS = [[42, 42], [42, 84], [84, 42], [84, 84]]
SIZES = [(50, 90)]  # the one image's (H, W)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
  torch.manual_seed(12)
  cfg = LlavaOnevisionConfig(
      vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=CROP, patch_size=14,
                                       vision_use_head=False, initializer_range=INIT),
      text_config=Qwen2Config(**_llm_kwargs()), image_token_index=IMAGE_TOKEN,
      video_token_index=VIDEO, image_grid_pinpoints=PINPOINTS, vision_aspect_ratio="anyres_max_1")
  hf = LlavaOnevisionForConditionalGeneration(cfg).eval()
  d = str(tmp_path_factory.mktemp("ov_video") / "hf")
  hf.save_pretrained(d)
  model, params = mt.load_pretrained(d)
  return hf, model, params


def _batch(model, side, seed=0) -> dict:
  c = model.config
  crops = hfi.anyres_crop_counts(c, np.asarray(SIZES))
  n_img = len(hfi.image_tables(c, np.asarray(SIZES), crops)[0])
  n_vid = FRAMES * 2 * 2 + 1  # 2 x 2 pooled features a frame, one newline
  rows = [[1, 5] + [IMAGE_TOKEN] * n_img + [7] + [VIDEO] * n_vid + [9],
          [1, 3] + [VIDEO] * n_vid + [4, 6],
          [1, 20, 21, 22]]
  ids, mask = padded_batch(rows, side)
  rng = np.random.RandomState(seed)
  px = np.zeros((1, max(crops), 3, CROP, CROP), np.float32)
  px[0, :crops[0]] = rng.randn(crops[0], 3, CROP, CROP)
  return {"input_ids": ids, "attention_mask": mask, "pixel_values": px,
          "image_sizes": np.asarray(SIZES, np.int64),
          "pixel_values_videos": rng.randn(2, FRAMES, 3, CROP, CROP).astype(np.float32)}


def _hf_logits(hf, enc):
  t = {k: torch.tensor(v) for k, v in enc.items()}
  with torch.no_grad():
    return hf(**t, position_ids=torch.tensor(positions(enc["attention_mask"]))).logits.numpy()


def test_logits_match_transformers(loaded):
  hf, model, params = loaded
  assert model.config.video_token_id == VIDEO
  enc = _batch(model, ["right", "left", "right"])
  kw = mt.hf_inputs(model, enc)
  crops = hfi.anyres_crop_counts(model.config, np.asarray(SIZES))[0]
  assert crops > 1 and kw["pixel_values"].shape[0] == crops + 2 * FRAMES  # crops, then frames
  ours = np.asarray(model.apply({"params": params}, **kw))
  real = enc["attention_mask"].astype(bool)
  np.testing.assert_allclose(ours[real], _hf_logits(hf, enc)[real], atol=1e-4, rtol=0)
  other = dict(enc, pixel_values_videos=enc["pixel_values_videos"][::-1].copy())
  moved = np.asarray(model.apply({"params": params}, **mt.hf_inputs(model, other)))
  assert np.abs(moved - ours)[:2][real[:2]].max() > 1e-3  # the videos matter
  np.testing.assert_array_equal(moved[2], ours[2])


def test_greedy_generation_matches_hf_generate(loaded):
  hf, model, params = loaded
  ours = np.asarray(mt.generate(model, params, **mt.hf_inputs(model, _batch(model, "right")),
                                max_new_tokens=20, eos_token_id=[]))
  left = _batch(model, "left")
  with torch.no_grad():
    ref = hf.generate(**{k: torch.tensor(v) for k, v in left.items()}, max_new_tokens=20,
                      do_sample=False, num_beams=1, pad_token_id=0, eos_token_id=None)
  np.testing.assert_array_equal(ours, ref[:, left["input_ids"].shape[1]:].numpy())
  assert all(len(set(row)) > 2 for row in ours.tolist())


def test_video_input_errors(loaded):
  _, model, _ = loaded
  enc = _batch(model, "right")
  ids = enc["input_ids"].copy()
  ids[1, int(np.argmax(ids[1] == VIDEO))] = 5
  with pytest.raises(ValueError, match=r"hold 25 video tokens \(id 98\) but the videos yield 26"):
    mt.hf_inputs(model, dict(enc, input_ids=ids))
  with pytest.raises(ValueError, match=r"pixel_values_videos of shape \(2, 3, 3, 28, 28\)"):
    mt.hf_inputs(model, dict(enc, pixel_values_videos=np.zeros((2, 3, 3, 28, 28), np.float32)))
  with pytest.raises(ValueError, match="no pixel_values"):
    mt.hf_inputs(model, {k: v for k, v in enc.items() if k != "pixel_values"})


def test_video_token_id_in_config_round_trips(loaded):
  """Native JSON both ways, an older native config (without the field) reads it from its HF
  dict, and the HF export writes `video_token_index` also when there is no stored HF dict."""
  import dataclasses
  import json
  from mllm_tune.models.config import config_from_dict, config_to_dict, config_to_hf
  _, model, _ = loaded
  cfg = model.config
  assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg
  old = config_to_dict(cfg)
  del old["video_token_id"]
  assert config_from_dict(old).video_token_id == VIDEO
  fresh = dataclasses.replace(cfg, hf_json="", video_token_id=77)
  assert config_to_hf(fresh, "float32")["video_token_index"] == 77
