"""Pure-functional Flax models: LLaVA (vision tower + projector + LLM) and bare decoder LLMs."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mllm_tune.models.config import (CausalLMConfig, LLMConfig, LlavaConfig, RopeConfig,
                                     VisionConfig)
from mllm_tune.models.llava import Llava
from mllm_tune.models.kv_cache import KVCache, init_kv_cache
from mllm_tune.models.llm import LLM, CausalLM


def build_model(cfg: LlavaConfig | CausalLMConfig):
  """Config -> the (stateless) Flax module."""
  if isinstance(cfg, LlavaConfig):
    return Llava(cfg)
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


__all__ = ["build_model", "init_params", "param_shapes", "Llava", "LLM", "CausalLM", "KVCache",
           "init_kv_cache", "LlavaConfig", "CausalLMConfig", "LLMConfig", "VisionConfig",
           "RopeConfig"]
