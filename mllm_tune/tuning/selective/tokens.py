"""Trainable tokens (docs/methods.md §2.9; peft `TrainableTokens`, `trainable_token_indices`):
train the embedding rows of chosen tokens (e.g. tokens just added to the tokenizer) and nothing
else of the embedding table.

The rows live in the adapter leaf `llm/embed/token_rows` (n, D), initialised to the base rows, so
the method is the identity at init; `llm/embed/token_indices` (n,) int32 (frozen) says which rows
they replace (`models.embed.TokenEmbed`). Gradients and optimizer state cover only those n rows,
not the (V, D) table. With tied embeddings (`tie_word_embeddings`) the LM head reads the same
rows, as peft ties its adapter to the head. Merge writes the rows into the table. Compose with
LoRA for peft's `LoraConfig(trainable_token_indices=...)`.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from mllm_tune import pytree
from mllm_tune.models.adapters import LORA_A, TOKEN_INDICES, TOKEN_ROWS
from mllm_tune.tuning.additive.bottleneck import set_masks
from mllm_tune.tuning.api import Method, MethodError, register

EMBEDDING = "llm/embed/embedding"
CLASH = ("trainable_tokens beside LoRA on the token embedding (llm/embed): the trained rows would "
         "hide the LoRA's for those tokens, a merge would depend on the order, and peft cannot "
         "load it; use one of them")


@register("trainable_tokens", "selective")
@dataclasses.dataclass(frozen=True)
class TrainableTokens(Method):
  """`token_indices`: the token ids whose embedding rows are trained (unique, < vocab size)."""
  token_indices: tuple[int, ...] = ()

  def __post_init__(self):  # plain ints in a tuple: hashable, and JSON in our adapter files
    try:
      ids = tuple(int(i) for i in np.ravel(np.asarray(self.token_indices)))
    except (TypeError, ValueError):
      raise MethodError(f"trainable_tokens: token_indices must be token ids (ints), got "
                        f"{self.token_indices!r}") from None
    object.__setattr__(self, "token_indices", ids)

  def _indices(self, params: dict) -> np.ndarray:
    flat = pytree.flatten(params)
    if EMBEDDING not in flat:
      raise MethodError(f"trainable_tokens: the model has no embedding table '{EMBEDDING}'")
    vocab = np.shape(flat[EMBEDDING])[0]
    idx = np.asarray(self.token_indices, np.int64).reshape(-1)
    if idx.size == 0:
      raise MethodError("trainable_tokens: token_indices is empty; name the token ids to train")
    bad = [int(i) for i in idx if not 0 <= i < vocab]
    if bad:
      raise MethodError(f"trainable_tokens: token_indices {bad[:8]} are outside the vocabulary "
                        f"(0 .. {vocab - 1})")
    if len(set(idx.tolist())) != idx.size:
      raise MethodError("trainable_tokens: token_indices lists a token twice")
    return idx.astype(np.int32)

  def init(self, rng, params):
    del rng
    idx = self._indices(params)
    table = pytree.flatten(params)[EMBEDDING]
    rows = jnp.asarray(table)[jnp.asarray(idx)].astype(jnp.float32)  # n rows, not the table
    return pytree.unflatten({f"llm/embed/{TOKEN_ROWS}": rows,
                             f"llm/embed/{TOKEN_INDICES}": jnp.asarray(idx)})

  def trainable(self, variables):
    self._indices(variables["params"])
    if LORA_A in variables.get("adapters", {}).get("llm", {}).get("embed", {}):
      raise MethodError(CLASH)
    return set_masks(self, variables, {f"llm/embed/{TOKEN_ROWS}": True})

  def merge(self, variables):
    params = pytree.flatten(variables["params"])
    adapters = pytree.flatten(variables.get("adapters", {}))
    rows = adapters[f"llm/embed/{TOKEN_ROWS}"]
    idx = adapters[f"llm/embed/{TOKEN_INDICES}"]
    table = params[EMBEDDING]
    params[EMBEDDING] = table.at[jnp.asarray(idx)].set(jnp.asarray(rows).astype(table.dtype))
    return pytree.unflatten(params)
