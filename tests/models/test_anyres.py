"""`models.anyres` against transformers' own anyres rules at full scale (27x27 OneVision crops,
24x24 NeXT crops, the released pinpoints): token counts and the packed features themselves."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionModel, image_size_to_num_patches)

from mllm_tune.models import anyres
from mllm_tune.models.config import DEFAULT_PINPOINTS

OV = dict(family="llava_onevision", crop=384, side=27, pins=DEFAULT_PINPOINTS["llava_onevision"])
NEXT = dict(family="llava_next", crop=336, side=24, pins=DEFAULT_PINPOINTS["llava_next"])
SIZES_HW = [(224, 224), (480, 640), (768, 1024), (720, 1280), (1080, 1920), (4032, 3024),
            (100, 1500), (1500, 90)]


def _hf_pack(spec, feats, hw, newline, aspect="anyres_max_9"):
  cfg = types.SimpleNamespace(
      vision_config=types.SimpleNamespace(image_size=spec["crop"], patch_size=14),
      image_grid_pinpoints=[list(p) for p in spec["pins"]])
  owner = types.SimpleNamespace(config=cfg)
  size = torch.tensor([hw])
  if spec["family"] == "llava_onevision":
    out, _ = LlavaOnevisionModel.pack_image_features(owner, [feats], size, newline, aspect)
  else:
    out, _ = LlavaNextModel.pack_image_features(owner, [feats], size, "full", newline)
  return out[0].numpy()


def _ours(table, feats, newline):
  f = feats.reshape(-1, feats.shape[-1]).numpy().astype(np.float64)
  out = (f[table.index] * table.weight[..., None]).sum(1)
  return out + table.newline[:, None] * newline.numpy()


@pytest.mark.parametrize("spec", [OV, NEXT], ids=["onevision", "next"])
@pytest.mark.parametrize("hw", SIZES_HW)
def test_pack_table_equals_transformers_pack_image_features(spec, hw):
  n = anyres.num_crops(hw, spec["pins"], spec["crop"])
  assert n == image_size_to_num_patches(list(hw), [list(p) for p in spec["pins"]], spec["crop"])
  torch.manual_seed(0)
  feats = torch.randn(n, spec["side"] ** 2, 3)
  newline = torch.randn(3)
  table = anyres.pack_table(hw, n, spec["side"], spec["pins"], spec["crop"], spec["family"])
  ref = _hf_pack(spec, feats, hw, newline)
  assert len(table) == ref.shape[0]
  np.testing.assert_allclose(_ours(table, feats, newline), ref, atol=2e-6)


def test_single_crop_image_is_its_features_and_one_newline():
  table = anyres.pack_table((50, 70), 1, 3, OV["pins"], 384, "llava_onevision")
  assert len(table) == 10 and table.newline.tolist() == [False] * 9 + [True]
  np.testing.assert_array_equal(table.index[:9, 0], np.arange(9))


def test_bilinear_taps_match_torch_interpolate():
  x = torch.randn(1, 1, 11, 23)
  ref = torch.nn.functional.interpolate(x, [4, 9], mode="bilinear")[0, 0].numpy()
  y0, y1, ly = anyres.bilinear_taps(11, 4)
  x0, x1, lx = anyres.bilinear_taps(23, 9)
  a = x[0, 0].numpy().astype(np.float64)
  ours = ((1 - ly)[:, None] * ((1 - lx) * a[y0][:, x0] + lx * a[y0][:, x1])
          + ly[:, None] * ((1 - lx) * a[y1][:, x0] + lx * a[y1][:, x1]))
  np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_concat_tables_offsets_crops_and_pads_rows():
  pins = ((28, 56),)
  t0 = anyres.pack_table((20, 40), 3, 2, pins, 28, "llava_next")
  t1 = anyres.pack_table((20, 20), 1, 2, pins, 28, "llava_next")
  out = anyres.concat_tables([t0, t1], [3, 1], 2, rows=len(t0) + len(t1) + 3)
  np.testing.assert_array_equal(out.index[len(t0):len(t0) + 4, 0], 3 * 4 + np.arange(4))
  assert not out.weight[-3:].any() and not out.newline[-3:].any()
  with pytest.raises(ValueError, match="do not fit"):
    anyres.concat_tables([t0, t1], [3, 1], 2, rows=3)


def test_crop_count_mismatch_is_refused():
  with pytest.raises(ValueError, match="2x2 anyres grid needs 5"):
    anyres.pack_table((600, 600), 3, 24, NEXT["pins"], 336, "llava_next")
