"""Anyres batches (pure): packed samples -> the model's fixed-shape inputs.

Anyres models (LLaVA-NeXT / OneVision, `BatchSpec.crop_features > 0`): an image is a variable
number of crops and tokens. M counts *crops*: `pixel_values` (C, H, W, 3) holds the batch's crops
(C = the smallest of `crop_buckets` that holds them; padding crops are zeros, `image_valid` 0),
no dummy runs are needed, and three position-aligned tables say what each position receives:
  pack_index (B, T, K) int32    rows of the batch's flat crop features (crop c, feature f ->
                                c * crop_features + f)
  pack_weight (B, T, K) float32 their weights (0 off image tokens)
  pack_newline (B, T) bool      the position takes `image_newline`
(`models.anyres`, `models.llava`). Distinct compiled shapes: bucket lengths x crop buckets.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mllm_tune.data.packing import BatchSpec, crop_bucket, row_length


def quarter_buckets(budget: int, multiple: int = 1) -> tuple[int, ...]:
  """Crop buckets: the budget's quarters rounded up (to a multiple of `multiple`, at most the
  budget), e.g. 64 -> (16, 32, 48, 64); 60 with multiple 8 -> (16, 32, 48, 60)."""
  quarters = (max(1, -(-budget * q // 4)) for q in (1, 2, 3, 4))
  return tuple(sorted({min(budget, -(-c // multiple) * multiple) for c in quarters}))


def assemble_anyres(rows: Sequence[Sequence], spec: BatchSpec, normalize=None
                    ) -> dict[str, np.ndarray]:
  """`assemble` for anyres samples (`pipeline.Sample` with `table`); see the module docstring."""
  b = spec.batch_size
  fills = [sum(len(s.tokens) for s in row) for row in rows] + [0] * (b - len(rows))
  n_real = sum(int(s.pixels.shape[0]) for row in rows for s in row)
  t = row_length(fills, n_real, spec)
  c_b = crop_bucket(n_real, spec)
  k = max([s.table.index.shape[1] for row in rows for s in row if s.table is not None] or [1])
  ids = np.full((b, t), spec.pad_id, np.int32)
  seg, pos, loss = (np.zeros((b, t), np.int32) for _ in range(3))
  index, weight = np.zeros((b, t, k), np.int32), np.zeros((b, t, k), np.float32)
  newline = np.zeros((b, t), bool)
  px = np.zeros((c_b,) + tuple(spec.image_hw) + (3,), np.uint8)
  valid = np.zeros((c_b,), np.int32)
  slot = 0
  for r, row in enumerate(rows):
    c = 0
    for j, s in enumerate(row, 1):
      n, n_crops = len(s.tokens), int(s.pixels.shape[0])
      ids[r, c:c + n], pos[r, c:c + n] = s.tokens.input_ids, s.tokens.positions
      loss[r, c:c + n], seg[r, c:c + n] = s.tokens.loss_mask, j
      loss[r, c] = 0  # a segment's first token is never predicted from the previous sample
      is_img = np.flatnonzero(np.isin(s.tokens.input_ids,
                                      (spec.image_token_id, spec.video_token_id))) + c
      n_tab = 0 if s.table is None else len(s.table)
      if len(is_img) != n_tab:
        raise AssertionError(f"{s.where}: {len(is_img)} image tokens, table of {n_tab}")
      if n_tab:
        kk = s.table.index.shape[1]
        index[r, is_img, :kk] = s.table.index + slot * spec.crop_features
        weight[r, is_img, :kk] = s.table.weight
        newline[r, is_img] = s.table.newline
      px[slot:slot + n_crops], valid[slot:slot + n_crops] = s.pixels, 1
      slot, c = slot + n_crops, c + n
  pixels = normalize(px) if normalize is not None else px.astype(np.float32)
  pixels[valid == 0] = 0.0
  return {"input_ids": ids, "attention_mask": (seg > 0).astype(np.int32), "positions": pos,
          "segment_ids": seg, "loss_mask": loss, "pixel_values": pixels, "image_valid": valid,
          "pack_index": index, "pack_weight": weight, "pack_newline": newline}
