"""What a Hugging Face processor returns -> keyword arguments of `model.apply` and `mt.generate`.

    enc = processor(images=[img_a, img_b], text=prompts, return_tensors="np", padding=True)
    kw = mt.hf_inputs(model, enc)
    logits = model.apply({"params": params}, **kw)
    new = mt.generate(model, params, **kw, max_new_tokens=20)

Layouts (numpy or torch in, numpy out):
- input_ids / attention_mask (B, T): unchanged (int32).
- LLaVA-1.5: HF `pixel_values` (N, 3, H, W) -> ours (N, H, W, 3) (channels last).
- LLaVA-NeXT / OneVision: HF `pixel_values` (N_images, max_crops, 3, S, S), zero-padded along
  the crop axis, plus `image_sizes` (N_images, 2) original (H, W) and, for OneVision,
  `batch_num_images` (B,) (a row with more than one image has one crop per image) -> ours: the
  real crops only, (sum of crops, S, S, 3), and the position-aligned pack tables (`pack_index`,
  `pack_weight`, `pack_newline`, see `models.anyres` and `models.llava`). A 4-D HF
  `pixel_values` (crops already concatenated) is accepted too. OneVision videos:
  `pixel_values_videos` (N_videos, frames, 3, S, S) -> every frame a crop after the images',
  the video tokens' table rows `anyres.video_table` (pooled frame features, one newline).
- Qwen2-VL / Qwen2.5-VL / Qwen3-VL: HF `pixel_values` (sum of patches, C*T*p*p) and `image_grid_thw`
  (N_images, 3); videos: `pixel_values_videos` and `video_grid_thw` (N_videos, 3) (and for
  Qwen2.5-VL `second_per_grid_ts` (N_videos,), default 1 s); `mm_token_type_ids` (B, T) (1
  image, 2 video; derived from the ids when absent) -> ours: one buffer of patch rows, the
  images' then the videos', zero-padded to a multiple of `patch_multiple` rows,
  `vision_segment_ids` (one per image frame pair), `vision_pos_hw`, `vision_window_ids` (2.5),
  the pack tables (one merged token per image or video token; the videos' rows follow the
  images') and the (3, B, T) M-RoPE `positions` (`models.qwen_vl_host.get_rope_index`, with
  Qwen2.5-VL's time scaling and Qwen3-VL's frame-by-frame runs).
Images (videos) are matched to image- (video-) token runs in order over the batch (row-major),
as transformers does.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from mllm_tune.models import anyres, qwen_vl_host
from mllm_tune.models.config import LlavaConfig
from mllm_tune.models.qwen_vl_config import QwenVLConfig


def _np(x) -> np.ndarray:
  if hasattr(x, "detach"):  # torch
    x = x.detach().cpu().float().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
  return np.asarray(x)


def anyres_crop_counts(cfg: LlavaConfig, image_sizes_N2: np.ndarray,
                       batch_num_images: np.ndarray | None = None) -> list[int]:
  """Crops per image, as the model recomputes them from `image_sizes` (OneVision: 1 for images
  of multi-image rows)."""
  if batch_num_images is None or cfg.model_type != "llava_onevision":
    flags = [True] * len(image_sizes_N2)
  else:
    flags = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
  if len(flags) != len(image_sizes_N2):
    raise ValueError(f"batch_num_images sums to {len(flags)} images but image_sizes has "
                     f"{len(image_sizes_N2)}")
  return [anyres.num_crops(hw, cfg.image_grid_pinpoints, cfg.vision.image_size, f)
          for hw, f in zip(image_sizes_N2, flags)]


def image_tables(cfg: LlavaConfig, image_sizes_N2, crops: list[int]) -> list[anyres.PackTable]:
  """One `PackTable` per image (its token count is `len(table)`)."""
  return [anyres.pack_table(hw, n, cfg.crop_side, cfg.image_grid_pinpoints,
                            cfg.vision.image_size, cfg.model_type, cfg.vision_aspect_ratio)
          for hw, n in zip(np.asarray(image_sizes_N2).tolist(), crops)]


def scatter_tables(input_ids_BT: np.ndarray, image_token_id: int,
                   table: anyres.PackTable, what: str = "image") -> dict[str, np.ndarray]:
  """Place a table of image tokens (in batch order) at the image-token positions of
  `input_ids`: position-aligned `pack_index` (B, T, K), `pack_weight` (B, T, K), `pack_newline`
  (B, T). Raises when the counts differ."""
  ids = np.asarray(input_ids_BT)
  is_img = ids == image_token_id
  n_tok, n_tab = int(is_img.sum()), len(table)
  if n_tok != n_tab:
    raise ValueError(f"input_ids hold {n_tok} {what} tokens (id {image_token_id}) but the "
                     f"{what}s yield {n_tab}; the text's placeholders do not match the {what}s")
  b, t = ids.shape
  k = table.index.shape[1]
  index = np.zeros((b, t, k), np.int32)
  weight = np.zeros((b, t, k), np.float32)
  newline = np.zeros((b, t), bool)
  index[is_img], weight[is_img], newline[is_img] = table.index, table.weight, table.newline
  return {"pack_index": index, "pack_weight": weight, "pack_newline": newline}


def hf_inputs(model_or_config, processor_output: Mapping[str, Any], *,
              patch_multiple: int | None = qwen_vl_host.PATCH_MULTIPLE) -> dict[str, np.ndarray]:
  """See the module docstring. Unknown keys (e.g. `token_type_ids`) are dropped.
  `patch_multiple`: Qwen2-VL patch buffers are padded to a multiple of it (fewer compiled
  shapes; None: no padding)."""
  cfg = getattr(model_or_config, "config", model_or_config)
  out = {k: _np(v) for k, v in processor_output.items() if v is not None}
  if "input_ids" not in out:
    raise ValueError("processor output has no 'input_ids'")
  ids = out["input_ids"].astype(np.int32)
  if ids.ndim == 1:
    ids = ids[None]
  kw = {"input_ids": ids}
  if "attention_mask" in out:
    kw["attention_mask"] = out["attention_mask"].astype(np.int32).reshape(ids.shape)
  if isinstance(cfg, QwenVLConfig):
    return _qwen_vl_inputs(cfg, out, kw, patch_multiple)
  if "pixel_values_videos" in out:
    if not isinstance(cfg, LlavaConfig) or cfg.model_type != "llava_onevision" or (
        cfg.video_token_id < 0):
      raise ValueError(f"{getattr(cfg, 'model_type', type(cfg).__name__)}: pixel_values_videos "
                       "given; videos are supported for llava_onevision (with a "
                       "video_token_index) and the Qwen-VL families")
    return _onevision_inputs(cfg, out, kw)
  if "pixel_values" not in out:
    return kw
  if not isinstance(cfg, LlavaConfig):
    raise ValueError("pixel_values given for a text-only model")
  px = out["pixel_values"].astype(np.float32)
  if not cfg.anyres:
    if px.ndim != 4:
      raise ValueError(f"pixel_values of shape {px.shape}: expected (N, 3, H, W)")
    kw["pixel_values"] = np.ascontiguousarray(px.transpose(0, 2, 3, 1))
    return kw
  crops_px, table = _anyres_images(cfg, out)
  kw["pixel_values"] = crops_px
  kw.update(scatter_tables(kw["input_ids"], cfg.image_token_id, table))
  return kw


def _anyres_images(cfg: LlavaConfig, out: dict) -> tuple[np.ndarray, anyres.PackTable]:
  """(the real crops (sum of crops, S, S, 3), their token table) of an anyres processor
  output's images."""
  px = out["pixel_values"].astype(np.float32)
  if "image_sizes" not in out:
    raise ValueError(f"{cfg.model_type}: the processor output needs 'image_sizes' (the original "
                     "(height, width) of every image)")
  sizes = out["image_sizes"].reshape(-1, 2).astype(np.int64)
  crops = anyres_crop_counts(cfg, sizes, out.get("batch_num_images"))
  if px.ndim == 5:
    if px.shape[0] != len(sizes):
      raise ValueError(f"pixel_values holds {px.shape[0]} images, image_sizes {len(sizes)}")
    short = [i for i, n in enumerate(crops) if n > px.shape[1]]
    if short:
      raise ValueError(f"image {short[0]} needs {crops[short[0]]} crops, pixel_values has "
                       f"{px.shape[1]} per image")
    px = np.concatenate([px[i, :n] for i, n in enumerate(crops)]) if crops else px[:0, 0]
  elif px.ndim != 4 or px.shape[0] != sum(crops):
    raise ValueError(f"pixel_values of shape {px.shape}: expected (images, crops, 3, S, S) or "
                     f"({sum(crops)}, 3, S, S)")
  tables = image_tables(cfg, sizes, crops)
  return (np.ascontiguousarray(px.transpose(0, 2, 3, 1)),
          anyres.concat_tables(tables, crops, cfg.crop_side))


