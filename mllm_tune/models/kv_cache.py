"""KV caches for decoding, and the per-layer (unstacked) form of a scanned decoder.

`KVCache` holds keys (stored after RoPE) and values for every layer; `LLM.__call__` threads it
through the stack. `unstack_layers` turns a scanned model + variables into the equivalent
one-module-per-layer form that a decode loop updates in place.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mllm_tune.models.config import LLMConfig


class KVCache(NamedTuple):
  """Keys and values (L, B, K, S, H) each; with `scan_layers=False`, tuples of L (B, K, S, H)
  arrays (one buffer per layer, updated in place by a decode loop). Slots S sit next to the
  head dimension so attention reads the cache without a transposed copy."""
  k_LBKSH: jax.Array | tuple[jax.Array, ...]
  v_LBKSH: jax.Array | tuple[jax.Array, ...]


def init_kv_cache(cfg: LLMConfig, batch: int, capacity: int, dtype=jnp.float32) -> KVCache:
  if not cfg.scan_layers:
    z = lambda: tuple(jnp.zeros((batch, cfg.num_kv_heads, capacity, cfg.head_dim), dtype)
                      for _ in range(cfg.num_layers))
    return KVCache(z(), z())
  shape = (cfg.num_layers, batch, cfg.num_kv_heads, capacity, cfg.head_dim)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def kv_cache_slots(cache: KVCache) -> int:
  return jax.tree.leaves(cache.k_LBKSH)[0].shape[-2]


def unstack_layers(model, variables: dict):
  """(model with `scan_layers=False`, variables with every collection's `llm/layers` subtree
  split along its leading axis into `llm/layers_0 .. layers_{L-1}`): the same function, but each
  layer's weights and KV cache are their own buffers, so a decode loop reads them in place
  instead of slicing the stacked arrays on every token. `model` is a `Llava` or `CausalLM`.
  Unchanged when the LLM config says `decode_per_layer=False` (or is already unstacked)."""
  cfg = model.config
  if not cfg.llm.scan_layers or not cfg.llm.decode_per_layer:
    return model, variables
  n = cfg.llm.num_layers
  model = model.clone(config=dataclasses.replace(
      cfg, llm=dataclasses.replace(cfg.llm, scan_layers=False)))

  def split(col):
    if not isinstance(col, Mapping) or "layers" not in col.get("llm", {}):
      return col
    llm = dict(col["llm"])
    layers = llm.pop("layers")
    for i in range(n):
      llm[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], layers)
    return {**col, "llm": llm}
  return model, {name: split(col) for name, col in variables.items()}
