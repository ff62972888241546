"""Qwen-VL videos given as frames: the layout of transformers' `Qwen2VLVideoProcessor` (and
`Qwen3VLVideoProcessor`), with PIL resizing.

A video is a list of already sampled frames (image files; the JSON record names them or their
folder, `data/sources.py`), all of one size. Per video:
  1. `smart_resize` of the frame size with the *video* processor's pixel budget (below), once
     for all frames; one PIL resize per frame (`resample`, bicubic), as for images;
  2. the frame count padded to a multiple of `temporal_patch_size` (T) by repeating the last
     frame;
  3. patches: the frames viewed as (t, T, gh/m, m, p, gw/m, m, p, 3) and ordered
     (t, gh/m, gw/m, m, m, T, p, p, 3): frame pair by frame pair, merge blocks in raster order,
     raster inside a block; a patch row holds T consecutive frames (C, T, p, p after
     `qwen_images.patch_rows`), where an image row repeats its one frame. Grid (t, gh, gw),
     t = frames / T; the LLM sees t * gh * gw / m^2 tokens.
Qwen2.5-VL also places the frame pairs in time: its M-RoPE time step is `tokens_per_second *
second_per_grid_t`, with `second_per_grid_t = T / fps` and `fps` the rate the frames were
sampled at (the record's `fps`, else `data.video_fps`, default 2.0: qwen-vl-utils' sampling
rate). transformers' processor reads the rate from the video's metadata and assumes 24 for
frames given without it, so give `fps` to match a processor call with metadata.

Where the settings come from, as transformers' `AutoVideoProcessor`: the `video_processor`
section of `processor_config.json`, else `video_preprocessor_config.json`, else
`preprocessor_config.json` (the image processor's); beyond transformers, a `processor_config
.json` with an `image_processor` section only is read the same way. Missing budgets take the
video class's defaults (min_pixels 128 * 28 * 28, max_pixels 768 * 28 * 28).
`cap_pixels_per_frame` (qwen-vl-utils' per-frame cap) is refused, not silently ignored. The
rescale and normalization must equal the image processor's (checked when the pipeline is
built): a batch normalizes all its patches at once.

Qwen3-VL (`qwen3=True`) differs in three ways, as `Qwen3VLVideoProcessor` / `Qwen3VLProcessor`:
its budget counts the whole video (`qwen3_smart_resize`: t_bar * h_bar * w_bar against
min_pixels / max_pixels, class defaults 128 * 32 * 32 and 768 * 32 * 32; at least 2 frames); each
frame pair is its own run of tokens after a timestamp, `<{t:.1f} seconds>` with t the mean time
of the pair's frames (`frame_timestamps`, frame i at i / fps; `video_text`); and so M-RoPE
treats every pair as a one-frame grid. Frames are used as given (transformers would sample
them again at its `fps` from a decoded video's metadata).

One difference from transformers, by design: its video processor resizes with torchvision
(bicubic, antialiased, on float tensors), which this machine's stack does not need; we resize
frames with PIL, exactly as images. Pixel values therefore differ from transformers' video
processor by interpolation rounding, while the layout, grids and token counts are the same.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from mllm_tune.data.errors import DataError
from mllm_tune.data.images import to_rgb
from mllm_tune.data.qwen_images import QwenImageSpec, processor_section

# `Qwen2VLVideoProcessor` class defaults (transformers 5); Qwen3-VL's, over the whole video
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
QWEN3_MIN_PIXELS = 128 * 32 * 32
QWEN3_MAX_PIXELS = 768 * 32 * 32
DEFAULT_FPS = 2.0
VIDEO_FILE = "video_preprocessor_config.json"


def video_section(model_dir: str) -> tuple[dict, str]:
  """(video processor dict, where it was read); see the module docstring for the order."""
  proc = os.path.join(model_dir, "processor_config.json")
  if os.path.isfile(proc):
    with open(proc, encoding="utf-8") as f:
      d = json.load(f).get("video_processor")
    if isinstance(d, dict):
      return d, f"{proc}: video_processor"
  path = os.path.join(model_dir, VIDEO_FILE)
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f), path
  d, where = processor_section(model_dir)
  return d, f"{where} (no video processor config: the image processor's)"


def video_spec_from_hf(d: dict, where: str, qwen3: bool = False, **overrides) -> QwenImageSpec:
  """A video processor dict -> the spec (`QwenImageSpec` fields), with the video class's
  defaults (`qwen3`: Qwen3-VL's budgets, 16-pixel patches, mean / std 0.5) where the dict gives
  none."""
  if d.get("cap_pixels_per_frame"):
    raise ValueError(f"{where}: cap_pixels_per_frame=True (qwen-vl-utils' per-frame pixel cap) "
                     "is not supported; set it to false, or set data.video_max_pixels")
  size = d.get("size") or {}
  has_lo = any(k in d or k in size for k in ("min_pixels", "shortest_edge"))
  has_hi = any(k in d or k in size for k in ("max_pixels", "longest_edge"))
  d = {k: v for k, v in d.items() if k != "image_processor_type"}
  if qwen3:  # `Qwen3VLVideoProcessor` class defaults for what the dict leaves out
    d = {"patch_size": 16, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, **d}
  if not has_lo:
    d["min_pixels"] = QWEN3_MIN_PIXELS if qwen3 else VIDEO_MIN_PIXELS
  if not has_hi:
    d["max_pixels"] = QWEN3_MAX_PIXELS if qwen3 else VIDEO_MAX_PIXELS
  return QwenImageSpec.from_hf(d, where, **overrides)


def video_spec_from_pretrained(model_dir: str, qwen3: bool = False, **overrides
                               ) -> QwenImageSpec:
  d, where = video_section(model_dir)
  return video_spec_from_hf(d, where, qwen3, **overrides)


def qwen3_smart_resize(num_frames: int, h: int, w: int, temporal: int, factor: int,
                       min_pixels: int, max_pixels: int) -> tuple[int, int]:
  """transformers' Qwen3-VL video `smart_resize`: the budget holds t_bar * h_bar * w_bar
  (t_bar the frame count rounded to a multiple of `temporal`); frames below `factor` are
  scaled up first. ValueError for fewer than `temporal` frames or aspect ratios above 200."""
  if num_frames < temporal:
    raise ValueError(f"{num_frames} frame(s): Qwen3-VL videos need at least {temporal}")
  if h < factor or w < factor:
    scale = max(factor / h, factor / w)
    h, w = int(h * scale), int(w * scale)
  if max(h, w) / min(h, w) > 200:
    raise ValueError(f"a {w}x{h} (WxH) frame has an aspect ratio of {max(h, w) / min(h, w):g}; "
                     "at most 200 is supported")
  hb, wb = round(h / factor) * factor, round(w / factor) * factor
  tb = round(num_frames / temporal) * temporal
  if tb * hb * wb > max_pixels:
    beta = math.sqrt(num_frames * h * w / max_pixels)
    hb = max(factor, math.floor(h / beta / factor) * factor)
    wb = max(factor, math.floor(w / beta / factor) * factor)
  elif tb * hb * wb < min_pixels:
    beta = math.sqrt(min_pixels / (num_frames * h * w))
    hb = math.ceil(h * beta / factor) * factor
    wb = math.ceil(w * beta / factor) * factor
  return hb, wb


def video_grid(num_frames: int, hw: Sequence[int], spec: QwenImageSpec, qwen3: bool = False,
               where: str = "video") -> tuple[int, int, int]:
  """(t, gh, gw) of `num_frames` frames of size (H, W)."""
  t = -(-int(num_frames) // spec.temporal_patch_size)
  if not qwen3:
    return (t, *spec.grid(hw, where))
  try:
    h, w = qwen3_smart_resize(int(num_frames), int(hw[0]), int(hw[1]), spec.temporal_patch_size,
                              spec.factor, spec.min_pixels, spec.max_pixels)
  except ValueError as e:
    raise DataError(f"{where}: {e}", "bad_image") from None
  return t, h // spec.patch_size, w // spec.patch_size


def frame_timestamps(num_frames: int, fps: float, temporal: int = 2) -> list[float]:
  """Qwen3-VL: the time of each frame pair, the mean of its first and last frame's i / fps
  (frame indices padded to a multiple of `temporal` with the last one)."""
  idx = list(range(int(num_frames)))
  idx += [idx[-1]] * (-len(idx) % temporal)
  ts = [i / fps for i in idx]
  return [(ts[i] + ts[i + temporal - 1]) / 2 for i in range(0, len(ts), temporal)]


def video_text(timestamps: Sequence[float], vision_start: str, video_pad: str,
               vision_end: str) -> str:
  """Qwen3-VL: a video's text, `<{t:.1f} seconds>` + vision_start + one pad + vision_end per
  frame pair (each pad then repeated gh * gw / m^2 times)."""
  return "".join(f"<{t:.1f} seconds>{vision_start}{video_pad}{vision_end}" for t in timestamps)


def video_patches(frames: Sequence[Image.Image], spec: QwenImageSpec, where: str = "video",
                  qwen3: bool = False) -> tuple[np.ndarray, tuple[int, int, int]]:
  """Frames -> (uint8 patches (t * gh * gw, T, p, p, 3), grid (t, gh, gw)); steps 1-3 of the
  module docstring (`qwen3`: Qwen3-VL's budget). `DataError` naming `where` for no frames or
  frames of different sizes."""
  if not frames:
    raise DataError(f"{where}: a video without frames", "bad_image")
  sizes = [(f.height, f.width) for f in frames]
  if len(set(sizes)) > 1:
    first = next(i for i, s in enumerate(sizes) if s != sizes[0])
    raise DataError(f"{where}: frame {first} is {sizes[first][1]}x{sizes[first][0]} (WxH) but "
                    f"frame 0 is {sizes[0][1]}x{sizes[0][0]}; a video's frames share one size",
                    "bad_image")
  _, gh, gw = video_grid(len(frames), sizes[0], spec, qwen3, where)
  p, m, tp = spec.patch_size, spec.merge_size, spec.temporal_patch_size
  out = []
  for f in frames:
    f = to_rgb(f)
    if (f.height, f.width) != (gh * p, gw * p):
      f = f.resize((gw * p, gh * p), resample=spec.resample)
    out.append(np.asarray(f, np.uint8))
  out += [out[-1]] * (-len(out) % tp)
  t = len(out) // tp
  x = np.stack(out).reshape(t, tp, gh // m, m, p, gw // m, m, p, 3)
  x = x.transpose(0, 2, 5, 3, 6, 1, 4, 7, 8)
  return np.ascontiguousarray(x.reshape(t * gh * gw, tp, p, p, 3)), (t, gh, gw)


def video_tokens(num_frames: int, hw: Sequence[int], spec: QwenImageSpec,
                 where: str = "video", qwen3: bool = False) -> int:
  """Tokens the LLM sees for `num_frames` frames of size (H, W): t * gh * gw / m^2."""
  t, gh, gw = video_grid(num_frames, hw, spec, qwen3, where)
  return t * gh * gw // spec.merge_unit


def second_per_grid(spec: QwenImageSpec, fps: float | None, where: str = "video") -> float:
  """Seconds one frame pair spans: temporal_patch_size / fps (`DEFAULT_FPS` for None)."""
  fps = DEFAULT_FPS if fps is None else fps
  if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not fps > 0:
    raise DataError(f"{where}: fps {fps!r} must be a positive number", "bad_record")
  return spec.temporal_patch_size / float(fps)


def with_frames(patches: np.ndarray, frames: int) -> np.ndarray:
  """Image patches (N, p, p, 3) as video patches (N, T, p, p, 3), the frame repeated (what an
  image row holds); video patches unchanged."""
  return patches if patches.ndim == 5 else np.repeat(patches[:, None], frames, 1)