def _onevision_inputs(cfg: LlavaConfig, out: dict, kw: dict) -> dict:
  """OneVision with videos: the images' crops, then every video frame as a crop of its own;
  image tokens take the images' table, video tokens the videos' (`anyres.video_table`)."""
  vids = out["pixel_values_videos"].astype(np.float32)
  s = cfg.vision.image_size
  if vids.ndim != 5 or vids.shape[2:] != (3, s, s):
    raise ValueError(f"pixel_values_videos of shape {vids.shape}: expected (videos, frames, 3, "
                     f"{s}, {s})")
  side, s2 = cfg.crop_side, cfg.crop_side ** 2
  img_px, img_table = (_anyres_images(cfg, out) if "pixel_values" in out
                       else (np.zeros((0, s, s, 3), np.float32), None))
  n_videos, n_frames = vids.shape[:2]
  frames = vids.reshape(n_videos * n_frames, 3, s, s).transpose(0, 2, 3, 1)
  table = anyres.concat_tables([anyres.video_table(n_frames, side)] * n_videos,
                               [n_frames] * n_videos, side)
  table = anyres.PackTable(table.index + len(img_px) * s2, table.weight,  # frames after crops
                           table.newline)
  ids = kw["input_ids"]
  tabs = scatter_tables(ids, cfg.video_token_id, table, "video")
  if img_table is not None:
    imgs = scatter_tables(ids, cfg.image_token_id, img_table)
    is_img = ids == cfg.image_token_id
    tabs = {k: np.where(is_img[..., None] if v.ndim == 3 else is_img, imgs[k], v)
            for k, v in tabs.items()}
  elif (ids == cfg.image_token_id).any():
    raise ValueError("input_ids hold image tokens but the processor output has no pixel_values")
  kw["pixel_values"] = np.ascontiguousarray(np.concatenate([img_px, frames]))
  kw.update(tabs)
  return kw


