"""Virtual-token methods on the LLM: prompt tuning, prefix tuning, LLaMA-Adapter
(docs/methods.md §3.3, 3.4, 3.6). None folds into the base weights (`merge` raises); all have a PEFT
counterpart (`additive_peft.py`). The model applies the leaves (`models/llm.py`):

- `prompt_tuning`: `llm/prompt_embeddings (n, D)`, soft tokens before the (image-merged) input.
  `prompt_init` as peft: `sample_vocab` (embedding-table rows at uniform random ids),
  `token_ids` (peft `TEXT`: the given ids repeated/truncated to n) or `random` (N(0, 1), as a
  torch Embedding).
- `prefix_tuning`: per-layer virtual keys/values `llm/prefix_{k,v} (L, n, t)`, t = K*H (no RoPE;
  heads flattened as in peft's `token_dim`, since param shapes do not tell K from H). With
  `prefix_projection` (training reparameterization, peft default off, paper on) the adapters
  hold `llm/prefix_embedding (n, t)` and the MLP `llm/prefix_mlp_{w1,b1,w2,b2}` instead, and the
  model computes `P = tanh(E W1 + b1) W2 + b2 (n, 2 L t)` each forward; `materialize` turns them
  into `prefix_k/v` (what peft stores). Init as peft: E, direct prefixes N(0, 1); MLP as torch
  Linear (U(+-1/sqrt(fan_in)) for weights and biases).
- `llama_adapter`: on the top `adapter_layers` blocks, `llm/layers/attn/adaption_prompt (L, K, D)`
  (N(0, 1)) and a zero gate `adaption_gate (L,)` (raw, peft) or `adaption_gate_tanh` (official
  `tanh(g)`); lower layers hold zeros and are frozen. Zero gate => exactly the base model.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from mllm_tune.models.adapters import (ADAPTION_GATE, ADAPTION_GATE_TANH, ADAPTION_PROMPT,
                                       PREFIX_EMBEDDING, PREFIX_K, PREFIX_MLP_B1, PREFIX_MLP_B2,
                                       PREFIX_MLP_LEAVES, PREFIX_MLP_W1, PREFIX_MLP_W2, PREFIX_V,
                                       PROMPT_EMBEDDINGS)
from mllm_tune.models.prefix import join_prefix, prefix_mlp, split_prefix
from mllm_tune import pytree
from mllm_tune.tuning.additive.bottleneck import set_masks
from mllm_tune.tuning.api import Method, MethodError, register

EMBEDDING = "llm/embed/embedding"
ATTN = "llm/layers/attn"


# ----------------------------------------------------------------------------- prompt tuning
@register("prompt_tuning", "additive")
@dataclasses.dataclass(frozen=True)
class PromptTuning(Method):
  mergeable = False
  num_virtual_tokens: int = 20
  prompt_init: str = "sample_vocab"  # sample_vocab | token_ids | random (peft prompt_tuning_init)
  init_token_ids: tuple[int, ...] = ()

  def __post_init__(self):
    if self.num_virtual_tokens < 1:
      raise MethodError(f"{self.name}: num_virtual_tokens must be >= 1")
    if self.prompt_init not in ("sample_vocab", "token_ids", "random"):
      raise MethodError(f"{self.name}: prompt_init must be sample_vocab, token_ids or random, "
                        f"got {self.prompt_init!r}")
    if self.prompt_init == "token_ids" and not self.init_token_ids:
      raise MethodError(f"{self.name}: prompt_init='token_ids' needs init_token_ids")

  def init_embeddings(self, rng, table_VD: np.ndarray) -> jax.Array:
    n = self.num_virtual_tokens
    vocab, d = np.shape(table_VD)
    if self.prompt_init == "random":
      return jax.random.normal(rng, (n, d), jnp.float32)
    if self.prompt_init == "sample_vocab":
      ids = jax.random.randint(rng, (n,), 0, vocab)
    else:
      ids = np.asarray(self.init_token_ids, np.int64)
      if ids.min() < 0 or ids.max() >= vocab:
        raise MethodError(f"{self.name}: init_token_ids must lie in [0, {vocab})")
      ids = np.tile(ids, math.ceil(n / len(ids)))[:n]
    return jnp.asarray(table_VD, jnp.float32)[ids]

  def init(self, rng, params):
    flat = pytree.flatten(params)
    if EMBEDDING not in flat:
      raise MethodError(f"{self.name}: needs an LLM embedding table at '{EMBEDDING}'")
    return {"llm": {PROMPT_EMBEDDINGS: self.init_embeddings(rng, flat[EMBEDDING])}}

  def trainable(self, variables):
    return set_masks(self, variables, {f"llm/{PROMPT_EMBEDDINGS}": True})


# ----------------------------------------------------------------------------- prefix tuning
@register("prefix_tuning", "additive")
@dataclasses.dataclass(frozen=True)
class PrefixTuning(Method):
  mergeable = False
  num_virtual_tokens: int = 20
  prefix_projection: bool = True
  encoder_hidden_size: int = 512

  def __post_init__(self):
    if self.num_virtual_tokens < 1 or self.encoder_hidden_size < 1:
      raise MethodError(f"{self.name}: num_virtual_tokens and encoder_hidden_size must be >= 1")

  def leaves(self) -> tuple[str, ...]:
    return PREFIX_MLP_LEAVES if self.prefix_projection else (PREFIX_K, PREFIX_V)

  def init(self, rng, params):
    flat = pytree.flatten(params)
    if f"{ATTN}/k_proj/kernel" not in flat:
      raise MethodError(f"{self.name}: needs an LLM with stacked layers at 'llm/layers'")
    num_layers, _, t = np.shape(flat[f"{ATTN}/k_proj/kernel"])
    n, h = self.num_virtual_tokens, self.encoder_hidden_size
    keys = jax.random.split(rng, 5)
    if not self.prefix_projection:
      # peft: one Embedding (n, 2 L t) ~ N(0, 1), stored per layer
      k, v = split_prefix(jax.random.normal(keys[0], (n, 2 * num_layers * t), jnp.float32),
                          num_layers)
      return {"llm": {PREFIX_K: k, PREFIX_V: v}}
    uni = lambda k, shape, fan_in: jax.random.uniform(k, shape, jnp.float32, -fan_in ** -0.5,
                                                      fan_in ** -0.5)
    return {"llm": {PREFIX_EMBEDDING: jax.random.normal(keys[0], (n, t), jnp.float32),
                    PREFIX_MLP_W1: uni(keys[1], (t, h), t),
                    PREFIX_MLP_B1: uni(keys[2], (h,), t),
                    PREFIX_MLP_W2: uni(keys[3], (h, 2 * num_layers * t), h),
                    PREFIX_MLP_B2: uni(keys[4], (2 * num_layers * t,), h)}}

  def trainable(self, variables):
    return set_masks(self, variables, {f"llm/{leaf}": True for leaf in self.leaves()})


def prefix_tensor(adapters: dict) -> jax.Array:
  """The flat peft prefix (n, 2 L t) from either adapter form (MLP output or prefix_k/v)."""
  llm = adapters["llm"]
  if PREFIX_EMBEDDING in llm:
    return prefix_mlp(*(jnp.asarray(llm[k], jnp.float32) for k in PREFIX_MLP_LEAVES))
  return join_prefix(*(jnp.asarray(llm[n], jnp.float32) for n in (PREFIX_K, PREFIX_V)))


def materialize(variables: dict) -> dict:
  """Variables with the prefix MLP replaced by its output `prefix_k/v (L, n, t)` (what peft
  stores; cheaper at inference)."""
  llm = variables["adapters"]["llm"]
  if PREFIX_EMBEDDING not in llm:
    return variables
  num_layers = np.shape(llm[PREFIX_MLP_W2])[1] // (2 * np.shape(llm[PREFIX_EMBEDDING])[1])
  out = {k: v for k, v in llm.items() if k not in PREFIX_MLP_LEAVES}
  out[PREFIX_K], out[PREFIX_V] = split_prefix(prefix_tensor(variables["adapters"]),
                                                  num_layers)
  return {**variables, "adapters": {**variables["adapters"], "llm": out}}


# ----------------------------------------------------------------------------- LLaMA-Adapter
@register("llama_adapter", "additive")
@dataclasses.dataclass(frozen=True)
class LlamaAdapter(Method):
  mergeable = False
  adapter_len: int = 10
  adapter_layers: int = 30
  gate_fn: str = "identity"  # identity (peft) | tanh (official code)

  def __post_init__(self):
    if self.adapter_len < 1 or self.adapter_layers < 1:
      raise MethodError(f"{self.name}: adapter_len and adapter_layers must be >= 1")
    if self.gate_fn not in ("identity", "tanh"):
      raise MethodError(f"{self.name}: gate_fn must be 'identity' or 'tanh', got "
                        f"{self.gate_fn!r}")

  @property
  def gate_leaf(self) -> str:
    return ADAPTION_GATE if self.gate_fn == "identity" else ADAPTION_GATE_TANH

  def layer_flags(self, params) -> np.ndarray:
    """(L,) bool: the top `adapter_layers` blocks."""
    flat = pytree.flatten(params)
    if f"{ATTN}/k_proj/kernel" not in flat:
      raise MethodError(f"{self.name}: needs an LLM with stacked layers at 'llm/layers'")
    num_layers = np.shape(flat[f"{ATTN}/k_proj/kernel"])[0]
    if self.adapter_layers > num_layers:
      raise MethodError(f"{self.name}: adapter_layers={self.adapter_layers} but the LLM has "
                        f"{num_layers} layers")
    return np.arange(num_layers) >= num_layers - self.adapter_layers

  def init(self, rng, params):
    flags = self.layer_flags(params)
    d = np.shape(pytree.flatten(params)[EMBEDDING])[1]
    prompt = jax.random.normal(rng, (len(flags), self.adapter_len, d), jnp.float32)
    prompt = prompt * jnp.asarray(flags, jnp.float32)[:, None, None]
    return pytree.unflatten({f"{ATTN}/{ADAPTION_PROMPT}": prompt,
                             f"{ATTN}/{self.gate_leaf}": jnp.zeros((len(flags),), jnp.float32)})

  def trainable(self, variables):
    flags = self.layer_flags(variables["params"])
    return set_masks(self, variables, {f"{ATTN}/{ADAPTION_PROMPT}": pytree.layer_mask(flags, 3),
                                       f"{ATTN}/{self.gate_leaf}": pytree.layer_mask(flags, 1)})
