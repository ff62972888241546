"""Bottleneck adapters: Houlsby (serial, docs/methods.md §3.1) and parallel (He et al., 3.2).

Both add small MLPs on stacked layers; layers a target does not cover get all-zero weights (the
hooks then add exactly 0) and a frozen mask. Neither folds into the base weights (`merge` raises).

- `adapter`: on each targeted Linear output `y` (default `o_proj` and `down_proj`, before the
  residual add): `y + gelu(y Wdn + bdn) Wup + bup`, `Wdn (d, m)`, `Wup (m, d)` ~ N(0, 0.01^2)
  truncated at 2 sigma, biases 0 (near identity). Leaves `bottleneck_{down,up}[_bias]` beside the
  kernel (`layers.Linear`). Params 2 L (2 d m + m + d) for the default targets.
- `parallel_adapter`: beside each targeted FFN (module path, e.g. `llm/layers_3/mlp`):
  `FFN(x) + s relu(x Wdn) Wup`, x the FFN input. [choice] ReLU, `Wdn` Kaiming-uniform
  (torch's default, U(+-1/sqrt(d))), `Wup = 0` (exact identity at init), s = 4, m = 512 ("scaled
  PA"). Leaves `parallel_{down,up,scale}` in the FFN module (`models/adapters.parallel_adapter`).
  Params L 2 d m.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from mllm_tune.models.adapters import (BOTTLENECK_DOWN, BOTTLENECK_DOWN_BIAS, BOTTLENECK_UP,
                                       BOTTLENECK_UP_BIAS, PARALLEL_DOWN, PARALLEL_SCALE,
                                       PARALLEL_UP)
from mllm_tune import pytree
from mllm_tune.tuning.api import Method, MethodError, register
from mllm_tune.tuning.reparam.lora import adapter_path, get_leaf, resolve_targets

HOULSBY_TARGETS = r"llm/layers_\d+/(attn/o_proj|mlp/down_proj)"
FFN_TARGETS = r"llm/layers_\d+/mlp"
FFN_OUTPUT_PROJ = ("down_proj", "fc2")  # the FFN's last Linear, whose d_out is the model width
MOE_OUTPUT = "experts_down"  # a mixture-of-experts FFN's (E, F, D) output weights


def layer_values(flags: np.ndarray, values: jax.Array) -> jax.Array:
  """Zero the rows of untargeted layers of a stacked leaf (flags (L,) or () for unstacked)."""
  if flags.ndim == 0:
    return values
  return values * jnp.asarray(flags, values.dtype).reshape((-1,) + (1,) * (values.ndim - 1))


def set_masks(method: Method, variables: dict, masks: dict[str, object]) -> dict:
  """The base (all-frozen) mask with `masks` ({adapter path: mask}) filled in."""
  flat = pytree.flatten(Method.trainable(method, variables))
  for path, m in masks.items():
    key = "adapters/" + path
    if key not in flat:
      raise MethodError(f"{method.name}: adapter leaf '{path}' is missing; were the variables "
                        f"made by this method's init_variables?")
    flat[key] = m
  return pytree.unflatten(flat)


def truncated_normal(rng, shape, std: float) -> jax.Array:
  return jax.random.truncated_normal(rng, -2.0, 2.0, shape, jnp.float32) * std


# ----------------------------------------------------------------------------- Houlsby
@register("adapter", "additive")
@dataclasses.dataclass(frozen=True)
class BottleneckAdapter(Method):
  """Houlsby adapter; `train_norms` is an optional regex of norm leaves also trained (the paper
  trains the block norms, e.g. `llm/layers_\\d+/(input_norm|post_attn_norm)/scale`)."""
  mergeable = False
  bottleneck: int = 64
  targets: str | tuple[str, ...] = HOULSBY_TARGETS
  init_std: float = 0.01
  train_norms: str = ""

  def __post_init__(self):
    if self.bottleneck < 1:
      raise MethodError(f"{self.name}: bottleneck must be >= 1, got {self.bottleneck}")
    if self.init_std < 0:
      raise MethodError(f"{self.name}: init_std must be >= 0, got {self.init_std}")

  def _targets(self, params):
    return resolve_targets(params, self.targets, what="adapter target")

  def init(self, rng, params):
    out, m = {}, self.bottleneck
    for i, (path, flags) in enumerate(sorted(self._targets(params).items())):
      *lead, _, d = np.shape(get_leaf(params, path))
      k_dn, k_up = jax.random.split(jax.random.fold_in(rng, i))
      out[adapter_path(path, BOTTLENECK_DOWN)] = layer_values(
          flags, truncated_normal(k_dn, (*lead, d, m), self.init_std))
      out[adapter_path(path, BOTTLENECK_DOWN_BIAS)] = jnp.zeros((*lead, m), jnp.float32)
      out[adapter_path(path, BOTTLENECK_UP)] = layer_values(
          flags, truncated_normal(k_up, (*lead, m, d), self.init_std))
      out[adapter_path(path, BOTTLENECK_UP_BIAS)] = jnp.zeros((*lead, d), jnp.float32)
    return pytree.unflatten(out)

  def trainable(self, variables):
    masks = {}
    for path, flags in self._targets(variables["params"]).items():
      for leaf, nd in ((BOTTLENECK_DOWN, 2), (BOTTLENECK_DOWN_BIAS, 1),
                       (BOTTLENECK_UP, 2), (BOTTLENECK_UP_BIAS, 1)):
        masks[adapter_path(path, leaf)] = pytree.layer_mask(flags, nd + (flags.ndim > 0))
    mask = set_masks(self, variables, masks)
    if self.train_norms:
      mask["params"] = pytree.bool_mask(variables["params"], self.train_norms, what="norm")
    return mask


# ----------------------------------------------------------------------------- parallel
def resolve_ffns(params: dict, targets, what: str = "parallel adapter target"
                 ) -> dict[str, tuple[np.ndarray, int]]:
  """{FFN module storage path: (flags per layer (L,) or (), width d)} for matched FFN modules.

  FFN modules are the parents of a `down_proj` / `fc2` Linear or of a mixture of experts'
  `experts_down`; `targets` are anchored regexes on their logical paths (`llm/layers_3/mlp`).
  A pattern that matches nothing raises.
  """
  patterns = [targets] if isinstance(targets, str) else list(targets)
  if not patterns:
    raise MethodError(f"{what}s are empty")
  compiled = [(re.compile(p), p) for p in patterns]
  hits = {p: 0 for p in patterns}
  found, candidates = {}, []
  for leaf in pytree.leaves(params):
    parts = leaf.path.split("/")
    if len(parts) >= 3 and parts[-1] == "kernel" and parts[-2] in FFN_OUTPUT_PROJ:
      module = "/".join(parts[:-2])
    elif len(parts) >= 2 and parts[-1] == MOE_OUTPUT:  # a mixture of experts (models/moe.py)
      module = "/".join(parts[:-1])
    else:
      continue
    flags = []
    for logical, _ in pytree.logical_paths(pytree.Leaf(module, leaf.num_layers, leaf.shape)):
      candidates.append(logical)
      hit = next((p for rx, p in compiled if rx.fullmatch(logical)), None)
      if hit is not None:
        hits[hit] += 1
      flags.append(hit is not None)
    flags = np.asarray(flags if leaf.num_layers is not None else flags[0], bool)
    if flags.any():
      found[module] = (flags, leaf.shape[-1])
  for p, n in hits.items():
    if n == 0:
      near = difflib.get_close_matches(p, candidates, n=5, cutoff=0.3) or candidates[:5]
      raise pytree.SelectorError(f"{what} {p!r} matches no FFN module path (FFN modules are "
                                 f"like 'llm/layers_0/mlp'); nearby: {near}")
  return found


@register("parallel_adapter", "additive")
@dataclasses.dataclass(frozen=True)
class ParallelAdapter(Method):
  mergeable = False
  bottleneck: int = 512
  scale: float = 4.0
  targets: str | tuple[str, ...] = FFN_TARGETS

  def __post_init__(self):
    if self.bottleneck < 1:
      raise MethodError(f"{self.name}: bottleneck must be >= 1, got {self.bottleneck}")

  def init(self, rng, params):
    out, m = {}, self.bottleneck
    for i, (module, (flags, d)) in enumerate(sorted(resolve_ffns(params, self.targets).items())):
      lead = flags.shape
      bound = 1.0 / math.sqrt(d)
      down = jax.random.uniform(jax.random.fold_in(rng, i), (*lead, d, m), jnp.float32,
                                -bound, bound)
      out[f"{module}/{PARALLEL_DOWN}"] = layer_values(flags, down)
      out[f"{module}/{PARALLEL_UP}"] = jnp.zeros((*lead, m, d), jnp.float32)
      out[f"{module}/{PARALLEL_SCALE}"] = jnp.asarray(
          np.where(flags, np.float32(self.scale), np.float32(0.0)))
    return pytree.unflatten(out)

  def trainable(self, variables):
    masks = {}
    for module, (flags, _) in resolve_ffns(variables["params"], self.targets).items():
      for leaf in (PARALLEL_DOWN, PARALLEL_UP):
        masks[f"{module}/{leaf}"] = pytree.layer_mask(flags, 2 + (flags.ndim > 0))
    return set_masks(self, variables, masks)
