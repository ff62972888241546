"""Task families of the offline VQA set: closed answer sets, question templates, scene samplers.

Every synthetic example is a pure function of (family, split, index, seed, image_size):
`numpy.random.default_rng([seed, split_id, family_id, index])` draws a scene, then a question
template. Train and eval never share an image: a scene belongs to the eval split iff the hash of
its content (`offline_render.scene_bucket`, 1 bucket in EVAL_BUCKETS) says so, and each split's
sampler redraws until the scene is its own; so this holds for any seeds and sizes.

Families (answer: chance accuracy of a uniform guess):
  color     one shape, "What color is the shape?"            6 colours       1/6
  shape     one shape, "What shape is shown?"                5 shapes        1/5
  count     1-5 shapes in distinct cells of a 3x3 grid       "1".."5"        1/5
  position  a target and a distractor of another colour at   left / right /  1/4
            two of the four edge midpoints, "Where is the     top / bottom
            red shape?"
  letter    one capital letter (PIL bitmap font, 2-3x),      "A".."J"        1/10
            "What letter is written?"
  digit     sklearn's handwritten digits (see offline_vqa)   "0".."9"        1/10
Answers are uniform within a family (drawn independently per example).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from mllm_tune.data.offline_render import (BACKGROUNDS, COLORS, LETTERS, SHAPES, Glyph, Scene,
                                           Shape, glyph_mask, jitter_color, render_scene,
                                           scene_bucket)

QUESTION_SUFFIX = "Answer the question using a single word or phrase."  # LLaVA-1.5 short VQA
POSITIONS = ("left", "right", "top", "bottom")
COUNTS = ("1", "2", "3", "4", "5")
DIGITS = tuple("0123456789")
SPLITS = ("train", "eval")
EVAL_BUCKETS = 8  # one scene in 8 belongs to the eval split
MIN_IMAGE_SIZE = 24
_SPLIT_IDS = {"train": 0, "eval": 1}
_MAX_DRAWS = 10_000  # a split's scene needs ~1.1 (train) or ~8 (eval) draws


@dataclasses.dataclass(frozen=True)
class Family:
  """A question family: its closed answer set and question templates (which may name the
  target's `{color}` and `{shape}`)."""
  name: str
  answers: tuple[str, ...]
  templates: tuple[str, ...]
  family_id: int  # part of the rng key: never renumber

  @property
  def chance(self) -> float:
    """Accuracy of a uniform guess (answers are balanced)."""
    return 1.0 / len(self.answers)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("color", tuple(COLORS), ("What color is the shape?", "What color is the {shape}?",
                                    "Which color does the {shape} have?"), 0),
    Family("shape", SHAPES, ("What shape is shown?", "What is the shape of the {color} object?",
                             "Which shape is in the image?"), 1),
    Family("count", COUNTS, ("How many shapes are there?", "How many objects are in the image?",
                             "What is the number of shapes in the image?"), 2),
    Family("position", POSITIONS, ("Where is the {color} shape?",
                                   "In which part of the image is the {color} {shape}?"), 3),
    Family("letter", LETTERS, ("What letter is written?", "Which letter is shown in the image?",
                               "What letter do you see in the image?"), 4),
    Family("digit", DIGITS, ("What digit is this?", "Which digit is written in the image?",
                             "What handwritten digit is shown?"), 5),
)}
GENERAL = ("color", "shape", "count", "position")
DOWNSTREAM_SYNTHETIC = ("letter",)


@dataclasses.dataclass(frozen=True)
class Example:
  """One generated example: the question (no `<image>`, no suffix), the answer and the image."""
  family: str
  question: str
  answer: str
  scene: Scene | None
  pixels: np.ndarray  # uint8 (size, size, 3)


def _pick(rng: np.random.Generator, options):
  return options[int(rng.integers(len(options)))]


def _radius(size: int, lo: float, hi: float) -> tuple[int, int]:
  a = max(2, round(lo * size))
  return a, max(a, round(hi * size))


def _shape(rng, size: int, r_range: tuple[int, int], kind: str | None = None,
           color: str | None = None, center: tuple[int, int] | None = None,
           spread: int = 0) -> Shape:
  """A random shape; anywhere inside the image (1 px margin) or within `spread` of `center`."""
  r = int(rng.integers(r_range[0], r_range[1] + 1))
  kind = kind or _pick(rng, SHAPES)
  color = color or _pick(rng, tuple(COLORS))
  rgb = jitter_color(color, rng)
  lo, hi = r + 1, size - 2 - r
  if center is None:
    cx, cy = (int(rng.integers(lo, hi + 1)) for _ in range(2))
  else:
    cx, cy = (int(np.clip(c + rng.integers(-spread, spread + 1), lo, hi)) for c in center)
  return Shape(kind, color, rgb, cx, cy, r)


def _single(rng, size: int) -> tuple[Scene, Shape]:
  s = _shape(rng, size, _radius(size, 0.12, 0.22))
  return Scene(size, _pick(rng, BACKGROUNDS), (s,)), s


def sample_color(rng, size):
  scene, s = _single(rng, size)
  return scene, s.color, {"shape": s.kind, "color": s.color}


