"""Benchmark sets as fixed-shape in-memory arrays, prepared once by the regular data pipeline.

Every record goes through `SamplePreparer` (chat template, assistant-only loss mask, `<image>`
expansion, CLIP preprocessing), exactly as `mllm-tune train` would see it; the benchmark then
keeps the prepared tokens and pixels in memory so tuning steps and evaluations cost no data
work. One image and one question per record, rows right-padded to the set's longest record.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from mllm_tune.data.images import ImageSpec, normalize
from mllm_tune.data.pipeline import SamplePreparer


@dataclasses.dataclass(frozen=True)
class VqaArrays:
  """A prepared set: `input_ids`, `loss_mask`, `attention_mask` (N, T) int32, `pixels` (N, H, W,
  3) uint8, `prompt_len` (N,) tokens before the answer, `answers` and `families` (N,) str."""
  name: str
  input_ids: np.ndarray
  loss_mask: np.ndarray
  attention_mask: np.ndarray
  pixels: np.ndarray
  prompt_len: np.ndarray
  answers: np.ndarray
  families: np.ndarray

  def __len__(self) -> int:
    return len(self.input_ids)

  def batch(self, idx: np.ndarray, spec: ImageSpec) -> dict:
    """Training batch (the trainer's field names) of rows `idx`; pixels normalized NHWC."""
    return {"input_ids": self.input_ids[idx], "loss_mask": self.loss_mask[idx],
            "attention_mask": self.attention_mask[idx],
            "pixel_values": normalize(self.pixels[idx], spec).astype(np.float32)}

  def prompts(self, idx: np.ndarray, spec: ImageSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, mask, pixels) of the prompts of rows `idx`: each row cut before its answer
    (`<|im_start|>assistant\\n` is the last prompt token), right-padded."""
    width = int(self.prompt_len[idx].max())
    ids = self.input_ids[idx, :width].copy()
    mask = (np.arange(width)[None] < self.prompt_len[idx, None]).astype(np.int32)
    ids[mask == 0] = 0
    return ids, mask, normalize(self.pixels[idx], spec).astype(np.float32)


def prepare(source, preparer: SamplePreparer, num: int | None = None,
            name: str | None = None) -> VqaArrays:
  """The first `num` records of `source` (all by default) as `VqaArrays`."""
  n = len(source) if num is None else min(int(num), len(source))
  if n < 1:
    raise ValueError(f"set {name or source!r} is empty")
  rows, pixels, prompt_len, answers, families = [], [], [], [], []
  for i in range(n):
    rec = source[i]
    sample = preparer(rec)
    if sample.num_images != 1:
      raise ValueError(f"{rec.get('where', i)}: the benchmark expects one image per record, "
                       f"got {sample.num_images}")
    t = sample.tokens
    target = np.flatnonzero(t.loss_mask)
    if not len(target):
      raise ValueError(f"{rec.get('where', i)}: no answer token after preparation")
    rows.append((t.input_ids, t.loss_mask))
    pixels.append(sample.pixels[0])
    prompt_len.append(int(target[0]))
    answers.append(_answer(rec))
    families.append(rec.get("family", name or getattr(source, "name", "set")))
  width = max(len(ids) for ids, _ in rows)
  ids = np.zeros((n, width), np.int32)
  loss = np.zeros((n, width), np.int32)
  attn = np.zeros((n, width), np.int32)
  for k, (a, m) in enumerate(rows):
    ids[k, :len(a)], loss[k, :len(a)], attn[k, :len(a)] = a, m, 1
  return VqaArrays(name or getattr(source, "name", "set"), ids, loss, attn, np.stack(pixels),
                   np.asarray(prompt_len, np.int32), np.asarray(answers), np.asarray(families))


def _answer(rec: dict) -> str:
  """The reference answer: the record's `answer` (offline sets) or its last gpt turn (LLaVA)."""
  if "answer" in rec:
    return rec["answer"]
  gpt = [t["value"] for t in rec.get("conversations", []) if t.get("from") == "gpt"]
  if not gpt:
    raise ValueError(f"{rec.get('where', 'record')}: no gpt turn to take the reference answer from")
  return str(gpt[-1]).strip()
