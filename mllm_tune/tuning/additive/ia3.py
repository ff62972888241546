"""(IA)^3: learned per-channel rescaling (docs/methods.md §3.5; peft `IA3`).

`k <- l_k * k`, `v <- l_v * v` (output scaling, after the bias: leaf `ia3_out (d_out,)`), and
`down_proj(l_ff * h)` for feed-forward targets (input scaling: leaf `ia3_in (d_in,)`); init ones.
Layers of a stacked module that no target covers keep ones and a frozen mask. Merge is exact:
`K <- K diag(l_out)`, `b <- b * l_out`; `K <- diag(l_in) K`. Params L (2 t + d_ff) by default.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from mllm_tune.models.adapters import IA3_IN, IA3_OUT
from mllm_tune import pytree
from mllm_tune.tuning.additive.bottleneck import set_masks
from mllm_tune.tuning.api import Method, MethodError, register
from mllm_tune.tuning.reparam.lora import adapter_path, get_leaf, resolve_targets

IA3_TARGETS = r"llm/layers_\d+/(attn/(k|v)_proj|mlp/down_proj)"
IA3_FEEDFORWARD = r"llm/layers_\d+/mlp/down_proj"


@register("ia3", "additive")
@dataclasses.dataclass(frozen=True)
class IA3(Method):
  """`targets`: Linear modules rescaled; `feedforward`: the subset whose *input* is rescaled."""
  targets: str | tuple[str, ...] = IA3_TARGETS
  feedforward: str | tuple[str, ...] = IA3_FEEDFORWARD

  def resolve(self, params) -> dict[str, tuple[np.ndarray, str]]:
    """{kernel path: (layer flags, 'ia3_in' | 'ia3_out')} for every targeted Linear."""
    targets = resolve_targets(params, self.targets, what="ia3 target")
    patterns = [self.feedforward] if isinstance(self.feedforward, str) else list(self.feedforward)
    ff = pytree.match_layers(params, [(p, True) for p in patterns], default=False,
                             what="ia3 feedforward", require_match=False, module_level=True)
    for path, ff_flags in ff.items():
      if (np.asarray(ff_flags, bool) & ~targets.get(path, np.asarray(False))).any():
        raise MethodError(f"ia3: feedforward module {path} is not among the targets (peft "
                          "requires feedforward_modules to be a subset of target_modules)")
    out = {}
    for path, flags in targets.items():
      ff_flags = np.asarray(ff.get(path, False), bool)
      if ff_flags[flags].any() and not ff_flags[flags].all():
        raise MethodError(f"ia3: module {path} is feed-forward in some layers and not in "
                          "others; use one kind per module")
      out[path] = (flags, IA3_IN if ff_flags[flags].any() else IA3_OUT)
    return out

  def init(self, rng, params):
    del rng
    out = {}
    for path, (flags, leaf) in self.resolve(params).items():
      *lead, d_in, d_out = np.shape(get_leaf(params, path))
      out[adapter_path(path, leaf)] = jnp.ones((*lead, d_in if leaf == IA3_IN else d_out),
                                               jnp.float32)
    return pytree.unflatten(out)

  def trainable(self, variables):
    return set_masks(self, variables, {
        adapter_path(path, leaf): pytree.layer_mask(flags, 1 + (flags.ndim > 0))
        for path, (flags, leaf) in self.resolve(variables["params"]).items()})

  def merge(self, variables):
    params = pytree.flatten(variables["params"])
    adapters = pytree.flatten(variables.get("adapters", {}))
    for path, (_, leaf) in self.resolve(variables["params"]).items():
      scale = jnp.asarray(adapters[adapter_path(path, leaf)], jnp.float32)
      kernel = jnp.asarray(params[path], jnp.float32)
      if leaf == IA3_IN:
        kernel = kernel * scale[..., :, None]
      else:
        kernel = kernel * scale[..., None, :]
        bias = adapter_path(path, "bias")
        if bias in params:
          params[bias] = (jnp.asarray(params[bias], jnp.float32) * scale).astype(
              params[bias].dtype)
      params[path] = kernel.astype(params[path].dtype)
    return pytree.unflatten(params)
