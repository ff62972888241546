"""Image preprocessing identical to transformers' CLIP / SigLIP / LLaVA image processors, PIL only.

Per image (geometry, PIL, uint8): convert to RGB (transparency composited onto white) -> optional
LLaVA `pad` aspect mode (pad to a square with the mean colour `int(mean * 255)`, image centred,
LLaVA's `expand2square`) -> resize (`shortest_edge`: short side to that size, long side
`int(size * long / short)`; or `height`/`width`) with the PIL filter `resample` -> centre crop
(zero padding when the image is smaller, as transformers does).
Per batch (vectorized numpy): rescale (float64 multiply, cast to float32) -> normalize
`(x - mean) / std` in float32. Output pixel values are NHWC float32 (transformers' are NCHW).

`ImageSpec.from_pretrained(model_dir)` reads the image processor from every layout transformers
writes (`image_processor_config`): `preprocessor_config.json` (transformers 4) or the
`image_processor` section of `processor_config.json` (transformers 5 `save_pretrained`).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from mllm_tune.data.errors import DataError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ASPECT_MODES = ("resize", "pad")


@dataclasses.dataclass(frozen=True)
class ImageSpec:
  """What transformers' `preprocessor_config.json` says, plus LLaVA's aspect mode.

  Resize target: `shortest_edge` (CLIP) or `height` x `width` (SigLIP); crop: `crop_height` x
  `crop_width` when `do_center_crop`. `resample` is a PIL filter id (3 = BICUBIC).
  """
  shortest_edge: int | None = 224
  height: int | None = None
  width: int | None = None
  do_resize: bool = True
  resample: int = 3
  do_center_crop: bool = True
  crop_height: int = 224
  crop_width: int = 224
  do_rescale: bool = True
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  mean: tuple[float, float, float] = CLIP_MEAN
  std: tuple[float, float, float] = CLIP_STD
  aspect: str = "resize"  # resize | pad (LLaVA `image_aspect_ratio: pad`)

  def __post_init__(self):
    if self.aspect not in ASPECT_MODES:
      raise ValueError(f"aspect={self.aspect!r}: choose one of {ASPECT_MODES}")
    if self.do_resize and self.shortest_edge is None and not (self.height and self.width):
      raise ValueError("ImageSpec needs shortest_edge or height and width to resize")

  @classmethod
  def clip(cls, size: int = 336, aspect: str = "resize") -> ImageSpec:
    return cls(shortest_edge=size, crop_height=size, crop_width=size, aspect=aspect)

  @classmethod
  def siglip(cls, size: int = 384, aspect: str = "resize") -> ImageSpec:
    return cls(shortest_edge=None, height=size, width=size, do_center_crop=False,
               mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), aspect=aspect)

  @classmethod
  def from_hf(cls, d: dict, where: str = "preprocessor_config.json",
              aspect: str | None = None) -> ImageSpec:
    """Parse a transformers image-processor dict; `do_pad` (LlavaImageProcessor) means `pad`.

    Missing keys take the defaults of the processor class named by `image_processor_type`.
    """
    kind = str(d.get("image_processor_type", "CLIPImageProcessor"))
    if kind.startswith("Siglip"):
      d = {"size": {"height": 224, "width": 224}, "do_center_crop": False,
           "image_mean": [0.5] * 3, "image_std": [0.5] * 3, **d}
    elif kind.startswith(("CLIP", "Llava")):
      d = {"size": {"shortest_edge": 224}, "do_center_crop": True, **d}
    else:
      raise ValueError(f"{where}: image_processor_type {kind!r} is not supported (CLIP, "
                       "Siglip or Llava image processors)")
    size = d["size"]
    if isinstance(size, int):
      size = {"shortest_edge": size}
    if "longest_edge" in size or "max_height" in size:
      raise ValueError(f"{where}: size {size} (longest_edge / max_height) is not supported")
    crop = d.get("crop_size", {"height": 224, "width": 224})
    if isinstance(crop, int):
      crop = {"height": crop, "width": crop}

    def triple(key: str, default):
      v = d.get(key, default)
      v = [v] * 3 if isinstance(v, (int, float)) else list(v)
      if len(v) != 3:
        raise ValueError(f"{where}: '{key}' must have 3 values (RGB), got {v}")
      return tuple(float(x) for x in v)

    return cls(
        shortest_edge=size.get("shortest_edge"), height=size.get("height"),
        width=size.get("width"), do_resize=bool(d.get("do_resize", True)),
        resample=int(d.get("resample", 3)), do_center_crop=bool(d.get("do_center_crop", False)),
        crop_height=int(crop["height"]), crop_width=int(crop["width"]),
        do_rescale=bool(d.get("do_rescale", True)),
        rescale_factor=float(d.get("rescale_factor", 1 / 255)),
        do_normalize=bool(d.get("do_normalize", True)), mean=triple("image_mean", CLIP_MEAN),
        std=triple("image_std", CLIP_STD),
        aspect=aspect or ("pad" if d.get("do_pad") else "resize"))

  @classmethod
  def from_pretrained(cls, model_dir: str, aspect: str | None = None) -> ImageSpec:
    """The image processor of a model directory (`image_processor_config`: either layout)."""
    d, where, _ = image_processor_config(model_dir)
    return cls.from_hf(d, where, aspect)

  @property
  def output_hw(self) -> tuple[int, int]:
    """(H, W) of every processed image (needs a crop or a fixed height/width)."""
    if self.do_center_crop:
      return (self.crop_height, self.crop_width)
    if self.do_resize and self.height and self.width:
      return (self.height, self.width)
    raise ValueError("images have no fixed size: enable do_center_crop or give height/width")


PREPROCESSOR_FILE = "preprocessor_config.json"  # transformers 4: the image processor alone
PROCESSOR_FILE = "processor_config.json"  # processor keys; transformers 5: + "image_processor"


def read_json(path: str) -> dict:
  """A JSON object from `path`; malformed JSON names the line and column."""
  try:
    with open(path) as f:
      d = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
  if not isinstance(d, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
  return d


def image_processor_config(model_dir: str) -> tuple[dict, str, dict | None]:
  """(image processor dict, where it was read, `processor_config.json` dict or None) of a
  model directory, in either layout transformers writes: `preprocessor_config.json`
  (transformers 4, and `ImageProcessor.save_pretrained`), else the `image_processor` section of
  `processor_config.json` (transformers 5 `Processor.save_pretrained`, which writes no
  preprocessor_config.json). Errors name the directory and the files looked for."""
  pre = os.path.join(model_dir, PREPROCESSOR_FILE)
  proc = os.path.join(model_dir, PROCESSOR_FILE)
  proc_d = read_json(proc) if os.path.isfile(proc) else None
  if os.path.isfile(pre):
    return read_json(pre), pre, proc_d
  if proc_d is not None:
    d = proc_d.get("image_processor")
    if not isinstance(d, dict):
      raise ValueError(f"{proc}: no 'image_processor' section (and no {PREPROCESSOR_FILE} in "
                       "the directory): the model directory has no image processor config")
    return d, f"{proc}: image_processor", proc_d
  raise FileNotFoundError(f"{model_dir}: no image processor config: neither "
                          f"{PREPROCESSOR_FILE} (transformers 4) nor {PROCESSOR_FILE} with an "
                          "'image_processor' section (transformers 5)")


def decode_image(data: bytes, where: str = "image") -> Image.Image:
  """Encoded bytes (JPEG, PNG, ...) -> a fully loaded PIL image; `DataError` if corrupt."""
  try:
    img = Image.open(io.BytesIO(data))
    img.load()
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data
    raise DataError(f"{where}: cannot decode image ({type(e).__name__}: {e})",
                    "corrupt_image") from None
  return img


def to_rgb(img: Image.Image) -> Image.Image:
  """transformers' `convert_to_rgb`: alpha / transparency composited onto white."""
  if "A" in img.getbands() or img.info.get("transparency") is not None:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return img.convert("RGB")


