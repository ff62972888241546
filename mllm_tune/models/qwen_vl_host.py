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


PATCH_MULTIPLE = 64  # default patch-row bucket: a multiple of 64 rows (and of m^2)


def _grids(grid_thw, what: str = "image / video") -> np.ndarray:
  g = np.asarray(grid_thw, np.int64).reshape(-1, 3)
  if (g < 1).any():
    raise ValueError(f"{what} grids {g.tolist()}: every entry must be >= 1")
  return g


def merged_tokens(grid_thw, merge: int) -> list[int]:
  """LLM tokens per image (video): t * h * w / m^2."""
  g = _grids(grid_thw)
  bad = [r for r in g.tolist() if r[1] % merge or r[2] % merge]
  if bad:
    raise ValueError(f"image / video grids {bad}: h and w must be multiples of the merge size "
                     f"{merge}")
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


def pack_tables(input_ids_BT: np.ndarray, image_token_id: int, num_merged: int,
                video_token_id: int | None = None, num_video_merged: int = 0
                ) -> dict[str, np.ndarray]:
  """Position-aligned `pack_index` (B, T, 1), `pack_weight` (B, T, 1) (1 at vision tokens) and
  `pack_newline` (B, T) (all False). The image tokens take merged rows 0.. in batch order, the
  video tokens (`video_token_id`) the rows after the images' (`num_merged` ..), as the patch
  buffer holds the images' patches before the videos'. Raises when the tokens do not number
  the merged rows."""
  ids = np.asarray(input_ids_BT)
  b, t = ids.shape
  out = {"pack_index": np.zeros((b, t, 1), np.int32),
         "pack_weight": np.zeros((b, t, 1), np.float32),
         "pack_newline": np.zeros((b, t), bool)}
  start = 0
  kinds = [("image", image_token_id, int(num_merged))]
  if video_token_id is not None:
    kinds.append(("video", video_token_id, int(num_video_merged)))
  for name, token, n in kinds:
    is_tok = ids == token
    n_tok = int(is_tok.sum())
    if n_tok != n:
      raise ValueError(f"input_ids hold {n_tok} {name} tokens (id {token}) but the {name}s "
                       f"yield {n} merged tokens; the text's placeholders do not match the "
                       f"{name}s")
    out["pack_index"][is_tok, 0] = start + np.arange(n, dtype=np.int32)
    out["pack_weight"][is_tok] = 1.0
    start += n
  return out


def _video_grids(video_grid_thw, split_frames: bool) -> list:
  """Video grids in the order their token runs come; Qwen3-VL (`split_frames`) puts every frame
  in a run of its own (between timestamp tokens), so a (t, h, w) grid is t grids (1, h, w)."""
  if video_grid_thw is None:
    return []
  g = _grids(video_grid_thw).tolist()
  return [[1, h, w] for t, h, w in g for _ in range(t)] if split_frames else g


def get_rope_index(input_ids_BT, mm_token_type_ids_BT, image_grid_thw, merge: int,
                   attention_mask_BT=None, video_grid_thw=None, second_per_grid_ts=None,
                   tokens_per_second=None, split_video_frames: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
  """M-RoPE positions (3, B, T) int32 and `rope_deltas` (B,) int32, as transformers 5.25
  `Qwen2VLModel.get_rope_index` (and Qwen2.5-VL's / Qwen3-VL's): over each row's real tokens,
  a text run advances all three axes by 1 per token; a vision run (one image per run of
  `mm_token_type_ids == 1`, one video per run of 2) starting at `cur` with a merged grid
  (t, h', w') gets (t_pos + cur, row + cur, col + cur) in raster order, then
  `cur += max(h', w')`. `t_pos` is the frame index t_idx, or for Qwen2.5-VL videos
  (`tokens_per_second` given: `QwenVLConfig.video_time_step`) `trunc(t_idx * tokens_per_second *
  second_per_grid_t)` in float32 (`second_per_grid_ts` (videos,), default 1 s). Qwen3-VL
  (`split_video_frames`) runs each video frame alone. Images and videos are taken in order
  over the batch, each from its own list. Padding positions are 0. `rope_deltas` = max
  position + 1 - real tokens (decoding continues at `real tokens + step + delta` on all
  axes)."""
  ids = np.asarray(input_ids_BT)
  types = np.asarray(mm_token_type_ids_BT)
  mask = np.ones_like(ids) if attention_mask_BT is None else np.asarray(attention_mask_BT)
  if types.shape != ids.shape or mask.shape != ids.shape:
    raise ValueError(f"mm_token_type_ids {types.shape} / attention_mask {mask.shape} do not "
                     f"match input_ids {ids.shape}")
  names = {1: "image", 2: "video"}
  lists = {1: _grids(image_grid_thw).tolist() if image_grid_thw is not None else [],
           2: _video_grids(video_grid_thw, split_video_frames)}
  grids = {k: iter(v) for k, v in lists.items()}
  n_videos = 0 if video_grid_thw is None else len(_grids(video_grid_thw))
  secs = (np.ones(n_videos, np.float32) if second_per_grid_ts is None
          else np.asarray(second_per_grid_ts, np.float32).reshape(-1))
  if len(secs) != n_videos:
    raise ValueError(f"second_per_grid_ts has {len(secs)} entries for {n_videos} videos")
  secs = iter(secs.tolist())
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
      if kind not in names:
        raise ValueError(f"row {row}: mm_token_type_ids value {kind} (0 text, 1 image, 2 video)")
      grid = next(grids[kind], None)
      if grid is None:
        raise ValueError(f"row {row} has more {names[kind]} runs than {names[kind]}_grid_thw "
                         f"has {names[kind]}s")
      gt, gh, gw = grid[0], grid[1] // merge, grid[2] // merge
      if gt * gh * gw != n:
        raise ValueError(f"row {row}: a {names[kind]} run of {n} tokens, but its grid {grid} "
                         f"gives {gt * gh * gw} merged tokens (one {names[kind]} per run of "
                         f"{names[kind]} tokens)")
      t_pos = np.arange(gt)
      if kind == 2 and tokens_per_second is not None and not split_video_frames:
        step = np.float32(tokens_per_second) * np.float32(next(secs))
        t_pos = np.trunc(np.arange(gt, dtype=np.float32) * step).astype(np.int64)
      tt, hh, ww = np.meshgrid(t_pos, np.arange(gh), np.arange(gw), indexing="ij")
      parts.append(np.stack([tt, hh, ww]).reshape(3, -1) + cur)
      cur += max(gh, gw)
    pos = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), np.int64)
    positions[:, row, real] = pos
    deltas[row] = (pos.max() + 1 - pos.shape[1]) if pos.size else 0
  for kind, it in grids.items():
    if next(it, None) is not None:
      raise ValueError(f"{names[kind]}_grid_thw has more {names[kind]}s than the rows' "
                       f"{names[kind]}-token runs")
  return positions.astype(np.int32), deltas.astype(np.int32)


def mm_token_types(input_ids_BT, image_token_id: int, video_token_id: int | None = None):
  """`mm_token_type_ids` from the ids (1 at image tokens, 2 at video tokens, 0 elsewhere), for
  processor outputs that lack it."""
  ids = np.asarray(input_ids_BT)
  out = (ids == image_token_id).astype(np.int32)
  if video_token_id is not None:
    out[ids == video_token_id] = 2
  return out