def sample_shape(rng, size):
  scene, s = _single(rng, size)
  return scene, s.kind, {"shape": s.kind, "color": s.color}


def sample_count(rng, size):
  """1-5 shapes, each in its own cell of a 3x3 grid with >= 1 px margin (never touching)."""
  n = int(rng.integers(1, len(COUNTS) + 1))
  cells = rng.choice(9, n, replace=False)
  edges = [i * size // 3 for i in range(4)]
  objects = []
  for cell in cells:
    (x0, x1), (y0, y1) = ((edges[k], edges[k + 1] - 1) for k in (cell % 3, cell // 3))
    r_max = max(2, (min(x1 - x0, y1 - y0) - 2) // 2)
    r = int(rng.integers(max(2, r_max - 1), r_max + 1))
    cx = int(rng.integers(x0 + 1 + r, max(x0 + 1 + r, x1 - 1 - r) + 1))
    cy = int(rng.integers(y0 + 1 + r, max(y0 + 1 + r, y1 - 1 - r) + 1))
    color = _pick(rng, tuple(COLORS))
    objects.append(Shape(_pick(rng, SHAPES), color, jitter_color(color, rng), cx, cy, r))
  return Scene(size, _pick(rng, BACKGROUNDS), tuple(objects)), str(n), {}


def _apart(a: Shape, b: Shape, gap: int = 2) -> bool:
  return max(abs(a.cx - b.cx), abs(a.cy - b.cy)) > a.r + b.r + gap


def sample_position(rng, size):
  """A target at one edge midpoint and a distractor (another colour) at another."""
  mid = {"left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.2), "bottom": (0.5, 0.8)}
  opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
  r_range, spread = _radius(size, 0.09, 0.13), max(1, round(0.05 * size))
  where = _pick(rng, POSITIONS)
  center = lambda p: tuple(round(f * size) for f in mid[p])
  target = _shape(rng, size, r_range, center=center(where), spread=spread)
  colors = tuple(c for c in COLORS if c != target.color)
  for attempt in range(21):  # redraw a distractor that comes too close; then use the opposite
    other = (_pick(rng, tuple(p for p in POSITIONS if p != where)) if attempt < 20
             else opposite[where])
    distractor = _shape(rng, size, r_range, color=_pick(rng, colors), center=center(other),
                        spread=spread)
    if _apart(target, distractor):
      break
  objects = (target, distractor) if rng.integers(2) else (distractor, target)
  return (Scene(size, _pick(rng, BACKGROUNDS), objects), where,
          {"shape": target.kind, "color": target.color})


def sample_letter(rng, size):
  """One capital letter, scale (size // 10) or one less, anywhere with a 1 px margin."""
  char, color = _pick(rng, LETTERS), _pick(rng, tuple(COLORS))
  top = max(1, size // 10)
  scale = int(rng.integers(max(1, top - 1), top + 1))
  h, w = glyph_mask(char, scale).shape
  x, y = int(rng.integers(1, size - w)), int(rng.integers(1, size - h))
  glyph = Glyph(char, color, jitter_color(color, rng), x, y, scale)
  return Scene(size, _pick(rng, BACKGROUNDS), (glyph,)), char, {"color": color}


SAMPLERS = {"color": sample_color, "shape": sample_shape, "count": sample_count,
            "position": sample_position, "letter": sample_letter}


def scene_split(scene: Scene) -> str:
  """The split that owns this scene's image content."""
  return "eval" if scene_bucket(scene, EVAL_BUCKETS) == 0 else "train"


def check_split(split: str) -> int:
  if split not in _SPLIT_IDS:
    raise ValueError(f"split={split!r}: choose one of {SPLITS}")
  return _SPLIT_IDS[split]


def check_image_size(image_size: int) -> int:
  if not isinstance(image_size, (int, np.integer)) or image_size < MIN_IMAGE_SIZE:
    raise ValueError(f"image_size={image_size!r}: must be an int >= {MIN_IMAGE_SIZE}")
  return int(image_size)


def example_rng(family: str, split: str, index: int, seed: int) -> np.random.Generator:
  if family not in FAMILIES:
    raise ValueError(f"unknown family {family!r}: choose one of {tuple(FAMILIES)}")
  if index < 0:
    raise IndexError(f"index {index} < 0")
  return np.random.default_rng([seed, check_split(split), FAMILIES[family].family_id, index])


def make_example(family: str, split: str, index: int, seed: int = 0,
                 image_size: int = 32) -> Example:
  """The `index`-th example of a synthetic `family` in `split` (a pure function of the args)."""
  if family not in SAMPLERS:
    raise ValueError(f"family {family!r} is not synthetic: choose one of {tuple(SAMPLERS)}")
  size = check_image_size(image_size)
  rng = example_rng(family, split, index, seed)
  for _ in range(_MAX_DRAWS):
    scene, answer, fill = SAMPLERS[family](rng, size)
    if scene_split(scene) == split:
      break
  else:  # pragma: no cover - probability ~(7/8)^10000
    raise RuntimeError(f"no {split} scene for {family} index {index} in {_MAX_DRAWS} draws")
  question = _pick(rng, FAMILIES[family].templates).format(**fill)
  return Example(family, question, answer, scene, render_scene(scene))
