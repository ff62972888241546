"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL videos through `mt.hf_inputs` against transformers: M-RoPE
positions (Qwen2.5-VL's time steps from `second_per_grid_ts`, Qwen3-VL's frame-by-frame runs),
logits and greedy generation on padded batches that mix an image and a video in one row, a
video-only row and a text-only row (`tests/helpers/qwen_video.py`)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mllm_tune as mt
from mllm_tune.models import qwen_vl_host
from tests.helpers import qwen3_vl_tiny as q3
from tests.helpers import qwen_vl_tiny as qt
from tests.helpers import qwen_video as qv

ATOL = 1e-4
SIDES = ["right", "left", "right"]
BUILDERS = {"qwen2_vl": qt.qwen2_vl, "qwen2_5_vl": qt.qwen2_5_vl, "qwen3_vl": q3.qwen3_vl}


def _batch(family: str, side) -> dict:
  qwen3 = family == "qwen3_vl"
  return qv.batch(side, patch_dim=q3.PATCH_DIM if qwen3 else qt.PATCH_DIM, per_frame=qwen3,
                  seconds=qv.SECONDS if family == "qwen2_5_vl" else None)


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def loaded(request, tmp_path_factory):
  family = request.param
  hf_model = BUILDERS[family]()
  d = str(tmp_path_factory.mktemp(family) / "hf")
  hf_model.save_pretrained(d)
  return family, hf_model, *mt.load_pretrained(d)


def test_rope_index_matches_transformers(loaded):
  family, hf_model, model, _ = loaded
  enc = _batch(family, "left")
  t = qt.torch_inputs(enc)
  extra = {"second_per_grid_ts": t["second_per_grid_ts"]} if family == "qwen2_5_vl" else {}
  ref_pos, ref_delta = hf_model.model.get_rope_index(
      t["input_ids"], t["mm_token_type_ids"], t["image_grid_thw"], t["video_grid_thw"],
      attention_mask=t["attention_mask"], **extra)
  pos = mt.hf_inputs(model, enc)["positions"]
  np.testing.assert_array_equal(pos, ref_pos.numpy())
  c = model.config
  _, delta = qwen_vl_host.get_rope_index(
      enc["input_ids"], enc["mm_token_type_ids"], enc["image_grid_thw"], 2,
      enc["attention_mask"], enc["video_grid_thw"], enc.get("second_per_grid_ts"),
      c.video_time_step, c.split_video_frames)
  np.testing.assert_array_equal(delta, ref_delta.numpy().ravel())
  if family == "qwen2_5_vl":  # time steps 1.5 and 0.667 per frame pair, truncated
    row1 = pos[0, 1][enc["input_ids"][1] == qt.VIDEO]
    assert sorted(set((row1 - row1.min()).tolist())) == [0, 1]  # trunc(0, 0.667, 1.333)
    row0 = pos[0, 0][enc["input_ids"][0] == qt.VIDEO]
    assert sorted(set((row0 - row0.min()).tolist())) == [0, 1]  # trunc(0, 1.5)
    plain = qwen_vl_host.get_rope_index(enc["input_ids"], enc["mm_token_type_ids"],
                                        enc["image_grid_thw"], 2, enc["attention_mask"],
                                        enc["video_grid_thw"])[0]
    assert not np.array_equal(plain, pos)  # Qwen2-VL's frame index differs here


def test_logits_match_transformers(loaded):
  family, hf_model, model, params = loaded
  enc = _batch(family, SIDES)
  kw = mt.hf_inputs(model, enc)
  n = int(enc["image_grid_thw"].prod(-1).sum() + enc["video_grid_thw"].prod(-1).sum())
  assert n == 28 + 56 and kw["pixel_values"].shape[0] == 128  # one buffer, bucketed to 64s
  ours = np.asarray(model.apply({"params": params}, **kw))
  hf_model.model.rope_deltas = None
  ref = qt.hf_logits(hf_model, enc)
  real = enc["attention_mask"].astype(bool)
  np.testing.assert_allclose(ours[real], ref[real], atol=ATOL, rtol=0)
  # the videos matter: other video patches give other logits in rows 0 and 1
  other = dict(enc, pixel_values_videos=enc["pixel_values_videos"][::-1].copy())
  moved = np.asarray(model.apply({"params": params}, **mt.hf_inputs(model, other)))
  assert np.abs(moved - ours)[:2][real[:2]].max() > 1e-3
  np.testing.assert_array_equal(moved[2], ours[2])


def test_greedy_generation_matches_hf_generate(loaded):
  family, hf_model, model, params = loaded
  enc = _batch(family, SIDES)
  ours = np.asarray(mt.generate(model, params, **mt.hf_inputs(model, enc), max_new_tokens=20,
                                eos_token_id=[]))
  left = _batch(family, "left")
  hf_model.model.rope_deltas = None
  with torch.no_grad():
    ref = hf_model.generate(**qt.torch_inputs(left), max_new_tokens=20, do_sample=False,
                            num_beams=1, pad_token_id=0, eos_token_id=None)
  np.testing.assert_array_equal(ours, ref[:, left["input_ids"].shape[1]:].numpy())
  assert all(len(set(row)) > 2 for row in ours.tolist())


def test_video_input_errors(loaded):
  family, _, model, _ = loaded
  enc = _batch(family, "right")
  with pytest.raises(ValueError, match="needs 'video_grid_thw'"):
    mt.hf_inputs(model, {k: v for k, v in enc.items() if k != "video_grid_thw"})
  with pytest.raises(ValueError, match="video_grid_thw given without pixel_values_videos"):
    mt.hf_inputs(model, {k: v for k, v in enc.items() if k != "pixel_values_videos"})
  short = dict(enc, pixel_values_videos=enc["pixel_values_videos"][:-4])
  with pytest.raises(ValueError, match=r"pixel_values_videos of shape \(52, .*need \(56, "):
    mt.hf_inputs(model, short)
  ids = enc["input_ids"].copy()
  col = int(np.argmax(ids[1] == qt.VIDEO))
  ids[1, col] = 5
  types = ((ids == qt.IMAGE) + 2 * (ids == qt.VIDEO)).astype(np.int64)
  with pytest.raises(ValueError, match=r"hold 13 video tokens .* videos yield 14 merged"):
    mt.hf_inputs(model, dict(enc, input_ids=ids, mm_token_type_ids=types))
  with pytest.raises(ValueError, match="mark 14 video tokens"):
    mt.hf_inputs(model, dict(enc, input_ids=ids))
  if family == "qwen2_5_vl":
    with pytest.raises(ValueError, match="second_per_grid_ts has 1 entries for 2 videos"):
      mt.hf_inputs(model, dict(enc, second_per_grid_ts=enc["second_per_grid_ts"][:1]))
