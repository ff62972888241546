"""Qwen2-VL and Qwen2.5-VL against transformers: logits, M-RoPE positions, window partition,
greedy generation, checkpoints both ways and PEFT adapters, on padded batches with a row of two
images of different grids, a one-image row and a text-only row."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from transformers import vision_utils

import mllm_tune as mt
from mllm_tune.models import qwen_vl_host
from tests.helpers import qwen_vl_tiny as qt

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
