"""Gradient top-k / FISH mask (docs/methods.md §2.8, Sung et al. 2021): train only the weights most
important to the task, a fixed element mask chosen from data before training.

  fisher:   F_i = (1/N) sum_n (d_i log p(y_n | x_n))^2   per-sample gradients (never the square
                                                          of a batch-mean gradient)
  grad_abs: S_i = sum_batches |d_i L_batch|               [choice] variant
  mask      = global top-k of the scores over the candidate entries, k = round(density * n).

Two pure functions do the work: `importance_scores(loss_fn, variables, batches, candidates)` and
`top_k_mask(scores, density)`. The method `grad_topk` holds the resulting mask: build it with
`method = mt.tuning.get("grad_topk", density=0.005).prepare(loss_fn, variables, batches)`,
which returns a new (immutable) method; `trainable` then returns the element masks, applied as
the last optimizer link (masked entries move by exactly 0).

`loss_fn(variables, batch) -> scalar` is the negative log-likelihood of a batch (any reduction
over its samples); per-sample gradients call it on one-sample batches, scanned over the batch, so
every array in `batch` needs the sample axis first. LLaVA training batches share their image slots
across rows: `train.build.prepare_method` cuts them into samples, one per row with its own images
(`pixel_values (B, K, H, W, C)`, `train.build.sample_batches`).
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from mllm_tune import pytree
from mllm_tune.tuning.api import Method, MethodError, combine, partition, register
from mllm_tune.tuning.masks import Patterns, as_patterns, rules_mask, variables_mask

KINDS = ("fisher", "grad_abs")
LossFn = Callable[[dict, Any], jax.Array]


def _per_sample_sq_grad_sum(loss_fn: LossFn, frozen: dict):
  """Batch -> sum over its samples of the squared per-sample gradients (trainable tree): the
  per-example engine of fisher.py with chunks of one sample scanned over the batch, so memory
  stays at two copies of the trainable leaves for any batch size."""
  from mllm_tune.importance.fisher import per_example_sums
  engine = per_example_sums(lambda v, example, key: loss_fn(
      v, jax.tree.map(lambda x: x[None], example)))

  def fn(train, batch):
    n = _batch_size(batch)
    zeros = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), train)
    keys = jax.random.split(jax.random.key(0), n).reshape((n, 1))
    return engine(train, frozen, zeros, jax.tree.map(lambda x: x[:, None], batch), keys)
  return fn


def _abs_batch_grad(loss_fn: LossFn, frozen: dict):
  def fn(train, batch):
    g = jax.grad(lambda t: loss_fn(combine(t, frozen), batch))(train)
    return jax.tree.map(lambda x: jnp.abs(x.astype(jnp.float32)), g)
  return jax.jit(fn)


def _batch_size(batch) -> int:
  sizes = {int(np.shape(x)[0]) for x in jax.tree.leaves(batch)}
  if len(sizes) != 1:
    raise MethodError(f"every array of a batch needs the same leading (sample) axis; got sizes "
                      f"{sorted(sizes)}")
  return sizes.pop()


def importance_scores(loss_fn: LossFn, variables: dict, batches: Iterable, candidates: dict,
                      kind: str = "fisher") -> dict[str, np.ndarray]:
  """{flat variables path: float32 scores} for the leaves `candidates` (a mask tree) selects;
  entries a partial mask excludes get -inf. Gradients only w.r.t. the candidate leaves."""
  if kind not in KINDS:
    raise MethodError(f"grad_topk: kind must be one of {KINDS}, got {kind!r}")
  train, frozen = partition(variables, candidates)
  step = (_per_sample_sq_grad_sum if kind == "fisher" else _abs_batch_grad)(loss_fn, frozen)
  total, n = None, 0
  for batch in batches:
    s = step(train, batch)
    total = s if total is None else jax.tree.map(jnp.add, total, s)
    n += _batch_size(batch)
  if total is None:
    raise MethodError("grad_topk: the calibration batches are empty")
  flat_m = pytree.flatten(candidates)
  out = {}
  for p, x in pytree.flatten(total).items():
    score = np.asarray(x / n if kind == "fisher" else x, np.float32)
    m = flat_m[p]
    out[p] = score if isinstance(m, (bool, np.bool_)) else np.where(
        np.broadcast_to(np.asarray(m, bool), score.shape), score, -np.inf).astype(np.float32)
  return out


def top_k_mask(scores: dict[str, np.ndarray], density: float) -> dict[str, np.ndarray]:
  """Global top-k (k = max(1, round(density * #finite entries))) -> {path: bool mask}; ties at
  the threshold are broken in path order, so exactly k entries are True."""
  if not 0.0 < density <= 1.0:
    raise MethodError(f"grad_topk: density must be in (0, 1], got {density}")
  paths = sorted(scores)
  flat = np.concatenate([scores[p].reshape(-1) for p in paths])
  n = int(np.isfinite(flat).sum())
  k = max(1, int(round(density * n)))
  keep = np.zeros(flat.shape, bool)
  keep[np.argsort(-flat, kind="stable")[:k]] = True
  out, start = {}, 0
  for p in paths:
    size = scores[p].size
    out[p] = keep[start:start + size].reshape(scores[p].shape)
    start += size
  return out


class ElementMask:
  """Immutable `{flat variables path: bool array}` that hashes and compares by content, so a
  method holding it stays a valid (hashable) static argument."""

  def __init__(self, masks: dict[str, np.ndarray]):
    self._masks = {}
    digest = hashlib.sha256()
    for p in sorted(masks):
      m = np.array(masks[p], bool)
      m.setflags(write=False)
      self._masks[p] = m
      digest.update(f"{p}:{m.shape}".encode())
      digest.update(np.packbits(m).tobytes())
    self._key = digest.hexdigest()

  def items(self):
    return self._masks.items()

  def __getitem__(self, path: str) -> np.ndarray:
    return self._masks[path]

  def __eq__(self, other):
    return isinstance(other, ElementMask) and other._key == self._key

  def __hash__(self):
    return hash(self._key)

  def __repr__(self):
    kept = sum(int(m.sum()) for m in self._masks.values())
    return f"ElementMask({len(self._masks)} leaves, {kept:,} entries kept)"


@register("grad_topk", "selective")
@dataclasses.dataclass(frozen=True)
class GradTopK(Method):
  """FISH / gradient top-k (see the module docstring). `targets`: candidate leaves [choice:
  the LLM and projector]; `density`: kept fraction of them (k = 0.5%); `kind`: fisher |
  grad_abs. `mask` (an `ElementMask`) is set by `prepare`."""
  density: float = 0.005
  targets: Patterns = r"llm/.*|projector/.*"
  kind: str = "fisher"
  mask: ElementMask | None = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise MethodError(f"grad_topk: kind must be one of {KINDS}, got {self.kind!r}")
    if not 0.0 < self.density <= 1.0:
      raise MethodError(f"grad_topk: density must be in (0, 1], got {self.density}")

  def candidates(self, variables: dict) -> dict:
    params_mask = rules_mask(variables["params"], [(p, True) for p in as_patterns(self.targets)],
                             what=f"{self.name} target")
    return variables_mask(variables, params_mask)

  def prepare(self, loss_fn: LossFn, variables: dict, batches: Iterable) -> "GradTopK":
    """A copy of this method holding the mask computed from `batches`."""
    scores = importance_scores(loss_fn, variables, batches, self.candidates(variables),
                               self.kind)
    return dataclasses.replace(self, mask=ElementMask(top_k_mask(scores, self.density)))

  def trainable(self, variables):
    if self.mask is None:
      raise MethodError("grad_topk has no mask yet: build it from task data with "
                        "method.prepare(loss_fn, variables, batches) (docs/methods.md §2.8)")
    flat = {p: False for p in pytree.flatten(variables)}
    for p, m in self.mask.items():
      if p not in flat:
        raise MethodError(f"grad_topk mask has a leaf '{p}' these variables lack")
      if np.shape(m) != np.shape(pytree.flatten(variables)[p]):
        raise MethodError(f"grad_topk mask for '{p}' has shape {np.shape(m)}, the leaf "
                          f"{np.shape(pytree.flatten(variables)[p])}")
      flat[p] = bool(m.all()) if m.all() or not m.any() else m
    return pytree.unflatten(flat)
