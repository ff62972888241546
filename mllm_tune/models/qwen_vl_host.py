"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL host-side index work (numpy): everything data-dependent
about images is computed here, so the jitted model sees only fixed-shape arrays.

For a batch of images with patch grids `grid_thw` (n, 3) (t, h, w in patches; h and w multiples
of the merge size m), all images' patches are one buffer of P rows in transformers' order
(image by image, frame by frame, m x m merge blocks in raster order, raster inside a block),
padded to a bucket with zero rows. Per patch row:
  vision_segment_ids (P,) int32   1.. per (image, frame), 0 = padding (the attention blocks:
                                  `transformers.vision_utils.get_vision_cu_seqlens`)
  vision_pos_hw (P, 2) int32      (row, column) of the patch in its image, the 2D RoPE ids
                                  (`get_vision_position_ids`)
  vision_window_ids (P,) int32    Qwen2.5-VL: the patch's window within its frame
                                  (`get_vision_window_index`: windows of `window_merge` x
                                  `window_merge` merged tokens from the top-left, partial at the
                                  right / bottom edges)
transformers permutes merge units into window order and back; a "same segment and same window"
attention mask over the unpermuted rows computes the same function.

The merged tokens are rows P / m^2 in the same order; `pack_tables` places them at the image
tokens of `input_ids` (the position-aligned `pack_index` / `pack_weight` / `pack_newline` of
`models.llava.gather_packed`). `get_rope_index` gives the (3, B, T) M-RoPE positions
(`Qwen2VLModel.get_rope_index`).
"""
from __future__ import annotations

import itertools

import numpy as np

from mllm_tune.models import anyres

PATCH_MULTIPLE = 64  # default patch-row bucket: a multiple of 64 rows (and of m^2)


def _grids(grid_thw) -> np.ndarray:
  g = np.asarray(grid_thw, np.int64).reshape(-1, 3)
  if (g < 1).any():
    raise ValueError(f"image_grid_thw {g.tolist()}: every entry must be >= 1")
  return g


def merged_tokens(grid_thw, merge: int) -> list[int]:
  """LLM tokens per image: t * h * w / m^2."""
  g = _grids(grid_thw)
  bad = [r for r in g.tolist() if r[1] % merge or r[2] % merge]
  if bad:
    raise ValueError(f"image grids {bad}: h and w must be multiples of the merge size {merge}")
  return [int(t * h * w) // merge ** 2 for t, h, w in g.tolist()]


def patch_bucket(n: int, multiple: int | None = PATCH_MULTIPLE, merge: int = 2) -> int:
  """Rows of the padded patch buffer for n patches: the next multiple of `multiple` (which must
  be a multiple of m^2, so padding never shares a merge block); n itself for None."""
  if multiple is None:
    return int(n)
  if multiple < 1 or multiple % merge ** 2:
    raise ValueError(f"patch bucket multiple {multiple} must be a positive multiple of "
                     f"{merge ** 2} (merge size squared)")
  return max(multiple, -(-int(n) // multiple) * multiple)


def _block_major(h: int, w: int, m: int) -> tuple[np.ndarray, np.ndarray]:
  """(row, column) of the patches of an h x w grid in merge-block-major order."""
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  perm = lambda a: a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
  return perm(rows), perm(cols)


def vision_metadata(grid_thw, merge: int, window_merge: int | None = None,
                    rows: int | None = None) -> dict[str, np.ndarray]:
  """`vision_segment_ids`, `vision_pos_hw` and (with `window_merge`, Qwen2.5-VL) 
  `vision_window_ids` for the images' patches, padded to `rows` (default: no padding)."""
  g = _grids(grid_thw)
  merged_tokens(g, merge)  # validates the grids
  seg, pos, win = [], [], []
  segment = 0
  for t, h, w in g.tolist():
    r, c = _block_major(h, w, merge)
    if window_merge:
      wm = window_merge
      per_row = (w // merge) // wm + 1  # transformers pads a full window when divisible
      wid = (r // merge // wm) * per_row + (c // merge // wm)
    for _ in range(t):
      segment += 1
      seg.append(np.full(h * w, segment))
      pos.append(np.stack([r, c], -1))
      if window_merge:
        win.append(wid)
  n = int(g.prod(-1).sum())
  rows = n if rows is None else int(rows)
  if n > rows:
    raise ValueError(f"{n} image patches do not fit a buffer of {rows} rows")
  out = {"vision_segment_ids": np.zeros(rows, np.int32),
         "vision_pos_hw": np.zeros((rows, 2), np.int32)}
  if n:
    out["vision_segment_ids"][:n] = np.concatenate(seg)
    out["vision_pos_hw"][:n] = np.concatenate(pos)
  if window_merge:
    out["vision_window_ids"] = np.zeros(rows, np.int32)
    if n:
      out["vision_window_ids"][:n] = np.concatenate(win)
  return out


def pad_patches(pixel_values_PX: np.ndarray, rows: int) -> np.ndarray:
  """The patch rows zero-padded to `rows` (float32)."""
  px = np.asarray(pixel_values_PX, np.float32)
  if px.ndim != 2:
    raise ValueError(f"pixel_values of shape {px.shape}: expected (patches, C*T*p*p)")
  if px.shape[0] > rows:
    raise ValueError(f"{px.shape[0]} patch rows do not fit a buffer of {rows} rows")
  return np.pad(px, ((0, rows - px.shape[0]), (0, 0)))


def pack_tables(input_ids_BT: np.ndarray, image_token_id: int,
                num_merged: int) -> dict[str, np.ndarray]:
  """Position-aligned `pack_index` (B, T, 1) (merged-token row of every image token, in batch
  order), `pack_weight` (B, T, 1) (1 at image tokens) and `pack_newline` (B, T) (all False).
  Raises when the image tokens do not number `num_merged`."""
  n = int(num_merged)
  table = anyres.PackTable(np.arange(n, dtype=np.int32)[:, None], np.ones((n, 1), np.float32),
                           np.zeros(n, bool))
  ids = np.asarray(input_ids_BT)
  n_tok = int((ids == image_token_id).sum())
  if n_tok != n:
    raise ValueError(f"input_ids hold {n_tok} image tokens (id {image_token_id}) but the images "
                     f"yield {n} merged tokens; the text's placeholders do not match the images")
  b, t = ids.shape
  out = {"pack_index": np.zeros((b, t, 1), np.int32),
         "pack_weight": np.zeros((b, t, 1), np.float32),
         "pack_newline": np.zeros((b, t), bool)}
  is_img = ids == image_token_id
  out["pack_index"][is_img], out["pack_weight"][is_img] = table.index, table.weight
  return out


def get_rope_index(input_ids_BT, mm_token_type_ids_BT, image_grid_thw, merge: int,
                   attention_mask_BT=None) -> tuple[np.ndarray, np.ndarray]:
  """M-RoPE positions (3, B, T) int32 and `rope_deltas` (B,) int32 (images only), as
  transformers 5.25 `Qwen2VLModel.get_rope_index` (Qwen2.5-VL's and Qwen3-VL's are the same for
  images; Qwen3-VL splits videos into one-frame grids between timestamp tokens): over
  each row's real tokens, a text run advances all three axes by 1 per token; an image run (one
  image per run of `mm_token_type_ids == 1`) starting at `cur` with a merged grid (t, h', w')
  gets (t_idx + cur, row + cur, col + cur) in raster order, then `cur += max(h', w')`. Padding
  positions are 0. `rope_deltas` = max position + 1 - real tokens (decoding continues at
  `real tokens + step + delta` on all axes)."""
  ids = np.asarray(input_ids_BT)
  types = np.asarray(mm_token_type_ids_BT)
  mask = np.ones_like(ids) if attention_mask_BT is None else np.asarray(attention_mask_BT)
  if types.shape != ids.shape or mask.shape != ids.shape:
    raise ValueError(f"mm_token_type_ids {types.shape} / attention_mask {mask.shape} do not "
                     f"match input_ids {ids.shape}")
  if (types == 2).any():
    raise ValueError("mm_token_type_ids mark video tokens (2); videos are not supported yet")
  grids = iter(_grids(image_grid_thw).tolist() if image_grid_thw is not None else [])
  b, t = ids.shape
  positions = np.zeros((3, b, t), np.int64)
  deltas = np.zeros(b, np.int64)
  for row in range(b):
    real = mask[row].astype(bool)
    kinds = types[row][real].tolist()
    parts, cur = [], 0
    for kind, group in itertools.groupby(kinds):
      n = len(list(group))
      if kind == 0:
        parts.append(np.broadcast_to(np.arange(cur, cur + n), (3, n)))
        cur += n
        continue
      grid = next(grids, None)
      if grid is None:
        raise ValueError(f"row {row} has more image runs than image_grid_thw has images")
      gt, gh, gw = grid[0], grid[1] // merge, grid[2] // merge
      if gt * gh * gw != n:
        raise ValueError(f"row {row}: an image run of {n} tokens, but its grid {grid} gives "
                         f"{gt * gh * gw} merged tokens (one image per run of image tokens)")
      tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
      parts.append(np.stack([tt, hh, ww]).reshape(3, -1) + cur)
      cur += max(gh, gw)
    pos = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), np.int64)
    positions[:, row, real] = pos
    deltas[row] = (pos.max() + 1 - pos.shape[1]) if pos.size else 0
  if next(grids, None) is not None:
    raise ValueError("image_grid_thw has more images than the rows' image-token runs")
  return positions.astype(np.int32), deltas.astype(np.int32)


def mm_token_types(input_ids_BT, image_token_id: int, video_token_id: int | None = None):
  """`mm_token_type_ids` from the ids (1 at image tokens, 2 at video tokens, 0 elsewhere), for
  processor outputs that lack it."""
  ids = np.asarray(input_ids_BT)
  out = (ids == image_token_id).astype(np.int32)
  if video_token_id is not None:
    out[ids == video_token_id] = 2
  return out
