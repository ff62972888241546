"""Accuracy of a (tuned) model on a prepared VQA set: greedy generation + VQA accuracy.

Each prompt is the record's generation prompt (`VqaArrays.prompts`: the turns before the answer
rendered with the chat template's generation prompt, as a user sends it); the model answers
greedily (KV cache, stops at `<|im_end|>`), the reply is decoded and scored with the official
VQA normalization against ten copies of the single reference answer, i.e. normalized exact
match (docs/methods.md §8: "VQA accuracy with one reference"). Scores are per family and over
the whole set, in percent.
"""
from __future__ import annotations

import numpy as np

from mllm_tune.eval.vqa_sets import VqaArrays
from mllm_tune.eval.generate import decode_generated, generate
from mllm_tune.eval.vqa import vqa_accuracy


def predict(model, params, adapters, arrays: VqaArrays, spec, tokenizer, *,
            batch_size: int = 128, max_new_tokens: int = 4,
            eos_token_id: int | None = None) -> list[str]:
  """Greedy replies for every row of `arrays` (fixed batch size: the last batch is padded with
  repeats of its first row, so one compilation serves the set). Generation stops at
  `eos_token_id` (default: ChatML's `<|im_end|>`)."""
  eos = int(tokenizer.convert_tokens_to_ids("<|im_end|>") if eos_token_id is None
            else eos_token_id)
  out: list[str] = []
  n = len(arrays)
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    real = len(idx)
    idx = np.concatenate([idx, np.full(batch_size - real, idx[0])]) if real < batch_size else idx
    ids, mask, images = arrays.prompts(idx, spec)
    new = generate(model, params, ids, mask, max_new_tokens=max_new_tokens,
                   eos_token_id=eos, pad_token_id=0, adapters=adapters, **images)
    texts = decode_generated(new, lambda t: tokenizer.decode(t, skip_special_tokens=True),
                             stop_token_ids=[eos])
    out += [t.strip() for t in texts[:real]]
  return out


def score(predictions: list[str], arrays: VqaArrays) -> dict[str, float]:
  """Percent VQA accuracy per family and `"all"` (mean over rows)."""
  if len(predictions) != len(arrays):
    raise ValueError(f"{len(predictions)} predictions for {len(arrays)} rows of {arrays.name}")
  acc = np.array([vqa_accuracy(p, [a] * 10) for p, a in zip(predictions, arrays.answers)])
  out = {f: 100.0 * float(acc[arrays.families == f].mean()) for f in np.unique(arrays.families)}
  out["all"] = 100.0 * float(acc.mean())
  return out


def accuracy(model, params, adapters, arrays: VqaArrays, spec, tokenizer, **kw) -> dict:
  return score(predict(model, params, adapters, arrays, spec, tokenizer, **kw), arrays)