def pad_to_square(img: Image.Image, mean: Sequence[float]) -> Image.Image:
  """LLaVA `expand2square`: centre the image on a square of colour `int(mean * 255)`."""
  w, h = img.size
  if w == h:
    return img
  side = max(w, h)
  out = Image.new(img.mode, (side, side), tuple(int(m * 255) for m in mean))
  out.paste(img, ((side - w) // 2, (side - h) // 2))
  return out


def resize_hw(h: int, w: int, spec: ImageSpec) -> tuple[int, int]:
  """Target (H, W) of transformers' resize for an (h, w) image."""
  if spec.shortest_edge is None:
    return (spec.height, spec.width)
  short, long = (w, h) if w <= h else (h, w)
  new_short, new_long = spec.shortest_edge, int(spec.shortest_edge * long / short)
  return (new_long, new_short) if w <= h else (new_short, new_long)


def center_crop(px_HWC: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
  """transformers' `center_crop`: top = (H - h) // 2; zero-pads (centred, ceil) when too small."""
  h, w = px_HWC.shape[:2]
  if h < crop_h or w < crop_w:
    nh, nw = max(crop_h, h), max(crop_w, w)
    canvas = np.zeros((nh, nw) + px_HWC.shape[2:], px_HWC.dtype)
    top_pad, left_pad = -(-(nh - h) // 2), -(-(nw - w) // 2)
    canvas[top_pad:top_pad + h, left_pad:left_pad + w] = px_HWC
    px_HWC, h, w = canvas, nh, nw
  top, left = (h - crop_h) // 2, (w - crop_w) // 2
  return px_HWC[top:top + crop_h, left:left + crop_w]


def resize_and_crop(img: Image.Image, spec: ImageSpec) -> np.ndarray:
  """The geometric part: PIL image -> uint8 (H, W, 3) at `spec.output_hw`."""
  img = to_rgb(img)
  if spec.aspect == "pad":
    img = pad_to_square(img, spec.mean)
  if spec.do_resize:
    h, w = resize_hw(img.height, img.width, spec)
    img = img.resize((w, h), resample=spec.resample)
  px = np.asarray(img, np.uint8)
  if spec.do_center_crop:
    px = center_crop(px, spec.crop_height, spec.crop_width)
  return np.ascontiguousarray(px)


def normalize(px_NHWC: np.ndarray, spec: ImageSpec) -> np.ndarray:
  """Vectorized rescale + normalize: uint8 (N, H, W, 3) -> float32 (N, H, W, 3)."""
  x = px_NHWC.astype(np.float64)
  if spec.do_rescale:
    x = x * spec.rescale_factor
  x = x.astype(np.float32)
  if spec.do_normalize:
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
  return x


def preprocess(images: Sequence[Image.Image], spec: ImageSpec) -> np.ndarray:
  """PIL images -> float32 pixel values (N, H, W, 3), as transformers' processor (NCHW there)."""
  if not images:
    h, w = spec.output_hw
    return np.zeros((0, h, w, 3), np.float32)
  return normalize(np.stack([resize_and_crop(im, spec) for im in images]), spec)
