"""The offline benchmark's VQA data: a general mix to retain, and downstream tasks to learn.

    from mllm_tune.data import offline_vqa as ov
    general = ov.make_source("general", "train", image_size=32)        # color/shape/count/position
    task = ov.make_source("downstream_synthetic", "train")             # read a letter
    digits = ov.make_source("digits", "eval")                          # sklearn handwritten digits
    rec = general[0]              # a LLaVA record (`sources.Source` protocol), PNG in "images"
    turns, refs = ov.eval_item(rec)   # prompt turns for generation, 10 reference answers
    texts = ov.corpus()           # text to train a small BPE tokenizer on the fly

Records: one human turn "<image>\\n{question}\\nAnswer the question using a single word or
phrase." and one gpt turn with the answer (one word or number); plus "family" and "answer"
keys (ignored by the pipeline) to score and group results. Images are RGB PNG, image_size^2.

Splits: synthetic train / eval never share an image (content-hash split, `offline_tasks`); the
general mix interleaves its families (record i is example i // F of family i % F, F families),
so `general[4k + j]` is the k-th example of family j and per-family scores (each an "upstream"
A_u of docs/methods.md §8) come from grouping by `record["family"]`. Digits: a fixed stratified
split of sklearn's 1797 images, 30 per class for eval (300), the rest for train (1497).

Task families, answer sets and chance accuracies: see `offline_tasks` (and `FAMILIES`). The
general mix does not teach the downstream skills: no letters or digits are ever drawn in it,
and its answers never include them (counts answer "1".."5" only).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from mllm_tune.data.offline_render import COLORS, SHAPES, digit_pixels, png_bytes
from mllm_tune.data.offline_tasks import (DOWNSTREAM_SYNTHETIC, FAMILIES, GENERAL,
                                          QUESTION_SUFFIX, SAMPLERS, SPLITS, Example, Family,
                                          check_image_size, check_split, example_rng,
                                          make_example)

__all__ = ["DOWNSTREAM_SYNTHETIC", "FAMILIES", "GENERAL", "QUESTION_SUFFIX", "SPLITS", "Example",
           "Family", "make_example", "ShapesVqaSource", "DigitsSource", "make_source",
           "eval_item", "answer_set", "chance_accuracy", "corpus", "digits_split", "prompt_text",
           "NAMES", "DEFAULT_NUM_SAMPLES", "DIGITS_EVAL_PER_CLASS", "CHAT_SCAFFOLDING"]

NAMES = ("general", "downstream_synthetic", "digits")
DEFAULT_NUM_SAMPLES = {"train": 20_000, "eval": 1_000}  # synthetic sources (any size works)
DIGITS_EVAL_PER_CLASS = 30
_DIGITS_SPLIT_SEED = 0  # fixed: the digits split never moves
# Chat scaffolding of the usual templates (vicuna_v1 / LLaVA-1.5, ChatML, Llama-2), for `corpus`.
CHAT_SCAFFOLDING = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the human's questions.",
    "USER: ASSISTANT:", "You are a helpful assistant.", "system\nuser\nassistant\n",
    "[INST] [/INST]")


def prompt_text(question: str) -> str:
  """The human turn: the image placeholder, the question and LLaVA-1.5's short-answer line."""
  return f"<image>\n{question}\n{QUESTION_SUFFIX}"


def _record(rid: str, where: str, family: str, question: str, answer: str,
            pixels: np.ndarray) -> dict:
  return {"id": rid, "where": f"{where} (id={rid})",
          "conversations": [{"from": "human", "value": prompt_text(question)},
                            {"from": "gpt", "value": answer}],
          "images": [png_bytes(pixels)], "image_names": [f"{rid}.png"],
          "family": family, "answer": answer}


