"""Pure-functional Flax models: LLaVA (vision tower + projector + LLM), Qwen2-VL / 2.5-VL / 3-VL and
bare decoder LLMs."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mllm_tune.models.config import (CausalLMConfig, LLMConfig, LlavaConfig, RopeConfig,
                                     VisionConfig)
from mllm_tune.models.llava import Llava
from mllm_tune.models.kv_cache import KVCache, init_kv_cache
from mllm_tune.models.llm import LLM, CausalLM
from mllm_tune.models.qwen_vl import QwenVL
from mllm_tune.models.qwen_vl_config import QwenVisionConfig, QwenVLConfig


MODEL_INPUTS = ("input_ids", "attention_mask", "positions", "segment_ids", "pixel_values",
                "pack_index", "pack_weight", "pack_newline", "vision_segment_ids",
                "vision_pos_hw", "vision_window_ids")


def model_kwargs(batch: dict) -> dict:
  """The model's keyword inputs of a batch (everything but `input_ids`, which is positional)."""
  kw = {k: batch[k] for k in MODEL_INPUTS if k in batch and k != "input_ids"}
  return kw


def build_model(cfg: LlavaConfig | CausalLMConfig | QwenVLConfig):
  """Config -> the (stateless) Flax module."""
  if isinstance(cfg, LlavaConfig):
    return Llava(cfg)
  if isinstance(cfg, QwenVLConfig):
    return QwenVL(cfg)
  if isinstance(cfg, CausalLMConfig):
    return CausalLM(cfg)
  raise TypeError(f"unknown model config type {type(cfg).__name__}")


def _dummy_inputs(model):
  return jnp.zeros((1, 4), jnp.int32)


def init_params(model, rng: jax.Array) -> dict:
  """Random params (HF-like init: N(0, 0.02) kernels, unit norms) for tests and demos.
  Jitted: eager init dispatches every op separately and is ~5x slower on CPU."""
  return _jitted_init(model)(rng)


@functools.lru_cache(maxsize=32)
def _jitted_init(model):
  return jax.jit(lambda rng: model.init(rng, _dummy_inputs(model))["params"])


def param_shapes(model) -> dict:
  """`jax.ShapeDtypeStruct` tree of the params, without allocating them (traced once per
  model config and process; each call gets its own copy of the tree)."""
  return jax.tree.map(lambda s: s, _param_shapes(model))


@functools.lru_cache(maxsize=32)
def _param_shapes(model) -> dict:
  return jax.eval_shape(lambda: model.init(jax.random.key(0), _dummy_inputs(model))["params"])


def head_variables(model, variables: dict) -> dict:
  """`variables` restricted to the vocabulary head (`llm/lm_head`, or `llm/embed` when the
  embeddings are tied) in every collection: what `apply_head` reads."""
  name = "embed" if model.config.llm.tie_word_embeddings else "lm_head"
  out = {}
  for col, tree in variables.items():
    sub = tree.get("llm", {}).get(name) if hasattr(tree, "get") else None
    if sub is not None:
      out[col] = {"llm": {name: sub}}
  return out


def apply_head(model, head_vars: dict, h_BTD: jax.Array) -> jax.Array:
  """float32 logits of final-normed hidden states (`model(..., return_hidden=True)`), with any
  adapters on the head applied (no dropout: no rng is passed)."""
  return model.apply(head_vars, h_BTD, method=_call_head)


def _call_head(module, h_BTD):
  return module.llm.head(h_BTD)


__all__ = ["MODEL_INPUTS", "model_kwargs", "build_model", "init_params", "param_shapes",
           "head_variables", "apply_head", "Llava", "QwenVL", "QwenVLConfig", "QwenVisionConfig",
           "LLM", "CausalLM", "KVCache", "init_kv_cache", "LlavaConfig", "CausalLMConfig",
           "LLMConfig", "VisionConfig", "RopeConfig"]
