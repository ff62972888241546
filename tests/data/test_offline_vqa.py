"""Offline VQA set: determinism, disjoint splits, closed balanced answers, image content that
matches the label (read back from the PNG), sklearn digits, and one pass through the pipeline."""
from __future__ import annotations

import collections
import hashlib
import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from mllm_tune.data import (BatchIterator, BatchSpec, ChatTokenizer, ImageSpec, SamplePreparer,
                            Source, epoch_order)
from mllm_tune.data import offline_vqa as ov
from mllm_tune.data.offline_render import COLORS, LETTERS
from mllm_tune.data.offline_tasks import SAMPLERS, make_example, scene_split

SIZE = 32


def decode(rec: dict) -> np.ndarray:
  img = Image.open(io.BytesIO(rec["images"][0]))
  assert img.mode == "RGB" and img.size == (SIZE, SIZE)
  return np.asarray(img)


def nearest(rgb) -> str:  # the test's own nearest-colour rule
  return min(COLORS, key=lambda n: float(np.sum((np.asarray(rgb, float) - COLORS[n]) ** 2)))


def components(mask: np.ndarray) -> list[np.ndarray]:
  """8-connected components of a bool mask (flood fill) -> list of (k, 2) [y, x] pixels."""
  seen, out = np.zeros_like(mask), []
  for y0, x0 in zip(*np.nonzero(mask)):
    if seen[y0, x0]:
      continue
    stack, pixels = [(y0, x0)], []
    seen[y0, x0] = True
    while stack:
      y, x = stack.pop()
      pixels.append((y, x))
      for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
          v, u = y + dy, x + dx
          if 0 <= v < mask.shape[0] and 0 <= u < mask.shape[1] and mask[v, u] and not seen[v, u]:
            seen[v, u] = True
            stack.append((v, u))
    out.append(np.array(pixels))
  return out


