"""Shared pieces for PEFT parity tests: a tiny LLaVA in both worlds and one loss."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

import mllm_tune as mt
from tests.helpers import hf_tiny


def tiny_llava(tmp_path):
  """(hf_model, model, params, batch) for a CLIP + Llama tiny LLaVA."""
  hf_model = hf_tiny.clip_llama()
  d = str(tmp_path / "base")
  hf_model.save_pretrained(d)
  model, params = mt.load_pretrained(d)
  per = model.config.image_seq_len
  rows = [[1, 5] + hf_tiny.image_tokens(per, 1) + [7, 8, 9, 10], [1, 20, 21, 22, 23]]
  ids, mask = hf_tiny.padded_batch(rows, "right")
  px = np.random.RandomState(0).randn(1, 28, 28, 3).astype(np.float32)
  return hf_model, model, params, (ids, mask, px), d


def token_llava(tmp_path, tied: bool):
  """(hf_model, model, params, batch, dir): CLIP + Llama (untied head) or SigLIP + Qwen2 (tied);
  the batch holds tokens 5, 20, 23, 60 and the pad id 0 at a real position."""
  hf_model = hf_tiny.siglip_qwen2() if tied else hf_tiny.clip_llama()
  d = str(tmp_path / "base")
  hf_model.save_pretrained(d)
  model, params = mt.load_pretrained(d)
  assert model.config.llm.tie_word_embeddings == tied and model.config.llm.pad_token_id == 0
  per = model.config.image_seq_len
  rows = [[1, 5] + hf_tiny.image_tokens(per, 1) + [20, 8, 23, 10], [1, 20, 0, 60, 23]]
  ids, mask = hf_tiny.padded_batch(rows, "right")
  px = np.random.RandomState(0).randn(1, 28, 28, 3).astype(np.float32)
  return hf_model, model, params, (ids, mask, px), d


def saved_peft(hf_model, peft_config, out_dir: str, leaf: str = "lora_B", std: float = 0.2):
  """`get_peft_model(hf_model, peft_config)` with its `leaf` parameters (zero at init) drawn from
  N(0, std) under seed 0, saved to `out_dir` by peft; returns the peft model."""
  from peft import get_peft_model
  torch.manual_seed(0)
  peft_model = get_peft_model(hf_model, peft_config)
  with torch.no_grad():
    for n, p in peft_model.named_parameters():
      if leaf in n:
        p.normal_(0, std)
  peft_model.save_pretrained(out_dir)
  return peft_model


def adapter_tensors(path: str) -> dict:
  """{name: numpy array} of the `adapter_model.safetensors` in directory `path`."""
  import os
  from safetensors import safe_open
  with safe_open(os.path.join(path, "adapter_model.safetensors"), "pt") as f:
    return {k: f.get_tensor(k).numpy() for k in f.keys()}


def randomize(tree: dict, names: tuple[str, ...], seed: int = 0, scale: float = 0.3) -> dict:
  """Replace the leaves called `names` by random values (so deltas are not zero)."""
  rng = np.random.RandomState(seed)

  def fn(path, x):
    if path[-1].key in names:
      return jnp.asarray(rng.randn(*x.shape).astype(np.float32) * scale)
    return x
  return jax.tree_util.tree_map_with_path(fn, tree)


def ours_logits(model, variables, batch) -> np.ndarray:
  ids, mask, px = batch
  return np.asarray(model.apply(variables, ids, mask, pixel_values=px))


def hf_px(px):
  return torch.tensor(np.ascontiguousarray(px.transpose(0, 3, 1, 2)))


def torch_logits(peft_model, batch) -> np.ndarray:
  ids, mask, px = batch
  with torch.no_grad():
    out = peft_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     pixel_values=hf_px(px), position_ids=torch.tensor(hf_tiny.positions(mask)))
  return out.logits.numpy()


def ce_loss_jax(logits, ids, mask):
  """Mean next-token cross-entropy over real target tokens."""
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  tgt = jnp.asarray(ids[:, 1:])
  w = jnp.asarray(mask[:, 1:], jnp.float32)
  nll = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
  return (nll * w).sum() / w.sum()


def ce_loss_torch(logits, ids, mask):
  logp = torch.log_softmax(logits[:, :-1], dim=-1)
  tgt = torch.tensor(ids[:, 1:])
  w = torch.tensor(mask[:, 1:], dtype=torch.float32)
  nll = -logp.gather(-1, tgt[..., None])[..., 0]
  return (nll * w).sum() / w.sum()