def _check_families(families: Sequence[str]) -> tuple[str, ...]:
  families = tuple(families)
  bad = [f for f in families if f not in SAMPLERS]
  if not families or bad:
    raise ValueError(f"families {families!r}: need one or more of {tuple(SAMPLERS)}")
  if len(set(families)) != len(families):
    raise ValueError(f"families {families!r}: repeated family")
  return families


def _check_index(index: int, n: int) -> int:
  i = int(index)
  if i < 0:
    i += n
  if not 0 <= i < n:
    raise IndexError(f"index {index} out of range for {n} records")
  return i


class ShapesVqaSource:
  """Procedural VQA records of the given synthetic `families`, interleaved (a `Source`).

  Record i is `make_example(families[i % F], split, i // F, seed, image_size)` as a LLaVA
  record; `num_samples` defaults to DEFAULT_NUM_SAMPLES[split]. Generated on access (about
  0.1 ms per record), nothing is stored.
  """

  def __init__(self, families: Sequence[str] = GENERAL, split: str = "train",
               num_samples: int | None = None, image_size: int = 32, seed: int = 0,
               name: str = "offline_vqa"):
    self.families = _check_families(families)
    check_split(split)
    self.split, self.image_size = split, check_image_size(image_size)
    self.seed, self.name = int(seed), name
    n = DEFAULT_NUM_SAMPLES[split] if num_samples is None else int(num_samples)
    if n < 1:
      raise ValueError(f"num_samples={num_samples}: must be >= 1")
    self.num_samples = n

  def __len__(self) -> int:
    return self.num_samples

  def example(self, index: int) -> Example:
    i = _check_index(index, len(self))
    f = len(self.families)
    return make_example(self.families[i % f], self.split, i // f, self.seed, self.image_size)

  def __getitem__(self, index: int) -> dict:
    i = _check_index(index, len(self))
    ex = self.example(i)
    return _record(f"{self.name}/{self.split}/{i}", f"{self.name} {self.split} record {i}",
                   ex.family, ex.question, ex.answer, ex.pixels)


@functools.cache
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
  try:
    from sklearn.datasets import load_digits
  except ImportError as e:
    raise ImportError("the digits task needs scikit-learn (pip install scikit-learn)") from e
  d = load_digits()
  return np.asarray(d.images), np.asarray(d.target)


def digits_split(split: str) -> np.ndarray:
  """Indices into sklearn's `load_digits()` of a split, ascending: per class, a fixed
  permutation's first DIGITS_EVAL_PER_CLASS images are eval, the rest train."""
  check_split(split)
  _, target = _load_digits()
  rng = np.random.default_rng(_DIGITS_SPLIT_SEED)
  eval_idx = np.concatenate([rng.permutation(np.flatnonzero(target == c))[:DIGITS_EVAL_PER_CLASS]
                             for c in range(10)])
  is_eval = np.zeros(len(target), bool)
  is_eval[eval_idx] = True
  return np.flatnonzero(is_eval if split == "eval" else ~is_eval)


class DigitsSource:
  """sklearn's handwritten digits (8x8, 0..16) as VQA records: "What digit is this?" -> "0".."9".

  Images are grey, nearest-neighbour upscaled to image_size (`offline_render.digit_pixels`);
  record i is digit `self.indices[i]` of `load_digits()`; the template depends on (seed, i).
  """

  def __init__(self, split: str = "train", image_size: int = 32, seed: int = 0,
               name: str = "digits"):
    self.split, self.image_size = split, check_image_size(image_size)
    self.seed, self.name = int(seed), name
    self.indices = digits_split(split)

  def __len__(self) -> int:
    return len(self.indices)

  def example(self, index: int) -> Example:
    i = _check_index(index, len(self))
    images, target = _load_digits()
    k = int(self.indices[i])
    rng = example_rng("digit", self.split, i, self.seed)
    templates = FAMILIES["digit"].templates
    question = templates[int(rng.integers(len(templates)))]
    return Example("digit", question, str(int(target[k])), None,
                   digit_pixels(images[k], self.image_size))

  def __getitem__(self, index: int) -> dict:
    i = _check_index(index, len(self))
    ex = self.example(i)
    rid = f"{self.name}/{self.split}/{i}"
    return _record(rid, f"{self.name} {self.split} record {i} (load_digits #{self.indices[i]})",
                   ex.family, ex.question, ex.answer, ex.pixels)


def make_source(name: str, split: str = "train", image_size: int = 32,
                num_samples: int | None = None, seed: int = 0):
  """A source by name: "general" (GENERAL families), "downstream_synthetic"
  (DOWNSTREAM_SYNTHETIC), "digits", or a single synthetic family ("color", "letter", ...).
  `num_samples` does not apply to digits (fixed split)."""
  if name == "digits":
    if num_samples is not None:
      raise ValueError("digits has a fixed split: num_samples does not apply")
    return DigitsSource(split, image_size, seed)
  families = {"general": GENERAL, "downstream_synthetic": DOWNSTREAM_SYNTHETIC}.get(
      name, (name,) if name in SAMPLERS else None)
  if families is None:
    raise ValueError(f"unknown source {name!r}: choose one of {NAMES + tuple(SAMPLERS)}")
  return ShapesVqaSource(families, split, num_samples, image_size, seed, name)


def eval_item(record: dict, copies: int = 10) -> tuple[list[dict], list[str]]:
  """(prompt turns: every turn before the last gpt turn, `copies` reference answers).

  With VQA accuracy min(#matches / 3, 1), 10 copies of the single answer make it exact match
  (1 or 0); copies=1 suits plain exact match. Generate with add_generation_prompt after the
  prompt turns and score the stripped, lower-cased first word against the references.
  """
  turns = list(record["conversations"])
  if not turns or turns[-1].get("from") != "gpt":
    raise ValueError(f"{record.get('where', 'record')}: the last turn must be the gpt answer")
  if copies < 1:
    raise ValueError(f"copies={copies}: must be >= 1")
  return turns[:-1], [turns[-1]["value"]] * copies


def answer_set(name: str) -> tuple[str, ...]:
  """The closed answer set of a family or of a named source (its families' answers, in order)."""
  if name in FAMILIES:
    return FAMILIES[name].answers
  families = {"general": GENERAL, "downstream_synthetic": DOWNSTREAM_SYNTHETIC,
              "digits": ("digit",)}.get(name)
  if families is None:
    raise ValueError(f"unknown family or source {name!r}")
  return tuple(a for f in families for a in FAMILIES[f].answers)


def chance_accuracy(name: str) -> float:
  """Uniform-guess accuracy knowing the family: a family's 1/|answers|, or for a source the
  mean over its families (each family weighs the same, as in the interleaved mix)."""
  families = {"general": GENERAL, "downstream_synthetic": DOWNSTREAM_SYNTHETIC,
              "digits": ("digit",)}.get(name, (name,))
  if any(f not in FAMILIES for f in families):
    raise ValueError(f"unknown family or source {name!r}")
  return float(np.mean([FAMILIES[f].chance for f in families]))


def corpus(families: Sequence[str] = tuple(FAMILIES), extra: Sequence[str] = ()) -> list[str]:
  """Every distinct text of the records of `families` (each question with the short-answer
  line, every answer) plus CHAT_SCAFFOLDING and `extra`, to train a small BPE tokenizer.

  `<image>` is left out: tokenizers take it as a special token, not as text to merge.
  """
  out = list(CHAT_SCAFFOLDING)
  for name in families:
    if name not in FAMILIES:
      raise ValueError(f"unknown family {name!r}: choose from {tuple(FAMILIES)}")
    fam = FAMILIES[name]
    for template in fam.templates:
      texts = {template.format(color=c, shape=s) for c in COLORS for s in SHAPES}
      out += [f"{q}\n{QUESTION_SUFFIX}" for q in sorted(texts)]
    out += list(fam.answers)
  return out + list(extra)
