"""HFT, Half Fine-Tuning (docs/methods.md §2.4, arXiv 2404.18466): freeze half the block matrices.

Per LLM block: 2 of the 4 attention matrices {q,k,v,o} are trainable; in a random half
(`L // 2`) of the blocks 1 of the 3 FFN matrices {gate,up,down} is trainable, in the others 2.
A projection's bias (Qwen2 q/k/v) follows its kernel. [choice] Norms, embeddings, LM head and
the vision tower are frozen; the projector is `half` (one of linear_1/linear_2 at random),
`full` or `frozen` (a one-layer `linear` projector trains under `half`); `full` trains the whole
connector, with `image_newline` on anyres models (LLaVA-NeXT / OneVision) and, on Qwen models,
the merger's norm `ln_q` and Qwen3-VL's deepstack mergers, which `half` leaves frozen.

The draw is a pure function of `(seed, stage)` (`hft_selection`, traceable JAX), so the same
seed gives the same half on every host. `resample_every=None` (paper: one static draw per
training stage; for sequential tuning pass a new `seed` per stage) gives per-layer masks that
`partition` + the last-link mask apply. `resample_every=N` [extension] redraws every N steps
inside `transform`: gradients and updates are masked by the current draw and the inner
optimizer's moments of newly unfrozen entries are reset to 0; `trainable` then reports the
union (all block matrices), since any of them may be drawn.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mllm_tune import pytree
from mllm_tune.tuning.api import Method, MethodError, register
from mllm_tune.tuning.masks import num_llm_layers, variables_mask

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")
PROJECTOR_MODES = ("half", "full", "frozen")
NEWLINE = "image_newline"  # anyres models' top-level connector vector
HALF_PROJECTOR = ("projector/linear_1", "projector/linear_2")  # the draw's two connector halves


def _ranks(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Uniformly random ranks 0..n-1 along the last axis (a random permutation per row)."""
  return jnp.argsort(jnp.argsort(jax.random.uniform(key, shape), axis=-1), axis=-1)


def hft_selection(seed: int | jax.Array, num_layers: int, stage: int | jax.Array = 0
                  ) -> dict[str, jax.Array]:
  """Trainable flags per module: {"attn/q_proj": (L,) bool, ..., "projector/linear_1": ()}.

  Pure and traceable: depends only on `(seed, stage, num_layers)`.
  """
  key = jax.random.fold_in(jax.random.key(seed), stage)
  k_attn, k_heavy, k_ffn, k_proj = jax.random.split(key, 4)
  attn_LA = _ranks(k_attn, (num_layers, len(ATTN))) < 2
  heavy_L = _ranks(k_heavy, (num_layers,)) < num_layers // 2  # blocks with 2 of 3 FFN frozen
  n_ffn_L = jnp.where(heavy_L, 1, 2)
  ffn_LF = _ranks(k_ffn, (num_layers, len(FFN))) < n_ffn_L[:, None]
  first = jax.random.bernoulli(k_proj)
  out = {f"attn/{n}": attn_LA[:, i] for i, n in enumerate(ATTN)}
  out.update({f"mlp/{n}": ffn_LF[:, i] for i, n in enumerate(FFN)})
  out.update({"projector/linear_1": first, "projector/linear_2": ~first})
  return out


def _module_of(path: str) -> str | None:
  """`params/llm/layers/attn/q_proj/kernel` -> `attn/q_proj`; projector modules; else None."""
  parts = path.split("/")
  if parts[:3] == ["params", "llm", "layers"] and len(parts) == 6 and parts[3] in ("attn",
                                                                                 "mlp"):
    name = f"{parts[3]}/{parts[4]}"
    return name if parts[4] in ATTN + FFN else None
  if parts[:2] == ["params", "projector"] and len(parts) >= 4:
    return "/".join(parts[1:-1])  # projector/linear_1, projector/ln_q, projector/deepstack_0/..
  return None


def _leaf_mask(flags, shape: tuple[int, ...]) -> jax.Array:
  """(L,) flags -> (L, 1, ..) for a stacked leaf; a scalar flag stays a scalar."""
  flags = jnp.asarray(flags)
  return flags.reshape(flags.shape + (1,) * (len(shape) - flags.ndim))


def _compact(mask: np.ndarray):
  """All-true -> True, all-false -> False, else the bool array."""
  mask = np.asarray(mask, bool)
  return bool(mask.all()) if mask.all() or not mask.any() else mask


