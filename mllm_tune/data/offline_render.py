"""Drawing for the offline VQA set (`offline_vqa`): coloured shapes, bitmap letters and upscaled
handwritten digits on a plain background, as RGB uint8 images and PNG bytes. PIL and numpy only,
no randomness here: a `Scene` (integer pixels) fully decides the image.

A shape of half-size `r` centred at (cx, cy) lies in the box [cx - r, cx + r]^2 and always
covers its centre pixel, drawn without anti-aliasing in one flat colour, so every object is a
single colour blob (the tests read colours, count blobs, match glyphs).
"""
from __future__ import annotations

import functools
import hashlib
import io
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Named colours (base RGB; objects get a per-object jitter of at most COLOR_JITTER per channel,
# less than half the distance between any two of them, so the nearest name is always the label).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 215, 40), "purple": (150, 60, 200), "orange": (245, 140, 30)}
COLOR_JITTER = 16
BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((0, 0, 0), (110, 110, 110), (255, 255, 255))
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
LETTERS = tuple("ABCDEFGHIJ")


class Shape(NamedTuple):
  kind: str                   # one of SHAPES
  color: str                  # a COLORS name
  rgb: tuple[int, int, int]   # the jittered colour actually drawn
  cx: int
  cy: int
  r: int                      # half-size in pixels (>= 2)


class Glyph(NamedTuple):
  char: str                   # one of LETTERS (any character of the bitmap font works)
  color: str
  rgb: tuple[int, int, int]
  x: int                      # top-left corner of the glyph's ink box
  y: int
  scale: int                  # nearest-neighbour upscaling of the bitmap font


class Scene(NamedTuple):
  size: int                                   # images are size x size RGB
  background: tuple[int, int, int]
  objects: tuple[Shape | Glyph, ...]


def nearest_color(rgb) -> str:
  """The COLORS name closest (Euclidean RGB) to `rgb`."""
  px = np.asarray(rgb, np.float64)
  return min(COLORS, key=lambda n: float(np.sum((px - np.asarray(COLORS[n])) ** 2)))


def jitter_color(name: str, rng: np.random.Generator) -> tuple[int, int, int]:
  base = np.asarray(COLORS[name])
  rgb = np.clip(base + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3), 0, 255)
  return tuple(int(v) for v in rgb)


@functools.cache
def _font():
  # Pillow >= 10.1 returns a FreeType font from load_default(); the classic bitmap font renders
  # identically everywhere (no FreeType version in the loop).
  return getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)()


@functools.cache
def glyph_mask(char: str, scale: int = 1) -> np.ndarray:
  """bool (h * scale, w * scale): the ink of `char` in PIL's bitmap font, cropped to its box."""
  img = Image.new("L", (16, 16), 0)
  ImageDraw.Draw(img).text((0, 0), char, font=_font(), fill=255)
  ink = np.asarray(img) > 0
  if not ink.any():
    raise ValueError(f"character {char!r} has no glyph in the bitmap font")
  rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
  ink = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
  out = np.kron(ink, np.ones((scale, scale), bool))
  out.setflags(write=False)
  return out


def _draw_shape(draw: ImageDraw.ImageDraw, s: Shape) -> None:
  cx, cy, r, fill = s.cx, s.cy, s.r, s.rgb
  x0, y0, x1, y1 = cx - r, cy - r, cx + r, cy + r
  if s.kind == "circle":
    draw.ellipse((x0, y0, x1, y1), fill=fill)
  elif s.kind == "square":
    h = max(1, round(r * 0.8))  # a square as large as the circle looks much bigger
    draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
  elif s.kind == "triangle":
    draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
  elif s.kind == "diamond":
    draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
  elif s.kind == "cross":
    t = max(1, round(r * 0.35))
    draw.rectangle((x0, cy - t, x1, cy + t), fill=fill)
    draw.rectangle((cx - t, y0, cx + t, y1), fill=fill)
  else:
    raise ValueError(f"unknown shape {s.kind!r}: choose one of {SHAPES}")


def render_scene(scene: Scene) -> np.ndarray:
  """uint8 (size, size, 3): the scene's objects drawn in order on its background."""
  img = Image.new("RGB", (scene.size, scene.size), scene.background)
  draw = ImageDraw.Draw(img)
  for obj in scene.objects:
    if isinstance(obj, Shape):
      _draw_shape(draw, obj)
  px = np.array(img)
  for obj in scene.objects:
    if isinstance(obj, Glyph):
      mask = glyph_mask(obj.char, obj.scale)
      h, w = mask.shape
      px[obj.y:obj.y + h, obj.x:obj.x + w][mask] = obj.rgb
  return px


def scene_key(scene: Scene) -> str:
  """A canonical text of the scene (plain ints and strings), stable across numpy versions."""
  def plain(v):
    if isinstance(v, tuple):
      return tuple(plain(x) for x in v)
    return v if isinstance(v, str) else int(v)
  return repr(plain(tuple(scene)))


def scene_bucket(scene: Scene, buckets: int) -> int:
  """A hash bucket of the scene's content (blake2b of `scene_key`), in [0, buckets)."""
  digest = hashlib.blake2b(scene_key(scene).encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little") % buckets


def digit_pixels(image_8x8: np.ndarray, size: int) -> np.ndarray:
  """sklearn digits image (8, 8) in 0..16 -> uint8 (size, size, 3) grey, ink bright on black:
  grey = round(v * 255 / 16), then a nearest-neighbour resize (each digit pixel stays flat)."""
  grey = np.round(np.asarray(image_8x8, np.float64) * 255 / 16).astype(np.uint8)
  img = Image.fromarray(grey, "L").resize((size, size), Image.NEAREST)
  return np.array(img.convert("RGB"))


def png_bytes(px_HWC: np.ndarray) -> bytes:
  """uint8 (H, W, 3) -> PNG file bytes (lossless, deterministic for a given zlib)."""
  buf = io.BytesIO()
  Image.fromarray(np.asarray(px_HWC, np.uint8), "RGB").save(buf, format="PNG")
  return buf.getvalue()
