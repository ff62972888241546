"""Qwen2-VL / Qwen2.5-VL batches (pure): packed samples -> the model's fixed-shape inputs.

Samples (`pipeline.Sample` with `grids` and `mrope_positions`) are placed in rows by the planner of
`data/packing.py` under a per-batch *patch* budget (`BatchSpec.max_images`, in patches; a sample
counts its patches). A batch holds (B rows, T in `bucket_lengths`, P in `crop_buckets`, here
patch counts, each a multiple of m^2):
  input_ids, attention_mask, segment_ids, loss_mask (B, T)  as in `data/packing.py`
  positions (3, B, T) int32        each sample's own M-RoPE ids (t, h, w), restarting at every
                                   packed sample (`models.qwen_vl_host.get_rope_index`)
  pixel_values (P, C*T*p*p) float32  every image's patch rows, row-major over the batch
                                   (sample by sample, image by image), zero rows after them
  vision_segment_ids (P,), vision_pos_hw (P, 2), vision_window_ids (P,) (Qwen2.5-VL)
                                   `models.qwen_vl_host.vision_metadata` (1.. per image over the
                                   batch, 0 on padding rows)
  pack_index (B, T, 1), pack_weight (B, T, 1), pack_newline (B, T)
                                   the merged token (row of the P / m^2 merger outputs) each
                                   image position takes, as `models.qwen_vl_host.pack_tables`
Samples attend only within their segment, their image patches only within their image, so every
packed sample computes what transformers computes for the record alone. Distinct compiled shapes:
bucket lengths x patch buckets.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

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
  b, mu = spec.batch_size, spec.merge_unit
  fills = [sum(len(s.tokens) for s in row) for row in rows] + [0] * (b - len(rows))
  n_real = sum(int(s.pixels.shape[0]) for row in rows for s in row)
  t = row_length(fills, n_real, spec)
  p_b = crop_bucket(n_real, spec)
  ids = np.full((b, t), spec.pad_id, np.int32)
  seg, loss = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
  pos = np.zeros((3, b, t), np.int32)
  index, weight = np.zeros((b, t, 1), np.int32), np.zeros((b, t, 1), np.float32)
  px = np.zeros((p_b,) + tuple(spec.image_hw) + (3,), np.uint8)
  grids, slot = [], 0
  for r, row in enumerate(rows):
    c = 0
    for j, s in enumerate(row, 1):
      n, n_patch = len(s.tokens), int(s.pixels.shape[0])
      ids[r, c:c + n], pos[:, r, c:c + n] = s.tokens.input_ids, s.mrope_positions
      loss[r, c:c + n], seg[r, c:c + n] = s.tokens.loss_mask, j
      loss[r, c] = 0  # a segment's first token is never predicted from the previous sample
      is_img = np.flatnonzero(s.tokens.input_ids == spec.image_token_id) + c
      if len(is_img) * mu != n_patch:
        raise AssertionError(f"{s.where}: {len(is_img)} image tokens for {n_patch} patches")
      index[r, is_img, 0] = slot // mu + np.arange(len(is_img), dtype=np.int32)
      weight[r, is_img, 0] = 1.0
      px[slot:slot + n_patch] = s.pixels
      if s.grids is not None and len(s.grids):
        grids.append(np.asarray(s.grids, np.int64).reshape(-1, 3))
      slot, c = slot + n_patch, c + n
  grid_thw = np.concatenate(grids) if grids else np.zeros((0, 3), np.int64)
  m = math.isqrt(mu)
  meta = qwen_vl_host.vision_metadata(grid_thw, m, spec.window_merge or None, rows=p_b)
  pixels = patch_rows(px)
  pixels[slot:] = 0.0
  return {"input_ids": ids, "attention_mask": (seg > 0).astype(np.int32), "positions": pos,
          "segment_ids": seg, "loss_mask": loss, "pixel_values": pixels, **meta,
          "pack_index": index, "pack_weight": weight, "pack_newline": np.zeros((b, t), bool)}
