"""Visual prompt tuning, VPT (docs/methods.md §3.7; Jia et al. 2022).

Shallow: `vision/prompt_tokens (p, D_v)` inserted after the class token at the encoder input;
deep: `vision/deep_prompt_tokens (L_v, p, D_v)`, fresh prompts at every layer input (the previous
layer's prompt outputs are dropped). [choice] Inserted after CLIP's `pre_layrnorm`; prompt outputs
are removed before feature selection, so the projector sees the usual token count. Init
`U(-v, v)`, `v = sqrt(6 / (C P^2 + D_v))` (P patch size, C channels). Optional prompt dropout
(`vision/prompt_dropout`, active with a 'dropout' rng). Params p D_v (x L_v deep); no merge.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from mllm_tune.models.adapters import DEEP_PROMPT_TOKENS, PROMPT_DROPOUT, PROMPT_TOKENS
from mllm_tune import pytree
from mllm_tune.tuning.additive.bottleneck import set_masks
from mllm_tune.tuning.api import Method, MethodError, register

PATCH_KERNEL = "vision/embed/patch_kernel"
VISION_LAYERS = "vision/layers/attn/q_proj/kernel"


@register("vpt", "additive")
@dataclasses.dataclass(frozen=True)
class VPT(Method):
  mergeable = False
  num_tokens: int = 10
  deep: bool = False
  dropout: float = 0.0

  def __post_init__(self):
    if self.num_tokens < 0:
      raise MethodError(f"{self.name}: num_tokens must be >= 0, got {self.num_tokens}")
    if not 0.0 <= self.dropout < 1.0:
      raise MethodError(f"{self.name}: dropout must be in [0, 1), got {self.dropout}")

  @property
  def leaf(self) -> str:
    return DEEP_PROMPT_TOKENS if self.deep else PROMPT_TOKENS

  def init_bound(self, params) -> float:
    """`sqrt(6 / (C P^2 + D_v))` from the patch embedding kernel (P, P, C, D_v)."""
    p, _, ch, d = np.shape(pytree.flatten(params)[PATCH_KERNEL])
    return math.sqrt(6.0 / (ch * p * p + d))

  def init(self, rng, params):
    flat = pytree.flatten(params)
    if PATCH_KERNEL not in flat:
      raise MethodError(f"{self.name}: needs a vision tower ('{PATCH_KERNEL}' not found); "
                        "VPT applies to LLaVA models only")
    d = np.shape(flat[PATCH_KERNEL])[-1]
    shape = (self.num_tokens, d)
    if self.deep:
      shape = (np.shape(flat[VISION_LAYERS])[0],) + shape
    v = self.init_bound(params)
    out = {self.leaf: jax.random.uniform(rng, shape, jnp.float32, -v, v)}
    if self.dropout:
      out[PROMPT_DROPOUT] = jnp.float32(self.dropout)
    return {"vision": out}

  def trainable(self, variables):
    return set_masks(self, variables, {f"vision/{self.leaf}": self.num_tokens > 0})