@register("hft", "selective")
@dataclasses.dataclass(frozen=True)
class HFT(Method):
  """Half Fine-Tuning; see the module docstring. Params ~ 1/2 of the block matrices."""
  seed: int = 0
  projector: str = "half"
  resample_every: int | None = None

  def __post_init__(self):
    if self.projector not in PROJECTOR_MODES:
      raise MethodError(f"hft: projector must be one of {PROJECTOR_MODES}, got "
                        f"{self.projector!r}")
    if self.resample_every is not None and self.resample_every < 1:
      raise MethodError(f"hft: resample_every must be >= 1 or None, got {self.resample_every}")

  def _flags(self, module: str, selection: dict | None):
    """Trainable flags of one module; `selection=None` -> the union over all draws."""
    if module.startswith("projector/"):
      if self.projector != "half":
        return self.projector == "full"
      if module not in HALF_PROJECTOR:  # Qwen's merger norm, Qwen3-VL's deepstack mergers
        return False
    return True if selection is None else selection[module]

  @staticmethod
  def candidate_shapes(params: dict) -> dict[str, tuple[int, ...]]:
    """{flat variables path: shape} of the leaves HFT may train (block matrices, projector)."""
    flat = pytree.flatten({"params": params})
    return {p: tuple(np.shape(x)) for p, x in flat.items() if _module_of(p) is not None}

  def stage_masks(self, shapes: dict, num_layers: int, stage: int | jax.Array = 0) -> dict:
    """{flat variables path: bool mask broadcastable to the leaf} for one draw."""
    selection = hft_selection(self.seed, num_layers, stage)
    if not any(p.startswith("params/projector/linear_2/") for p in shapes):
      selection["projector/linear_1"] = jnp.asarray(True)  # a one-layer `linear` projector
    return {p: _leaf_mask(self._flags(_module_of(p), selection), s) for p, s in shapes.items()}

  def trainable(self, variables):
    params = variables["params"]
    shapes = self.candidate_shapes(params)
    if self.resample_every is None:
      masks = self.stage_masks(shapes, num_llm_layers(params))
    else:  # any block matrix may be drawn at a later stage
      masks = {p: self._flags(_module_of(p), None) for p in shapes}
    flat = {p: False for p in pytree.flatten(params)}
    flat.update({p[len("params/"):]: _compact(np.asarray(m)) for p, m in masks.items()})
    if NEWLINE in flat:  # anyres: the connector's row-end vector goes with a full projector
      flat[NEWLINE] = self.projector == "full"
    return variables_mask(variables, pytree.unflatten(flat))

  def transform(self, variables, inner):
    if self.resample_every is None:
      return inner
    params = variables["params"]
    shapes, num_layers = self.candidate_shapes(params), num_llm_layers(params)
    return resampled_mask(inner, lambda stage: self.stage_masks(shapes, num_layers, stage),
                          self.resample_every)


class ResampleState(NamedTuple):
  count: jax.Array
  inner: optax.OptState


def resampled_mask(inner: optax.GradientTransformation, masks_at, every: int
                   ) -> optax.GradientTransformation:
  """Mask gradients and updates by `masks_at(step // every)` ({flat path: bool mask}, other
  leaves untouched); at each new stage, zero the inner state (e.g. Adam moments) of entries that
  become trainable."""
  def apply(updates, masks):
    flat = pytree.flatten(updates)
    for p, m in masks.items():
      if p in flat:
        flat[p] = jnp.where(m, flat[p], jnp.zeros_like(flat[p]))
    return pytree.unflatten(flat)

  def fresh_tree(updates, masks):
    flat = pytree.flatten(updates)
    return pytree.unflatten({p: jnp.broadcast_to(masks[p], jnp.shape(x)) if p in masks
                             else jnp.zeros(jnp.shape(x), bool) for p, x in flat.items()})

  def init(params):
    return ResampleState(jnp.zeros([], jnp.int32), inner.init(params))

  def update(updates, state, params=None):
    stage = state.count // every
    now, before = masks_at(stage), masks_at(jnp.maximum(stage - 1, 0))
    new_stage = (state.count % every == 0) & (state.count > 0)
    fresh = {p: now[p] & ~before[p] & new_stage for p in now}
    inner_state = optax.tree_utils.tree_map_params(
        inner, lambda s, m: jnp.where(m, jnp.zeros_like(s), s), state.inner,
        fresh_tree(updates, fresh), transform_non_params=lambda x: x)
    out, inner_state = inner.update(apply(updates, now), inner_state, params)
    return apply(out, now), ResampleState(state.count + 1, inner_state)

  return optax.GradientTransformation(init, update)