def blobs(px: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
  bg = px[0, 0]  # every object keeps a 1 px margin
  return components(np.any(px != bg, axis=-1)), bg


def question(rec: dict) -> str:
  return rec["conversations"][0]["value"].split("\n")[1]


# ----------------------------------------------------------------------------- records
def test_record_format_and_eval_item():
  rec = ov.make_source("general", "train")[3]
  assert isinstance(ov.make_source("general"), Source)
  assert set(rec) >= {"id", "conversations", "images", "image_names", "where"}
  human, gpt = rec["conversations"]
  assert human["from"] == "human" and gpt["from"] == "gpt"
  assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
  assert human["value"].endswith("\n" + ov.QUESTION_SUFFIX)
  assert gpt["value"] == rec["answer"] and " " not in rec["answer"]
  assert len(rec["images"]) == len(rec["image_names"]) == 1 and rec["id"] in rec["where"]
  turns, refs = ov.eval_item(rec)
  assert turns == [human] and refs == [rec["answer"]] * 10
  assert ov.eval_item(rec, copies=1)[1] == [rec["answer"]]


def test_deterministic_and_seeded():
  a, b = ov.make_source("general", "train"), ov.make_source("general", "train")
  c = ov.make_source("general", "train", seed=1)
  for i in (0, 5, 123):
    assert a[i] == b[i]  # same conversations and the same PNG bytes
  assert [a[i]["images"] for i in range(8)] != [c[i]["images"] for i in range(8)]
  d = ov.make_source("digits", "train")
  assert d[7] == ov.make_source("digits", "train")[7]


def test_general_mix_interleaves_families():
  mix = ov.make_source("general", "eval", num_samples=40)
  for i in range(0, 40, 7):
    fam = ov.GENERAL[i % 4]
    alone = ov.make_source(fam, "eval")[i // 4]
    assert mix[i]["family"] == fam and mix[i]["conversations"] == alone["conversations"]
    assert mix[i]["images"] == alone["images"]


def test_splits_disjoint():
  for fam in SAMPLERS:
    seen = {}
    for split in ov.SPLITS:
      exs = [make_example(fam, split, i) for i in range(300)]
      assert all(scene_split(e.scene) == split for e in exs)
      seen[split] = {hashlib.sha1(e.pixels.tobytes()).hexdigest() for e in exs}
    assert not seen["train"] & seen["eval"], fam
  train, ev = ov.digits_split("train"), ov.digits_split("eval")
  assert len(train) == 1497 and len(ev) == 300 and not set(train) & set(ev)
  assert sorted(np.concatenate([train, ev])) == list(range(1797))
  from sklearn.datasets import load_digits
  assert np.all(np.bincount(load_digits().target[ev]) == ov.DIGITS_EVAL_PER_CLASS)


@pytest.mark.parametrize("fam", list(SAMPLERS))
def test_answers_closed_and_balanced(fam):
  counts = collections.Counter(make_example(fam, "train", i).answer for i in range(1000))
  answers = ov.answer_set(fam)
  assert set(counts) == set(answers)
  assert max(counts.values()) <= 2 * 1000 / len(answers), counts
  assert ov.chance_accuracy(fam) == pytest.approx(1 / len(answers))


def test_digits_answers_balanced():
  src = ov.make_source("digits", "train")
  counts = collections.Counter(src.example(i).answer for i in range(len(src)))
  assert set(counts) == set(ov.answer_set("digits")) == set("0123456789")
  assert max(counts.values()) <= 2 * len(src) / 10


def test_general_never_teaches_downstream_answers():
  general = set(ov.answer_set("general"))
  assert not general & set(ov.answer_set("downstream_synthetic"))
  assert not general & set(ov.answer_set("digits")) - set(ov.answer_set("count"))
  assert ov.chance_accuracy("general") == pytest.approx(np.mean([1 / 6, 1 / 5, 1 / 5, 1 / 4]))


# ----------------------------------------------------------------------------- content
def test_color_matches_image():
  src = ov.make_source("color", "eval")
  for i in range(40):
    rec = src[i]
    (blob,), _ = blobs(px := decode(rec))
    cy, cx = np.round(blob.mean(0)).astype(int)
    assert nearest(px[cy, cx]) == rec["answer"]
    assert all(nearest(px[y, x]) == rec["answer"] for y, x in blob)  # one flat colour


def test_count_matches_components():
  for size in (SIZE, 28):
    src = ov.make_source("count", "train", image_size=size)
    for i in range(60):
      rec = src[i]
      px = np.asarray(Image.open(io.BytesIO(rec["images"][0])))
      assert len(blobs(px)[0]) == int(rec["answer"]), rec["id"]


def test_position_matches_image():
  src = ov.make_source("position", "train")
  for i in range(60):
    rec = src[i]
    color = next(c for c in COLORS if f" {c} " in question(rec))
    comps, _ = blobs(px := decode(rec))
    assert len(comps) == 2
    (target,) = [b for b in comps if nearest(px[tuple(b[0])]) == color]
    dy, dx = target.mean(0) - (SIZE - 1) / 2
    where = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("top" if dy < 0 else
                                                                        "bottom")
    assert where == rec["answer"], rec["id"]


def test_shape_square_and_triangle_geometry():
  src = ov.make_source("shape", "train")
  seen = set()
  for i in range(60):
    rec = src[i]
    (blob,), _ = blobs(decode(rec))
    (y0, x0), (y1, x1) = blob.min(0), blob.max(0)
    fill = len(blob) / ((y1 - y0 + 1) * (x1 - x0 + 1))
    assert (fill == 1.0) == (rec["answer"] == "square"), rec["id"]
    mid = (y0 + y1) / 2
    top, bottom = np.sum(blob[:, 0] < mid), np.sum(blob[:, 0] > mid)
    assert (top < 0.6 * bottom) == (rec["answer"] == "triangle"), rec["id"]
    seen.add(rec["answer"])
  assert seen == set(ov.answer_set("shape"))


def _glyph(char: str, scale: int) -> np.ndarray:
  font = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)()  # bitmap font
  img = Image.new("L", (16, 16))
  ImageDraw.Draw(img).text((0, 0), char, font=font, fill=255)
  ink = np.asarray(img) > 0
  ink = ink[np.ix_(ink.any(1), ink.any(0))]
  return np.kron(ink, np.ones((scale, scale), bool))


def test_letter_matches_glyph():
  src = ov.make_source("downstream_synthetic", "eval")
  for i in range(40):
    rec = src[i]
    px = decode(rec)
    ink = np.any(px != px[0, 0], axis=-1)
    ink = ink[np.ix_(ink.any(1), ink.any(0))]
    matches = [c for c in LETTERS for s in (1, 2, 3)
               if _glyph(c, s).shape == ink.shape and np.array_equal(_glyph(c, s), ink)]
    assert matches == [rec["answer"]], rec["id"]


def test_digits_are_sklearn_images():
  from sklearn.datasets import load_digits
  d = load_digits()
  src = ov.make_source("digits", "eval")
  for i in range(0, len(src), 37):
    rec = src[i]
    k = src.indices[i]
    px = decode(rec)
    assert rec["answer"] == str(d.target[k])
    assert np.array_equal(px[..., 0], px[..., 1]) and np.array_equal(px[..., 0], px[..., 2])
    grey = px[::4, ::4, 0].astype(float)  # 32 = 4 x 8: one flat 4x4 block per digit pixel
    assert np.array_equal(px[..., 0], np.kron(px[::4, ::4, 0], np.ones((4, 4), np.uint8)))
    np.testing.assert_allclose(grey * 16 / 255, d.images[k], atol=16 / 255 / 2 + 1e-9)


# ----------------------------------------------------------------------------- text, errors
def test_corpus_covers_all_text():
  texts = ov.corpus()
  joined = "\n".join(texts)
  assert "<image>" not in joined
  for name in ov.NAMES:
    src = ov.make_source(name, "train")
    for i in range(0, 200, 7) if name != "digits" else range(30):
      rec = src.example(i)
      assert f"{rec.question}\n{ov.QUESTION_SUFFIX}" in texts and rec.answer in texts


def test_bad_input():
  with pytest.raises(ValueError, match="unknown source"):
    ov.make_source("nope")
  with pytest.raises(ValueError, match="split"):
    ov.make_source("general", "test")
  with pytest.raises(ValueError, match="image_size"):
    ov.make_source("general", image_size=8)
  with pytest.raises(ValueError, match="num_samples"):
    ov.make_source("digits", num_samples=10)
  with pytest.raises(ValueError, match="families"):
    ov.ShapesVqaSource(("color", "digit"))
  src = ov.make_source("letter", "eval", num_samples=5)
  assert src[-1] == src[4]
  with pytest.raises(IndexError):
    src[5]
  assert len(list(src)) == 5  # the sequence protocol stops on IndexError
  with pytest.raises(ValueError, match="last turn"):
    ov.eval_item({"conversations": [{"from": "human", "value": "<image>\nhi"}]})


# ----------------------------------------------------------------------------- pipeline
def corpus_tokenizer():
  """A ChatML byte-level BPE trained on `ov.corpus()` (as tests/helpers/data.py builds one)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  tk = Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  tk.train_from_iterator(ov.corpus(), trainers.BpeTrainer(
      vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>")


def test_records_through_pipeline():
  tok = corpus_tokenizer()
  chat = ChatTokenizer(tok, 3, 4, "chatml")
  spec_img = ImageSpec.clip(SIZE)
  spec = BatchSpec(batch_size=4, max_len=96, packing=False, max_images=4, image_seq_len=4,
                   image_token_id=3, image_hw=(SIZE, SIZE))
  for name in ov.NAMES:
    src = ov.make_source(name, "train", num_samples=None if name == "digits" else 64)
    it = BatchIterator(src, SamplePreparer(chat, spec_img, 96), spec, spec_img, seed=0)
    batch = next(it)
    order = epoch_order(len(src), 0, 0)[:4]
    assert batch["pixel_values"].shape == (4, SIZE, SIZE, 3) and batch["image_valid"].all()
    assert (batch["input_ids"] == 3).sum() == 16
    for row, key in enumerate(order):
      target = batch["input_ids"][row][batch["loss_mask"][row] == 1]
      assert tok.decode(target).startswith(src[int(key)]["answer"] + "<|im_end|>")
    px = batch["pixel_values"][0]  # normalized CLIP pixels of the first record, unchanged size
    raw = decode(src[int(order[0])]).astype(np.float32) / 255
    np.testing.assert_allclose(px * np.array(spec_img.std) + np.array(spec_img.mean), raw,
                               atol=1e-5)
