"""Anyres image preprocessing (LLaVA-NeXT / LLaVA-OneVision), equal to transformers' PIL backend.

Mirrors `LlavaNextImageProcessorPil` / `LlavaOnevisionImageProcessorPil` (transformers 5). Per
image, on uint8 pixels with PIL resampling (`resample`, 3 = bicubic):

  anyres (every NeXT image; an OV image alone in its sample):
    1. convert to RGB (transparency composited onto white, `images.to_rgb`);
    2. pick the grid pinpoint (h, w) (`image_processing_utils.select_best_resolution`, the same
       rule as `models.anyres.select_best_resolution`);
    3. resize keeping the aspect ratio (`get_patch_output_size`): the side that limits the
       scale is set to the pinpoint's, the other is `min(ceil(orig * scale), pinpoint side)`;
    4. pad to the pinpoint with zeros (black), centred: top/left `(target - new) // 2`, the
       remainder bottom/right (`_pad_for_patching`);
    5. cut `tile` x `tile` crops row-major (`divide_to_patches`; edge crops are smaller when a
       pinpoint is not a multiple of the tile, as with NeXT's class defaults: 224 on 336s);
    6. the base crop is the *original* image squashed to the base size (`size` height x width,
       or shortest_edge x shortest_edge), prepended: crops = [base] + grid;
  single crop (OV with several images in one sample, `batch_num_images > 1`):
    1. RGB; 2. `pad_to_square` with the colour `int(mean * 255)` (the processor's mean), centred;
  then every crop: resize with `size` (shortest_edge rule or height x width; a no-op at that
  size), centre crop to `crop_size` when `do_center_crop` (NeXT; OV has none), rescale,
  normalize (`images.normalize`, vectorized over the batch).

`do_convert_rgb` is taken as True (LLaVA checkpoints set it; without it RGBA / palette images
would reach the model as such); `do_pad` only pads the batch's crop axis, which the flat layout
below does not need.

Outputs are NHWC (transformers': NCHW and zero-padded to the batch's largest crop count; ours
are the crops of all images laid one after another, with the count per image).
`AnyresImageSpec.from_pretrained(model_dir)` reads `preprocessor_config.json`, or the
`image_processor` section of `processor_config.json` (where transformers 5 `save_pretrained`
writes it).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image

from mllm_tune.data.errors import DataError
from mllm_tune.data.images import (CLIP_MEAN, CLIP_STD, ImageSpec, center_crop, normalize,
                                   pad_to_square, resize_hw, to_rgb)
from mllm_tune.models import anyres as geom

# The processor classes' defaults (transformers 5, `LlavaNextImageProcessorPil` and
# `LlavaOnevisionImageProcessorPil`): used for keys a config leaves out.
NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
ONEVISION_PINPOINTS = tuple((384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7))
CLASS_DEFAULTS = {
    "llava_next": {
        "size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224},
        "do_center_crop": True, "image_grid_pinpoints": NEXT_PINPOINTS},
    "llava_onevision": {
        "size": {"height": 384, "width": 384}, "crop_size": None, "do_center_crop": False,
        "image_grid_pinpoints": ONEVISION_PINPOINTS},
}
COMMON_DEFAULTS = {"resample": 3, "do_resize": True, "do_rescale": True,
                   "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN),
                   "image_std": list(CLIP_STD)}
PROCESSOR_TYPES = {"LlavaNextImageProcessor": "llava_next",
                   "LlavaOnevisionImageProcessor": "llava_onevision"}


def family_of(processor_type: str) -> str | None:
  """`LlavaNextImageProcessor[Pil|Fast]` -> "llava_next", ...; None when not an anyres class."""
  for prefix, family in PROCESSOR_TYPES.items():
    if processor_type.startswith(prefix):
      return family
  return None


@dataclasses.dataclass(frozen=True)
class AnyresImageSpec:
  """An anyres image processor's settings.

  family: "llava_next" | "llava_onevision"; crop: the per-crop part (resize with `size`,
  centre crop, rescale, normalize; `aspect` is always "resize"); tile: the side of the grid
  crops (transformers' `crop_size.height`, else `size.height`, else `size.shortest_edge`);
  base_hw: the (H, W) the whole image is squashed to for the base crop; grid_pinpoints: the
  (h, w) grid resolutions. For token counts (`image_tokens`, `max_image_tokens`): feature_side,
  the vision features per crop side (crop side // vision patch size), and OneVision's
  vision_aspect_ratio ("anyres_max_<N>"). max_image_tokens: images above it raise `DataError`.
  """
  family: str
  crop: ImageSpec
  tile: int
  base_hw: tuple[int, int]
  grid_pinpoints: tuple[tuple[int, int], ...]
  feature_side: int | None = None
  vision_aspect_ratio: str = "anyres_max_9"
  max_image_tokens: int | None = None

  def __post_init__(self):
    if self.family not in geom.ANYRES_FAMILIES:
      raise ValueError(f"family={self.family!r}: choose one of {geom.ANYRES_FAMILIES}")
    if self.crop.aspect != "resize":
      raise ValueError("AnyresImageSpec.crop.aspect must be 'resize' (anyres pads by its own "
                       "rules)")
    if not self.grid_pinpoints:
      raise ValueError("AnyresImageSpec.grid_pinpoints is empty")
    if self.family == "llava_onevision":
      geom.max_crops_from_aspect(self.vision_aspect_ratio)  # validates the string
    if self.max_image_tokens is not None and self.feature_side is None:
      raise ValueError("max_image_tokens needs feature_side (vision features per crop side) "
                       "to count image tokens")

  @property
  def max_crops(self) -> int:
    """The most crops one image can yield: the base crop and the largest grid."""
    return 1 + max(-(-ph // self.tile) * -(-pw // self.tile) for ph, pw in self.grid_pinpoints)

  @property
  def crop_hw(self) -> tuple[int, int]:
    """(H, W) of every output crop: `crop_size` with centre crop, else `size` (crops are square
    before the resize, so shortest_edge gives se x se), else the tile."""
    c = self.crop
    if c.do_center_crop:
      return (c.crop_height, c.crop_width)
    if c.do_resize:
      return (c.height, c.width) if c.shortest_edge is None else (c.shortest_edge,) * 2
    return (self.tile, self.tile)

  @classmethod
  def from_hf(cls, d: dict, where: str = "preprocessor_config.json", family: str | None = None,
              feature_side: int | None = None, vision_aspect_ratio: str | None = None,
              max_image_tokens: int | None = None) -> AnyresImageSpec:
    """Parse a `LlavaNextImageProcessor` / `LlavaOnevisionImageProcessor` dict (missing or null
    keys take the class defaults); `family` is read from `image_processor_type` unless given.
    Errors name `where` and the field."""
    if not isinstance(d, dict):
      raise ValueError(f"{where}: the image processor config must be an object")
    kind = d.get("image_processor_type")
    if family is None:
      family = family_of(str(kind)) if kind is not None else None
      if family is None:
        raise ValueError(f"{where}: image_processor_type {kind!r} is not an anyres image "
                         f"processor (expected one of {sorted(PROCESSOR_TYPES)})")
    if family not in CLASS_DEFAULTS:
      raise ValueError(f"{where}: family {family!r}: expected one of {sorted(CLASS_DEFAULTS)}")
    d = {**COMMON_DEFAULTS, **CLASS_DEFAULTS[family],
         **{k: v for k, v in d.items() if v is not None}}
    size, crop_size = d["size"], d["crop_size"]
    if isinstance(size, int):
      size = {"shortest_edge": size}
    if isinstance(crop_size, int):
      crop_size = {"height": crop_size, "width": crop_size}
    if not isinstance(size, dict) or not (size.get("shortest_edge")
                                          or (size.get("height") and size.get("width"))):
      raise ValueError(f"{where}: size {size!r} needs 'shortest_edge' or 'height' and 'width'")
    if crop_size is not None and not (isinstance(crop_size, dict) and crop_size.get("height")
                                      and crop_size.get("width")):
      raise ValueError(f"{where}: crop_size {crop_size!r} needs 'height' and 'width'")
    # transformers' `_preprocess`: base size and grid tile
    if size.get("height") and size.get("width"):
      base_hw = (int(size["height"]), int(size["width"]))
    else:
      base_hw = (int(size["shortest_edge"]),) * 2
    tile = int(crop_size["height"] if crop_size else size.get("height") or size["shortest_edge"])
    hf = {**d, "size": size, "image_processor_type": "LlavaImageProcessor"}  # all keys given
    if crop_size is None:
      hf.pop("crop_size")
    crop = ImageSpec.from_hf(hf, where, aspect="resize")
    pinpoints = d["image_grid_pinpoints"]
    try:
      pinpoints = tuple((int(h), int(w)) for h, w in pinpoints)
    except (TypeError, ValueError):
      raise ValueError(f"{where}: image_grid_pinpoints must be a list of [height, width] pairs, "
                       f"got {pinpoints!r}") from None
    try:
      return cls(family, crop, tile, base_hw, pinpoints, feature_side,
                 vision_aspect_ratio or "anyres_max_9", max_image_tokens)
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None

  @classmethod
  def from_pretrained(cls, model_dir: str, max_image_tokens: int | None = None,
                      feature_side: int | None = None,
                      vision_aspect_ratio: str | None = None) -> AnyresImageSpec:
    """The spec of a model directory: the image processor from `preprocessor_config.json`, else
    from `processor_config.json`'s `image_processor` section (transformers 5 layout). The
    processor keys of `processor_config.json`, when present, give the token-count settings
    unless passed: NeXT `patch_size` (feature_side = crop side // patch_size), OneVision
    `num_image_tokens` (feature_side = its square root) and `vision_aspect_ratio`."""
    pre = os.path.join(model_dir, "preprocessor_config.json")
    proc = os.path.join(model_dir, "processor_config.json")
    proc_d = read_json(proc) if os.path.exists(proc) else None
    if os.path.exists(pre):
      d, where = read_json(pre), pre
    elif proc_d is not None:
      d, where = proc_d.get("image_processor"), f"{proc}: image_processor"
      if not isinstance(d, dict):
        raise ValueError(f"{proc}: no 'image_processor' section (and no "
                         "preprocessor_config.json in the directory)")
    else:
      raise FileNotFoundError(f"{model_dir}: neither preprocessor_config.json nor "
                              "processor_config.json (no image processor config)")
    spec = cls.from_hf(d, where, vision_aspect_ratio=vision_aspect_ratio)
    proc_d = proc_d or {}
    if vision_aspect_ratio is None and proc_d.get("vision_aspect_ratio"):
      vision_aspect_ratio = str(proc_d["vision_aspect_ratio"])
    if feature_side is None:
      feature_side = _feature_side(proc_d, spec, proc)
    try:
      return dataclasses.replace(spec, feature_side=feature_side,
                                 vision_aspect_ratio=vision_aspect_ratio or "anyres_max_9",
                                 max_image_tokens=max_image_tokens)
    except ValueError as e:  # the token-count keys came from processor_config.json
      raise ValueError(f"{proc if proc_d else model_dir}: {e}") from None

  def num_crops(self, hw: Sequence[int], anyres: bool = True) -> int:
    """Crops an (H, W) image yields (`models.anyres.num_crops`)."""
    return geom.num_crops(hw, self.grid_pinpoints, self.tile, anyres)

  def image_tokens(self, hw: Sequence[int], anyres: bool = True) -> int:
    """Image tokens the LLM sees for an (H, W) image: `len(models.anyres.pack_table(...))`."""
    if self.feature_side is None:
      raise ValueError("AnyresImageSpec.feature_side is not set: cannot count image tokens")
    for ph, pw in self.grid_pinpoints:
      # the grid then has ragged edge crops (resized like the others), and transformers'
      # processor (floor) and model (ceil) disagree on the count
      if ph % self.tile or pw % self.tile:
        raise ValueError(f"grid pinpoint {ph}x{pw} is not a multiple of the crop tile "
                         f"{self.tile}: image tokens are ill-defined")
    return len(geom.pack_table(hw, self.num_crops(hw, anyres), self.feature_side,
                               self.grid_pinpoints, self.tile, self.family,
                               self.vision_aspect_ratio))


def read_json(path: str) -> dict:
  """A JSON object from `path`; malformed JSON or another type raises naming the file (and line
  and column)."""
  try:
    with open(path) as f:
      d = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
  if not isinstance(d, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
  return d


def _feature_side(proc_d: dict, spec: AnyresImageSpec, where: str) -> int | None:
  """Vision features per crop side from the processor keys (None when they are absent)."""
  if spec.family == "llava_onevision" and proc_d.get("num_image_tokens") is not None:
    n = int(proc_d["num_image_tokens"])
    side = math.isqrt(n)
    if side * side != n:
      raise ValueError(f"{where}: num_image_tokens={n} is not a square (features per crop)")
    return side
  if proc_d.get("patch_size") is not None:
    return spec.crop_hw[0] // int(proc_d["patch_size"])
  return None


def anyres_flags(family: str, images_per_sample: Sequence[int]) -> list[bool]:
  """Per image, in order: does it get the anyres grid? NeXT: always; OneVision: only an image
  alone in its sample (transformers: `batch_num_images[i] == 1`)."""
  if family == "llava_next":
    return [True] * sum(int(n) for n in images_per_sample)
  return [int(n) == 1 for n in images_per_sample for _ in range(int(n))]


def patch_output_hw(hw: Sequence[int], target_hw: Sequence[int]) -> tuple[int, int]:
  """transformers' `get_patch_output_size`: aspect-preserving (H, W) inside a pinpoint."""
  h0, w0 = int(hw[0]), int(hw[1])
  th, tw = int(target_hw[0]), int(target_hw[1])
  scale_w, scale_h = tw / w0, th / h0
  if scale_w < scale_h:
    return min(math.ceil(h0 * scale_w), th), tw
  return th, min(math.ceil(w0 * scale_h), tw)


def _finish_crop(px_HWC: np.ndarray, spec: AnyresImageSpec) -> np.ndarray:
  """Per-crop resize (with `size`) and centre crop, as the processors' crop loop."""
  c = spec.crop
  if c.do_resize:
    h, w = resize_hw(px_HWC.shape[0], px_HWC.shape[1], c)
    if (h, w) != px_HWC.shape[:2]:
      px_HWC = np.asarray(Image.fromarray(px_HWC).resize((w, h), resample=c.resample))
  if c.do_center_crop:
    px_HWC = center_crop(px_HWC, c.crop_height, c.crop_width)
  if px_HWC.shape[:2] != spec.crop_hw:
    raise ValueError(f"a crop came out {px_HWC.shape[0]}x{px_HWC.shape[1]}, not "
                     f"{spec.crop_hw[0]}x{spec.crop_hw[1]}: the spec's size / crop_size do "
                     "not give square crops")
  return px_HWC


def grid_crops(img: Image.Image, spec: AnyresImageSpec) -> list[np.ndarray]:
  """Steps 2-5 of the anyres path for an RGB image: the grid crops, uint8 (tile, tile, 3)."""
  ph, pw = geom.select_best_resolution((img.height, img.width), spec.grid_pinpoints)
  nh, nw = patch_output_hw((img.height, img.width), (ph, pw))
  resized = np.asarray(img.resize((nw, nh), resample=spec.crop.resample))
  canvas = np.zeros((ph, pw, 3), np.uint8)
  top, left = (ph - nh) // 2, (pw - nw) // 2
  canvas[top:top + nh, left:left + nw] = resized
  t = spec.tile
  return [canvas[y:y + t, x:x + t] for y in range(0, ph, t) for x in range(0, pw, t)]


def check_image_tokens(hw: Sequence[int], spec: AnyresImageSpec, anyres: bool = True,
                       max_image_tokens: int | None = None, where: str = "image") -> None:
  """`DataError` ("too_many_image_tokens") naming `where` when an (H, W) image yields more
  image tokens than `max_image_tokens` (default `spec.max_image_tokens`; None: no limit)."""
  limit = spec.max_image_tokens if max_image_tokens is None else max_image_tokens
  if limit is None:
    return
  n = spec.image_tokens(hw, anyres)
  if n > limit:
    raise DataError(f"{where}: a {hw[1]}x{hw[0]} (WxH) image yields {n} image tokens "
                    f"({spec.num_crops(hw, anyres)} crops), more than max_image_tokens={limit}",
                    "too_many_image_tokens")


def anyres_crops(img: Image.Image, spec: AnyresImageSpec, anyres: bool = True,
                 where: str = "image", max_image_tokens: int | None = None) -> np.ndarray:
  """One PIL image -> uint8 (n_crops, H, W, 3): [base] + grid row-major (anyres), or the single
  padded-square crop (`anyres=False`, OneVision multi-image); see the module docstring.
  Raises `DataError` naming `where` above `max_image_tokens` (default: the spec's)."""
  use_grid = bool(anyres)
  if not use_grid and spec.family == "llava_next":
    raise ValueError("LLaVA-NeXT has no single-crop mode: every image is anyres")
  hw = (img.height, img.width)
  check_image_tokens(hw, spec, use_grid, max_image_tokens, where)
  img = to_rgb(img)
  if use_grid:
    bh, bw = spec.base_hw
    base = np.asarray(img.resize((bw, bh), resample=spec.crop.resample))
    crops = [base] + grid_crops(img, spec)
  else:
    crops = [np.asarray(pad_to_square(img, spec.crop.mean))]
  out = np.stack([_finish_crop(np.ascontiguousarray(c), spec) for c in crops])
  expected = spec.num_crops(hw, use_grid)
  if out.shape[0] != expected:  # the geometry and models.anyres must agree
    raise AssertionError(f"{where}: {out.shape[0]} crops, models.anyres expects {expected}")
  return out


class AnyresPixels(NamedTuple):
  """pixel_values float32 (sum crops, H, W, 3); crops: per image; image_sizes (N, 2) int32
  original (H, W)."""
  pixel_values: np.ndarray
  crops: list[int]
  image_sizes: np.ndarray


def preprocess_anyres(images: Sequence[Image.Image], spec: AnyresImageSpec,
                      anyres_flags: Sequence[bool] | None = None, *,
                      max_image_tokens: int | None = None, where: str = "sample",
                      names: Sequence[str] | None = None) -> AnyresPixels:
  """PIL images -> (pixel_values, crops per image, image_sizes), as the transformers processor
  (whose pixel_values are (N, max crops, 3, H, W), zero-padded). `anyres_flags` (default all
  True; see `anyres_flags(...)`) picks the grid or the single crop per image. An image over
  `max_image_tokens` (default the spec's) raises `DataError` naming `where` and the image
  (`names[i]`, default its index)."""
  flags = [True] * len(images) if anyres_flags is None else [bool(f) for f in anyres_flags]
  if len(flags) != len(images):
    raise ValueError(f"{where}: {len(flags)} anyres flags for {len(images)} images")
  if names is not None and len(names) != len(images):
    raise ValueError(f"{where}: {len(names)} names for {len(images)} images")
  per_image, sizes = [], []
  for i, (img, flag) in enumerate(zip(images, flags)):
    name = f"image {i}" if names is None else f"image {i} ({names[i]})"
    per_image.append(anyres_crops(img, spec, flag, f"{where}: {name}", max_image_tokens))
    sizes.append((img.height, img.width))
  h, w = spec.crop_hw
  px = np.concatenate(per_image) if per_image else np.zeros((0, h, w, 3), np.uint8)
  return AnyresPixels(normalize(px, spec.crop), [len(p) for p in per_image],
                      np.asarray(sizes, np.int32).reshape(-1, 2))
