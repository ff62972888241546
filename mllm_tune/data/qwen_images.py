"""Qwen2-VL / Qwen2.5-VL image preprocessing, equal to transformers' PIL backend.

Mirrors `Qwen2VLImageProcessorPil` (transformers 5; Qwen2.5-VL checkpoints use the same class).
Per image:
  1. convert to RGB (transparency composited onto white, `images.to_rgb`);
  2. `smart_resize(h, w, factor = patch_size * merge_size, min_pixels, max_pixels)`: an aspect
     ratio above 200 is refused; each side is rounded to a multiple of `factor`; when the area
     is then above `max_pixels` the sides shrink by `beta = sqrt(h * w / max_pixels)` and are
     floored to multiples of `factor` (at least `factor`); when below `min_pixels` they grow by
     `beta = sqrt(min_pixels / (h * w))` and are ceiled to multiples of `factor`;
  3. one PIL resize (`resample`, 3 = bicubic) on the uint8 image;
  4. rescale (float64 multiply, cast to float32) and normalize in float32 (`images.normalize`);
  5. patchify: the (C, H, W) image viewed as (C, gh/m, m, p, gw/m, m, p) and ordered
     (gh/m, gw/m, m, m, C, p, p) -- merge blocks in raster order, raster inside a block -- with
     the frame repeated `temporal_patch_size` times: rows of C * T * p * p; grid (1, gh, gw).
The processor's `pixel_values` are every image's rows one after another, `image_grid_thw` the
grids; the LLM sees gh * gw / m^2 tokens per image.

Our samples keep the resized image as uint8 patches (n_patches, p, p, 3) in that row order
(`to_patches`), 8x smaller than the float rows; `patch_rows` makes the rows per batch.

`QwenImageSpec.from_pretrained(model_dir)` reads `preprocessor_config.json`, or the
`image_processor` section of transformers 5's `processor_config.json`. `min_pixels` /
`max_pixels` come from `size` (`shortest_edge` / `longest_edge`) or the legacy top-level keys
(which win, as in the class's `__init__`), and may be overridden (`data.min_pixels`,
`data.max_pixels`). `out_of_budget="refuse"` turns images outside [min_pixels, max_pixels]
into `DataError`s instead of resizing them; `max_image_tokens` refuses larger images.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image

from mllm_tune.data.errors import DataError
from mllm_tune.data.images import (CLIP_MEAN, CLIP_STD, image_processor_config, normalize,
                                   to_rgb)

# `Qwen2VLImageProcessorPil` class defaults (transformers 5)
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
MAX_ASPECT = 200
OUT_OF_BUDGET = ("resize", "refuse")
PROCESSOR_TYPE = "Qwen2VLImageProcessor"  # also ...Pil / ...Fast


@dataclasses.dataclass(frozen=True)
class QwenImageSpec:
  """A Qwen2-VL image processor's settings (attribute names shared with `images.ImageSpec`, so
  `images.normalize` applies). out_of_budget: "resize" (transformers) or "refuse" (images whose
  area is outside [min_pixels, max_pixels] raise `DataError`); max_image_tokens: images above
  it raise `DataError` (None: no limit)."""
  patch_size: int = 14
  temporal_patch_size: int = 2
  merge_size: int = 2
  min_pixels: int = DEFAULT_MIN_PIXELS
  max_pixels: int = DEFAULT_MAX_PIXELS
  do_resize: bool = True
  resample: int = 3
  do_rescale: bool = True
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  mean: tuple[float, float, float] = CLIP_MEAN
  std: tuple[float, float, float] = CLIP_STD
  out_of_budget: str = "resize"
  max_image_tokens: int | None = None

  def __post_init__(self):
    for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"QwenImageSpec.{name} must be >= 1, got {getattr(self, name)}")
    if self.min_pixels > self.max_pixels:
      raise ValueError(f"min_pixels {self.min_pixels} > max_pixels {self.max_pixels}")
    if self.out_of_budget not in OUT_OF_BUDGET:
      raise ValueError(f"out_of_budget={self.out_of_budget!r}: choose one of {OUT_OF_BUDGET}")

  @property
  def factor(self) -> int:
    """Pixels per merged token side: patch_size * merge_size."""
    return self.patch_size * self.merge_size

  @property
  def patch_dim(self) -> int:
    """Width of a patch row: C * T * p * p (3 channels)."""
    return 3 * self.temporal_patch_size * self.patch_size ** 2

  @property
  def merge_unit(self) -> int:
    return self.merge_size ** 2

  @classmethod
  def from_hf(cls, d: dict, where: str = "preprocessor_config.json",
              **overrides) -> QwenImageSpec:
    """Parse a `Qwen2VLImageProcessor` dict (missing keys: the class defaults); `overrides`
    replace fields (None values are ignored). Errors name `where` and the field."""
    if not isinstance(d, dict):
      raise ValueError(f"{where}: the image processor config must be an object")
    kind = d.get("image_processor_type")
    if kind is not None and not str(kind).startswith(PROCESSOR_TYPE):
      raise ValueError(f"{where}: image_processor_type {kind!r} is not a Qwen2-VL image "
                       f"processor ({PROCESSOR_TYPE}[Pil|Fast])")
    size = d.get("size") or {}
    if not isinstance(size, dict):
      raise ValueError(f"{where}: size {size!r} must be an object with 'shortest_edge' and "
                       "'longest_edge' (pixel counts)")
    lo = d.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels")
    hi = d.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels")
    if not size and lo is None:
      lo = DEFAULT_MIN_PIXELS
    if not size and hi is None:
      hi = DEFAULT_MAX_PIXELS
    if lo is None or hi is None:
      raise ValueError(f"{where}: size {size!r} needs 'shortest_edge' and 'longest_edge' "
                       "(min / max pixels), or min_pixels and max_pixels")

    def triple(key, default):
      v = d.get(key)
      v = default if v is None else v
      v = [v] * 3 if isinstance(v, (int, float)) else list(v)
      if len(v) != 3:
        raise ValueError(f"{where}: '{key}' must have 3 values (RGB), got {v}")
      return tuple(float(x) for x in v)

    get = lambda k, default: default if d.get(k) is None else d[k]
    fields = dict(
        patch_size=int(get("patch_size", 14)),
        temporal_patch_size=int(get("temporal_patch_size", 2)),
        merge_size=int(get("merge_size", 2)), min_pixels=int(lo), max_pixels=int(hi),
        do_resize=bool(get("do_resize", True)), resample=int(get("resample", 3)),
        do_rescale=bool(get("do_rescale", True)),
        rescale_factor=float(get("rescale_factor", 1 / 255)),
        do_normalize=bool(get("do_normalize", True)), mean=triple("image_mean", CLIP_MEAN),
        std=triple("image_std", CLIP_STD))
    fields.update({k: v for k, v in overrides.items() if v is not None})
    try:
      return cls(**fields)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{where}: {e}") from None

  @classmethod
  def from_pretrained(cls, model_dir: str, **overrides) -> QwenImageSpec:
    """The spec of a model directory (`processor_section`); `overrides` as in `from_hf`
    (e.g. min_pixels, max_pixels, out_of_budget, max_image_tokens)."""
    d, where = processor_section(model_dir)
    return cls.from_hf(d, where, **overrides)

  def grid(self, hw: Sequence[int], where: str = "image") -> tuple[int, int]:
    """(gh, gw) patches of an (H, W) image after `smart_resize` (or as it is without resize);
    `DataError` naming `where` for images the spec refuses (aspect ratio, budget, a side the
    merge blocks do not divide, max_image_tokens)."""
    h, w = int(hw[0]), int(hw[1])
    if min(h, w) < 1:
      raise DataError(f"{where}: an image of {w}x{h} (WxH) pixels", "bad_image")
    area = h * w
    if self.out_of_budget == "refuse" and not self.min_pixels <= area <= self.max_pixels:
      raise DataError(f"{where}: a {w}x{h} (WxH) image has {area} pixels, outside the budget "
                      f"[min_pixels={self.min_pixels}, max_pixels={self.max_pixels}] "
                      "(out_of_budget='refuse')", "image_budget")
    if self.do_resize:
      try:
        h, w = smart_resize(h, w, self.factor, self.min_pixels, self.max_pixels)
      except ValueError as e:
        raise DataError(f"{where}: {e}", "bad_image") from None
    elif h % self.factor or w % self.factor:
      raise DataError(f"{where}: a {w}x{h} (WxH) image (do_resize=False) is not a multiple of "
                      f"patch_size * merge_size = {self.factor} on both sides: its patch grid "
                      f"{h // self.patch_size}x{w // self.patch_size} is not made of whole "
                      f"{self.merge_size}x{self.merge_size} merge blocks", "bad_image")
    gh, gw = h // self.patch_size, w // self.patch_size
    tokens = gh * gw // self.merge_unit
    if self.max_image_tokens is not None and tokens > self.max_image_tokens:
      raise DataError(f"{where}: a {hw[1]}x{hw[0]} (WxH) image yields {tokens} image tokens "
                      f"(grid {gh}x{gw} patches), more than max_image_tokens="
                      f"{self.max_image_tokens}", "too_many_image_tokens")
    return gh, gw

  def image_tokens(self, hw: Sequence[int], where: str = "image") -> int:
    """Tokens the LLM sees for an (H, W) image: gh * gw / m^2."""
    gh, gw = self.grid(hw, where)
    return gh * gw // self.merge_unit


def processor_section(model_dir: str) -> tuple[dict, str]:
  """(image processor dict, where it was read): `preprocessor_config.json`, else the
  `image_processor` section of transformers 5's `processor_config.json`
  (`images.image_processor_config`)."""
  d, where, _ = image_processor_config(model_dir)
  return d, where


def smart_resize(h: int, w: int, factor: int, min_pixels: int, max_pixels: int
                 ) -> tuple[int, int]:
  """transformers' `smart_resize` (step 2 of the module docstring) -> (H, W); ValueError for
  aspect ratios above 200."""
  if max(h, w) / min(h, w) > MAX_ASPECT:
    raise ValueError(f"a {w}x{h} (WxH) image has an aspect ratio of {max(h, w) / min(h, w):g}; "
                     f"at most {MAX_ASPECT} is supported")
  hb, wb = round(h / factor) * factor, round(w / factor) * factor
  if hb * wb > max_pixels:
    beta = math.sqrt(h * w / max_pixels)
    hb = max(factor, math.floor(h / beta / factor) * factor)
    wb = max(factor, math.floor(w / beta / factor) * factor)
  elif hb * wb < min_pixels:
    beta = math.sqrt(min_pixels / (h * w))
    hb = math.ceil(h * beta / factor) * factor
    wb = math.ceil(w * beta / factor) * factor
  return hb, wb


def to_patches(img: Image.Image, spec: QwenImageSpec, where: str = "image"
               ) -> tuple[np.ndarray, tuple[int, int, int]]:
  """One PIL image -> (uint8 patches (gh * gw, p, p, 3) in merge-block-major order, grid
  (1, gh, gw)); steps 1-3 and the order of step 5."""
  gh, gw = spec.grid((img.height, img.width), where)
  p, m = spec.patch_size, spec.merge_size
  img = to_rgb(img)
  if (img.height, img.width) != (gh * p, gw * p):
    img = img.resize((gw * p, gh * p), resample=spec.resample)
  px = np.asarray(img, np.uint8)
  blocks = px.reshape(gh // m, m, p, gw // m, m, p, 3).transpose(0, 3, 1, 4, 2, 5, 6)
  return np.ascontiguousarray(blocks.reshape(gh * gw, p, p, 3)), (1, gh, gw)


def patch_rows(patches: np.ndarray, spec: QwenImageSpec) -> np.ndarray:
  """uint8 patches (N, p, p, 3) -> float32 rows (N, C * T * p * p): rescale + normalize, then
  each patch as (C, p, p) repeated over the T frames (steps 4-5). Video patches (N, T, p, p,
  3) (`qwen_videos.video_patches`) keep their T frames: rows (C, T, p, p)."""
  px = np.asarray(patches)
  if px.ndim == 5:
    x = normalize(px, spec).transpose(0, 4, 1, 2, 3)  # (N, C, T, p, p)
    return np.ascontiguousarray(x.reshape(x.shape[0], spec.patch_dim), dtype=np.float32)
  x = normalize(px, spec).transpose(0, 3, 1, 2)  # (N, C, p, p)
  n, c, p, _ = x.shape
  x = np.broadcast_to(x[:, :, None], (n, c, spec.temporal_patch_size, p, p))
  return np.ascontiguousarray(x.reshape(n, spec.patch_dim), dtype=np.float32)


class QwenPixels(NamedTuple):
  """pixel_values float32 (sum of patches, C * T * p * p); image_grid_thw (N, 3) int64."""
  pixel_values: np.ndarray
  image_grid_thw: np.ndarray


def preprocess_qwen(images: Sequence[Image.Image], spec: QwenImageSpec, where: str = "sample",
                    names: Sequence[str] | None = None) -> QwenPixels:
  """PIL images -> (pixel_values, image_grid_thw), as the transformers processor. Errors name
  `where` and the image (`names[i]`, default its index)."""
  if names is not None and len(names) != len(images):
    raise ValueError(f"{where}: {len(names)} names for {len(images)} images")
  patches, grids = [], []
  for i, img in enumerate(images):
    name = f"image {i}" if names is None else f"image {i} ({names[i]})"
    px, grid = to_patches(img, spec, f"{where}: {name}")
    patches.append(px)
    grids.append(grid)
  p = spec.patch_size
  px = np.concatenate(patches) if patches else np.zeros((0, p, p, 3), np.uint8)
  return QwenPixels(patch_rows(px, spec), np.asarray(grids, np.int64).reshape(-1, 3))
