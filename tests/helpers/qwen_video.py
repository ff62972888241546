"""Processor-like Qwen-VL batches with videos, for the tiny models of `qwen_vl_tiny` and
`qwen3_vl_tiny`: random patch rows, grids and the placeholder runs transformers' processors
write (Qwen3-VL: one run per frame after a timestamp, as `Qwen3VLProcessor` does)."""
from __future__ import annotations

import numpy as np

from tests.helpers.hf_tiny import padded_batch
from tests.helpers.qwen_vl_tiny import IMAGE, VEND, VIDEO, VSTART, image_run

IMAGE_GRIDS = [(1, 4, 6)]
# (t, h, w): 2 x 4 and 3 x 2 merged tokens per frame pair; t = 2 and 3 frame pairs
VIDEO_GRIDS = [(2, 4, 4), (3, 2, 4)]
SECONDS = [0.75, 1 / 3]  # second_per_grid_t per video: time steps 1.5 and 0.667 at 2 tokens/s


def video_run(grid, per_frame: bool = False) -> list[int]:
  """One video's placeholders: a single run, or (`per_frame`, Qwen3-VL) a timestamp token and a
  run per frame pair."""
  t, h, w = grid
  if not per_frame:
    return [VSTART] + [VIDEO] * (t * h * w // 4) + [VEND]
  out = []
  for k in range(t):
    out += [30 + k, 40] + [VSTART] + [VIDEO] * (h * w // 4) + [VEND]
  return out


def batch(side="right", patch_dim: int = 3 * 2 * 14 * 14, per_frame: bool = False,
          seconds=SECONDS, seed: int = 0) -> dict:
  """Row 0: an image, then a video; row 1: a video only; row 2: text only."""
  rows = [[1, 5] + image_run(IMAGE_GRIDS[0]) + [7] + video_run(VIDEO_GRIDS[0], per_frame) + [9],
          [1, 3] + video_run(VIDEO_GRIDS[1], per_frame) + [4, 6, 11],
          [1, 20, 21, 22, 23]]
  ids, mask = padded_batch(rows, side)
  rng = np.random.RandomState(seed)
  count = lambda grids: sum(t * h * w for t, h, w in grids)
  out = {"input_ids": ids, "attention_mask": mask,
         "pixel_values": rng.randn(count(IMAGE_GRIDS), patch_dim).astype(np.float32),
         "image_grid_thw": np.asarray(IMAGE_GRIDS, np.int64),
         "pixel_values_videos": rng.randn(count(VIDEO_GRIDS), patch_dim).astype(np.float32),
         "video_grid_thw": np.asarray(VIDEO_GRIDS, np.int64),
         "mm_token_type_ids": ((ids == IMAGE) + 2 * (ids == VIDEO)).astype(np.int64)}
  if seconds is not None:
    out["second_per_grid_ts"] = np.asarray(seconds, np.float32)
  return out
