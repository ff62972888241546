"""Qwen2-VL / Qwen2.5-VL batches (pure): packed samples -> the model's fixed-shape inputs.

Samples (`pipeline.Sample` with `grids` and `mrope_positions`) are placed in rows by the planner of
`data/packing.py` under a per-batch *patch* budget (`BatchSpec.max_images`, in patches; a sample
counts its patches). A batch holds (B rows, T in `bucket_lengths`, P in `crop_buckets`, here
patch counts, each a multiple of m^2):
  input_ids, attention_mask, segment_ids, loss_mask (B, T)  as in `data/packing.py`
  positions (3, B, T) int32        each sample's own M-RoPE ids (t, h, w), restarting at every
                                   packed sample (`models.qwen_vl_host.get_rope_index`)
  pixel_values (P, C*T*p*p) float32  every image's (and video's) patch rows, row-major over
                                   the batch (sample by sample, in each sample's text order),
                                   zero rows after them
  vision_segment_ids (P,), vision_pos_hw (P, 2), vision_window_ids (P,) (Qwen2.5-VL)
                                   `models.qwen_vl_host.vision_metadata` (1.. per image, per
                                   frame pair of a video, over the batch; 0 on padding rows)
  pack_index (B, T, 1), pack_weight (B, T, 1), pack_newline (B, T)
                                   the merged token (row of the P / m^2 merger outputs) each
                                   image or video position takes
Samples attend only within their segment, their image patches only within their image, so every
packed sample computes what transformers computes for the record alone. Distinct compiled shapes:
bucket lengths x patch buckets.

With `BatchSpec.image_groups` = G > 1 the rows form G groups of B / G consecutive rows, each with
at most max_images / G patches (the planner's bound), and the patch buffer is blocked per group:
pixel_values (G, K, C*T*p*p) and vision ids (G, K, ...), block g holding group g's images (K =
the bucket / G). Block g's images are those of the rows a data-parallel shard holds when the
trainer shards rows G ways (`Trainer.put_batch` then shards the blocks the same way): every device
runs the vision tower on its own rows' images only, and attention is computed per block
(`QwenVisionTower`). Merged tokens are numbered flat over the blocks (block g starts at
g * K / m^2); vision_segment_ids stay 1.. per image over the batch.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from mllm_tune.data import qwen_videos as qv
from mllm_tune.data.packing import BatchSpec, crop_bucket, row_length
from mllm_tune.models import qwen_vl_host

PATCH_QUANTUM = 16  # patch budgets and buckets are multiples of 16 * m^2 (64 patches for m=2)


def patch_buckets(budget: int, merge_unit: int) -> tuple[int, ...]:
  """Patch buckets: the budget's quarters, each rounded up to a multiple of 16 * m^2 (e.g. 1000
  patches, m = 2 -> (256, 512, 768, 1024)); the last is the rounded budget."""
  return tuple(sorted({round_budget(math.ceil(budget * k / 4), merge_unit)
                       for k in (1, 2, 3, 4)}))


def round_budget(budget: int, merge_unit: int) -> int:
  """A patch budget rounded up to a multiple of 16 * m^2."""
  q = PATCH_QUANTUM * merge_unit
  return max(q, math.ceil(budget / q) * q)


def assemble_qwen(rows: Sequence[Sequence], spec: BatchSpec, patch_rows
                  ) -> dict[str, np.ndarray]:
  """Rows of Qwen samples -> the batch dict of the module docstring. `patch_rows(uint8 (N, p,
  p, 3)) -> float32 (N, C*T*p*p)` normalizes and lays out the patches
  (`qwen_images.patch_rows`)."""
  if not spec.qwen:
    raise ValueError("assemble_qwen needs a Qwen2-VL BatchSpec (merge_unit > 0)")
  b, mu, n_g, g_rows = spec.batch_size, spec.merge_unit, spec.image_groups, spec.group_rows
  fills = [sum(len(s.tokens) for s in row) for row in rows] + [0] * (b - len(rows))
  per_group = [sum(int(s.pixels.shape[0]) for row in rows[g * g_rows:(g + 1) * g_rows]
                   for s in row) for g in range(n_g)]
  t = row_length(fills, sum(per_group), spec)
  p_b = crop_bucket(max(per_group) * n_g, spec)
  k = p_b // n_g  # rows per block (p_b itself without groups)
  ids = np.full((b, t), spec.pad_id, np.int32)
  seg, loss = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
  pos = np.zeros((3, b, t), np.int32)
  index, weight = np.zeros((b, t, 1), np.int32), np.zeros((b, t, 1), np.float32)
  frames = max((s.pixels.shape[1] for row in rows for s in row if s.pixels.ndim == 5),
               default=0)  # videos: every patch row keeps its T frames
  px = np.zeros((p_b,) + ((frames,) if frames else ()) + tuple(spec.image_hw) + (3,), np.uint8)
  grids, slot, metas = [], 0, []
  for r, row in enumerate(rows):
    if r % g_rows == 0:
      slot = r // g_rows * k
    c = 0
    for j, s in enumerate(row, 1):
      n, n_patch = len(s.tokens), int(s.pixels.shape[0])
      ids[r, c:c + n], pos[:, r, c:c + n] = s.tokens.input_ids, s.mrope_positions
      loss[r, c:c + n], seg[r, c:c + n] = s.tokens.loss_mask, j
      loss[r, c] = 0  # a segment's first token is never predicted from the previous sample
      is_img = np.flatnonzero(np.isin(s.tokens.input_ids,
                                      (spec.image_token_id, spec.video_token_id))) + c
      if len(is_img) * mu != n_patch:
        raise AssertionError(f"{s.where}: {len(is_img)} image / video tokens for {n_patch} "
                             "patches")
      index[r, is_img, 0] = slot // mu + np.arange(len(is_img), dtype=np.int32)
      weight[r, is_img, 0] = 1.0
      px[slot:slot + n_patch] = qv.with_frames(s.pixels, frames) if frames else s.pixels
      if s.grids is not None and len(s.grids):
        grids.append((r // g_rows, np.asarray(s.grids, np.int64).reshape(-1, 3)))
      slot, c = slot + n_patch, c + n
  m, images = math.isqrt(mu), 0
  for g in range(n_g):
    grid = [x for gg, x in grids if gg == g]
    grid = np.concatenate(grid) if grid else np.zeros((0, 3), np.int64)
    meta = qwen_vl_host.vision_metadata(grid, m, spec.window_merge or None, rows=k)
    v_seg = meta["vision_segment_ids"]  # 1.. per image of the group -> of the batch
    meta["vision_segment_ids"] = np.where(v_seg > 0, v_seg + images, 0).astype(np.int32)
    images += int(v_seg.max(initial=0))
    metas.append(meta)
  meta = {key: np.concatenate([x[key] for x in metas]) for key in metas[0]}
  pixels = patch_rows(px)
  real = meta["vision_segment_ids"] > 0
  pixels[~real] = 0.0
  if n_g > 1:
    pixels = pixels.reshape(n_g, k, -1)
    meta = {key: v.reshape((n_g, k) + v.shape[1:]) for key, v in meta.items()}
  return {"input_ids": ids, "attention_mask": (seg > 0).astype(np.int32), "positions": pos,
          "segment_ids": seg, "loss_mask": loss, "pixel_values": pixels, **meta,
          "pack_index": index, "pack_weight": weight, "pack_newline": np.zeros((b, t), bool)}
