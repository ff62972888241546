"""A deterministic, learnable synthetic token stream (for smoke tests, resume tests, benchmarks).

Row r of batch i is an arithmetic progression mod `vocab` (start and stride drawn from
`(seed, i, r)`), so a model can learn it and every batch is a pure function of its index: the
iterator's whole state is `{"index": i}`.
"""
from __future__ import annotations

import numpy as np


class SyntheticBatches:
  def __init__(self, batch_size: int, seq_len: int, vocab: int, seed: int = 0,
               grad_accum: int = 1, num_bos: int = 1):
    self.batch_size, self.seq_len, self.vocab = batch_size, seq_len, vocab
    self.seed, self.grad_accum, self.num_bos = seed, grad_accum, num_bos
    self.index = 0

  def make(self, index: int) -> dict:
    rng = np.random.default_rng([self.seed, index])
    shape = (self.grad_accum, self.batch_size) if self.grad_accum > 1 else (self.batch_size,)
    start = rng.integers(3, self.vocab, shape)[..., None]
    stride = rng.integers(1, 4, shape)[..., None]
    t = np.arange(self.seq_len)
    ids = (start + stride * t) % (self.vocab - 3) + 3
    ids[..., :self.num_bos] = 1
    ones = np.ones_like(ids, dtype=np.int32)
    return {"input_ids": ids.astype(np.int32), "attention_mask": ones,
            "positions": np.broadcast_to(t, ids.shape).astype(np.int32),
            "segment_ids": ones, "loss_mask": ones}

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = self.make(self.index)
    self.index += 1
    return batch

  def get_state(self) -> dict:
    return {"index": self.index}

  def set_state(self, state: dict) -> None:
    self.index = int(state["index"])