def _patch_rows(out: dict, px_key: str, grid_key: str, patch_dim: int):
  """(float32 patch rows, grids (N, 3)) of one modality of a Qwen processor output; empty when
  absent."""
  grids = out.get(grid_key)
  if px_key not in out:
    if grids is not None:
      raise ValueError(f"{grid_key} given without {px_key}")
    return np.zeros((0, patch_dim), np.float32), np.zeros((0, 3), np.int64)
  if grids is None:
    what = "image" if px_key == "pixel_values" else "video"
    raise ValueError(f"the processor output needs '{grid_key}' (the (t, h, w) patch grid of "
                     f"every {what}) beside {px_key}")
  grids = np.asarray(grids, np.int64).reshape(-1, 3)
  px = out[px_key].astype(np.float32)
  n = int(grids.prod(-1).sum())
  if px.ndim != 2 or px.shape != (n, patch_dim):
    raise ValueError(f"{px_key} of shape {px.shape}: the grids {grids.tolist()} need "
                     f"({n}, {patch_dim}) patch rows")
  return px, grids


def _qwen_vl_inputs(cfg: QwenVLConfig, out: dict, kw: dict, patch_multiple: int | None) -> dict:
  ids, v = kw["input_ids"], cfg.vision
  try:
    img_px, img_grids = _patch_rows(out, "pixel_values", "image_grid_thw", v.patch_dim)
    vid_px, vid_grids = _patch_rows(out, "pixel_values_videos", "video_grid_thw", v.patch_dim)
  except ValueError as e:
    raise ValueError(f"{cfg.model_type}: {e}") from None
  if not len(img_grids) and not len(vid_grids):
    return kw  # text only: positions default to cumsum(attention_mask) - 1 on all axes
  types = out.get("mm_token_type_ids")
  if types is None:
    types = qwen_vl_host.mm_token_types(ids, cfg.image_token_id, cfg.video_token_id)
  types = np.asarray(types, np.int32).reshape(ids.shape)
  for code, name, token in ((1, "image", cfg.image_token_id), (2, "video", cfg.video_token_id)):
    if not np.array_equal(types == code, ids == token):
      raise ValueError(f"mm_token_type_ids mark {int((types == code).sum())} {name} tokens "
                       f"({code}) but input_ids hold {int((ids == token).sum())} (id {token})")
  m = v.spatial_merge_size
  grids = np.concatenate([img_grids, vid_grids])
  rows = qwen_vl_host.patch_bucket(len(img_px) + len(vid_px), patch_multiple, m)
  kw["pixel_values"] = qwen_vl_host.pad_patches(np.concatenate([img_px, vid_px]), rows)
  kw.update(qwen_vl_host.vision_metadata(grids, m, v.window_merge if v.windowed else None, rows))
  kw.update(qwen_vl_host.pack_tables(
      ids, cfg.image_token_id, sum(qwen_vl_host.merged_tokens(img_grids, m)),
      cfg.video_token_id, sum(qwen_vl_host.merged_tokens(vid_grids, m))))
  kw["positions"], _ = qwen_vl_host.get_rope_index(
      ids, types, img_grids, m, kw.get("attention_mask"), video_grid_thw=vid_grids,
      second_per_grid_ts=out.get("second_per_grid_ts"), tokens_per_second=cfg.video_time_step,
      split_video_frames=cfg.split_video_frames)
  return kw
