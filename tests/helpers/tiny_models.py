"""Our own tiny models and the pieces the selective-method tests share: a tiny bare Llama and a
tiny LLaVA with random params built from shapes alone, a jitted logits function, a next-token loss,
a cheap synthetic loss touching every leaf, a jitted train loop w.r.t. a method's trainable
partition, and the assertions "masked entries never move" / "optimizer state paths".

Importing this module registers every selective method (hft, grad_topk, model_tailor, by_path,
spider), as its tests expect.
"""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mllm_tune as mt
import mllm_tune.tuning.selective.hft  # noqa: F401  (registers hft)
import mllm_tune.tuning.selective.grad_topk  # noqa: F401  (registers grad_topk)
import mllm_tune.tuning.selective.model_tailor  # noqa: F401  (registers model_tailor)
import mllm_tune.tuning.selective.by_path  # noqa: F401  (registers freeze, bitfit, ln_tuning)
import mllm_tune.tuning.selective.spider  # noqa: F401  (registers spider)
from mllm_tune.models import (CausalLMConfig, LlavaConfig, LLMConfig, VisionConfig, build_model,
                              param_shapes)
from mllm_tune import pytree as select

IMAGE_TOKEN = 63


def random_params(model, seed: int = 0, scale: float = 0.1) -> dict:
  """Random params from the shapes alone (`jax.eval_shape`; a real Flax init compiles slowly on
  CPU): norm scales ~ 1 + N(0, scale^2), everything else ~ N(0, scale^2)."""
  rng = np.random.RandomState(seed)
  flat = {}
  for p, s in select.flatten(param_shapes(model)).items():
    x = rng.randn(*s.shape).astype(np.float32) * scale
    flat[p] = jnp.asarray(x + 1.0 if p.endswith("norm/scale") or "/norm" in p and
                          p.endswith("/scale") else x)
  return select.unflatten(flat)


@functools.cache
def tiny_lm():
  """A tiny bare Llama (text only) and one batch: the cheapest model to differentiate."""
  model = build_model(CausalLMConfig(llm=LLMConfig(
      vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
      num_kv_heads=2, head_dim=8)))
  ids = np.random.RandomState(0).randint(1, 60, size=(2, 10)).astype(np.int32)
  return model, random_params(model), {"input_ids": ids, "attention_mask": np.ones_like(ids)}


@functools.cache
def tiny_llava(model_type: str = "llama", square: bool = False):
  """Our own tiny CLIP + decoder LLaVA (random init) and one multimodal batch (cached: do not
  mutate the returned dicts). `square`: every LLM Linear is 32 x 32 (one compile per shape)."""
  llm = LLMConfig(model_type=model_type, vocab_size=64, hidden_size=32,
                  intermediate_size=32 if square else 48, num_layers=3, num_heads=4,
                  num_kv_heads=4 if square else 2, head_dim=8, qkv_bias=model_type == "qwen2")
  vision = VisionConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                        image_size=28, patch_size=14)
  model = build_model(LlavaConfig(vision=vision, llm=llm, image_token_id=IMAGE_TOKEN))
  params = random_params(model)
  rng = np.random.RandomState(0)
  per = model.config.image_seq_len
  ids = rng.randint(1, 60, size=(2, 12)).astype(np.int32)
  ids[:, 1:1 + per] = IMAGE_TOKEN  # one image per sample: per-sample gradients slice all arrays
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids),
           "pixel_values": rng.randn(2, 28, 28, 3).astype(np.float32)}
  return model, params, batch


def logits_fn(model):
  """Jitted `(variables, batch) -> logits` (eager Flax applies are slow on CPU)."""
  return jax.jit(lambda v, b: model.apply(v, b["input_ids"], b["attention_mask"],
                                          pixel_values=b.get("pixel_values")))


def next_token_loss(model):
  def loss(variables, batch):
    logits = model.apply(variables, batch["input_ids"], batch["attention_mask"],
                         pixel_values=batch.get("pixel_values"))
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, batch["input_ids"][:, 1:, None], axis=-1)[..., 0]
    w = batch["attention_mask"][:, 1:].astype(jnp.float32)
    return (nll * w).sum() / w.sum()
  return loss


def synthetic_loss(variables, batch):
  """A cheap smooth loss touching every entry of every leaf (params and adapters), different
  per sample (`batch["scale"]` (B,)): the masking invariants do not depend on the model."""
  total = 0.0
  for i, x in enumerate(jax.tree.leaves(variables)):
    x = x.astype(jnp.float32)
    total = total + jnp.sum(jnp.sin(x[None] * (1.0 + batch["scale"].reshape(
        (-1,) + (1,) * x.ndim)) + i))
  return total / batch["scale"].shape[0]


SYNTHETIC_BATCH = {"scale": np.asarray([0.5, 2.0], np.float32)}


def train(method, variables, loss_fn, batch, optimizer, steps: int):
  """`steps` jitted steps w.r.t. the trainable partition -> (variables, opt_state, trained)."""
  mask = method.trainable(variables)
  trained, frozen = mt.tuning.partition(variables, mask)
  opt = mt.tuning.build_optimizer(method, variables, mask, trained, optimizer)
  state = opt.init(trained)

  @jax.jit
  def step(tr, st):
    grads = jax.grad(lambda t: loss_fn(mt.tuning.combine(t, frozen), batch))(tr)
    updates, st = opt.update(grads, st, tr)
    return optax.apply_updates(tr, updates), st

  for _ in range(steps):
    trained, state = step(trained, state)
  return mt.tuning.combine(trained, frozen), state, trained


def state_paths(opt_state) -> set[str]:
  """Every dict-key path inside an optimizer state, '/'-joined (NamedTuple fields dropped)."""
  out = set()
  for path, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
    out.add("/".join(keys))
  return out


def element_mask(mask_leaf, shape) -> np.ndarray:
  return np.broadcast_to(np.asarray(mask_leaf, bool), shape)


def assert_masked_entries_fixed(before: dict, after: dict, mask: dict):
  """Entries outside the mask are bit-identical; trained entries moved somewhere."""
  flat_b, flat_a, flat_m = (select.flatten(t) for t in (before, after, mask))
  moved = 0
  for p, x0 in flat_b.items():
    x0, x1 = np.asarray(x0), np.asarray(flat_a[p])
    m = element_mask(flat_m[p], x0.shape)
    np.testing.assert_array_equal(x1[~m], x0[~m], err_msg=p)
    moved += int((x1[m] != x0[m]).sum())
  assert moved > 0


def leaves_matching(params, pattern):
  """{"params": bool tree (leaf path full-matches `pattern`), "adapters": {}}: a leaf selection."""
  flat = {p: bool(re.fullmatch(pattern, p)) for p in select.flatten(params)}
  return {"params": select.unflatten(flat), "adapters": {}}
