"""Penalties against forgetting (docs/methods.md §5.1, 5.2, 5.4-5.7), composable with any tuning
method.

Quadratic pulls of the weights w toward an anchor theta* (= theta0, the base this run loads):
  ewc         (lambda/2) sum F (w - theta*)^2        F: diagonal Fisher (fisher.py)
  online_ewc  (lambda/2) sum F~ (w - theta*)^2       F~ = gamma F~_prev + F (fisher.online_update)
  mas         lambda sum Omega (w - theta*)^2        Omega: MAS importance
  l2sp        (alpha/2) sum_S (w - w0)^2 + (beta/2) sum_Sbar w^2
w is the *merged* weight of the method (`method.merge`, in float32): for a LoRA-wrapped kernel
w = K0 + s A B, so the Fisher of the base kernel weighs the LoRA delta; a fully trained leaf is
itself. S = base leaves the method changes (trained or wrapped), Sbar = trainable adapter leaves
no merge folds (non-mergeable methods: prompts, bottleneck adapters). They act as optax gradient
transforms chained before the optimizer, `g <- g + grad(penalty)` (a coupled loss term), and
`value` gives the term for logging. Weight 0 skips the term (no teacher pass, no gradient op), so
the step compiles to the plain one and the trajectory is bit-identical (XLA may otherwise fuse
Adam's arithmetic differently around an added zero and differ by an ulp).

Distillation from the frozen base (teacher = theta0 without adapters), per position t in S
(supervised tokens by default, or all), normalised by the step's count of such positions:
  lwf  lambda_o * (-sum_v p0_v log q_v), p0 = softmax(z0/T), q = softmax(z/T), T = 2, no T^2
  kl   beta * KL(p_ref || p_theta) (forward) or KL(p_theta || p_ref) (reverse), T^2 if t2_scale

GIFT (`penalty.name=gift`, docs/methods.md §5.3) is defined and bound in gift/penalty.py
(`Gift.bind_to`).

`bind(penalty, method, variables, base_params, importance)` -> (BoundPenalty, consts): consts are
the step constants (importance, theta0 copies of the leaves that move), passed to the step beside
the frozen partition (not in the training checkpoints: the importance file is saved once, theta0
is the base; online EWC's in-run refresh saves each refreshed pair, train/penalty_refresh.py).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend import core as jax_core

from mllm_tune import pytree, registry
from mllm_tune.losses.distill import distill_weights, kl_sum, lwf_sum
from mllm_tune.penalties.terms import quadratic
from mllm_tune.tuning.api import Method, MethodError, combine, label, partition

log = logging.getLogger(__name__)
REGISTRY: dict[str, type["Penalty"]] = {}


class PenaltyError(ValueError):
  """Bad penalty name or config, or a penalty over parameters the method does not train."""


def register(name: str):
  """Class decorator naming a penalty; `register_module` (called for the one list of penalty
  modules in `penalties/__init__.py`) puts it in the registry."""
  return lambda cls: registry.mark(cls, name)


def register_module(module) -> None:
  """Registers every Penalty class `module` defines with `@register` (by its registry name)."""
  registry.collect(module, REGISTRY, PenaltyError, "penalty")


CHOICES = {"fisher_kind": ("empirical", "true"), "tokens": ("supervised", "all"),
           "direction": ("forward", "reverse")}


@register("none")
@dataclasses.dataclass(frozen=True)
class Penalty:
  """No penalty. Subclasses (quadratic.py, distill.py, gift/penalty.py): `family`
  quadratic | distill; `importance` fisher | mas | None;
  the quadratic term is `coef = factor * weight` times sum importance (w - theta*)^2."""
  name: ClassVar[str] = "none"
  family: ClassVar[str] = "none"
  importance: ClassVar[str | None] = None
  default_weight: ClassVar[float | None] = 0.0
  factor: ClassVar[float] = 0.0
  weight: float | None = None

  def __post_init__(self):
    if self.weight is None:
      if self.default_weight is None:
        raise PenaltyError(f"penalty '{self.name}' needs penalty.weight (it has no "
                           "transferable default: sweep 1e0 ... 1e6 by decades)")
      object.__setattr__(self, "weight", float(self.default_weight))
    if not (np.isfinite(self.weight) and self.weight >= 0):
      raise PenaltyError(f"penalty '{self.name}': weight must be finite and >= 0, got "
                         f"{self.weight}")
    for key, allowed in CHOICES.items():
      if hasattr(self, key) and getattr(self, key) not in allowed:
        raise PenaltyError(f"penalty.{key} must be {' | '.join(allowed)}, got "
                           f"{getattr(self, key)!r}")
    if not 0.0 < getattr(self, "gamma", 1.0) <= 1.0:
      raise PenaltyError(f"penalty.gamma must be in (0, 1], got {self.gamma}")
    if not getattr(self, "temperature", 1.0) > 0:
      raise PenaltyError(f"penalty.temperature must be > 0, got {self.temperature}")

  @property
  def coef(self) -> float:
    return self.factor * self.weight


def get(name: str, **cfg) -> Penalty:
  """`get("ewc", weight=1e3)`; options another penalty has are rejected by name."""
  return registry.instantiate(REGISTRY, name, cfg, PenaltyError, "penalty")


def from_config(cfg) -> Penalty:
  """The `penalty` config section -> Penalty. Keys the named penalty lacks (the file/data keys,
  other penalties' knobs) are ignored; None means the penalty's default."""
  d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  name = d.pop("name", "none")
  if name not in REGISTRY:
    raise PenaltyError(f"unknown penalty '{name}'; known: {', '.join(sorted(REGISTRY))}")
  fields = {f.name for f in dataclasses.fields(REGISTRY[name])}
  return get(name, **{k: v for k, v in d.items() if k in fields and v is not None})


# ----------------------------------------------------------------------------- binding
def theta0_variables(frozen: dict, consts: dict) -> dict:
  """theta0 without adapters (the teacher): the frozen base, with the theta0 copies in
  consts["anchor"] where the method trains or rewrites base leaves."""
  flat = {p: x for p, x in pytree.flatten(frozen).items() if p.startswith("params/")}
  flat.update(consts.get("anchor", {}))
  return {"params": pytree.unflatten(flat).get("params", {}), "adapters": {}}


def _merge_dependencies(method: Method, trainable: dict, frozen: dict):
  """({params path whose merged value depends on a trainable leaf}, {trainable paths feeding
  some merged leaf}) from the jaxpr of `method.merge`; None when the method cannot merge."""
  shapes = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), t)
  try:
    closed = jax.make_jaxpr(lambda t, f: pytree.flatten(method.weight_view(combine(t, f))))(
        shapes(trainable), shapes(frozen))
  except MethodError:
    return None
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError) as e:
    log.warning("method %s: merge does not trace (%s); penalising the raw leaves",
                label(method), type(e).__name__)
    return None
  in_paths = ["/".join(str(k.key) for k in p) for tree in (trainable, frozen)
              for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  n_train = len(jax.tree.leaves(trainable))
  jaxpr = closed.jaxpr
  deps: dict[Any, frozenset] = {v: frozenset([i] if i < n_train else [])
                                for i, v in enumerate(jaxpr.invars)}
  get = lambda v: deps.get(v, frozenset()) if not isinstance(v, jax_core.Literal) \
      else frozenset()
  for eqn in jaxpr.eqns:
    s = frozenset().union(*(get(v) for v in eqn.invars))
    for o in eqn.outvars:
      deps[o] = s
  out_paths = sorted(pytree.flatten(jax.eval_shape(
      lambda t, f: method.weight_view(combine(t, f)), shapes(trainable), shapes(frozen))))
  changed, feeding = set(), set()
  for p, v in zip(out_paths, jaxpr.outvars):
    d = get(v)
    if d:
      changed.add("params/" + p)
      feeding |= {in_paths[i] for i in d}
  return changed, feeding


def penalisable(method: Method, variables: dict) -> tuple[list[str], bool, list[str]]:
  """(base leaves the method changes, as "params/..." paths; whether the merged view is used;
  trainable adapter leaves no merge folds, Sbar)."""
  mask = method.trainable(variables)
  trainable, frozen = partition(variables, mask)
  flat_t = pytree.flatten(trainable)
  trained = {p for p in flat_t if p.startswith("params/")}
  adapters = {p for p in flat_t if p.startswith("adapters/")}
  deps = _merge_dependencies(method, trainable, frozen)
  if deps is None:
    return sorted(trained), False, sorted(adapters)
  changed, feeding = deps
  return sorted(changed | trained), True, sorted(adapters - feeding)


@dataclasses.dataclass(frozen=True, eq=False)
class BoundPenalty:
  """A penalty bound to a method and its variables (static structure; arrays are in consts)."""
  penalty: Penalty
  method: Method
  merged: bool                    # weights seen through method.merge (else the raw leaves)
  weighted: tuple[str, ...]       # "params/..." leaves of the quadratic term
  anchored: tuple[str, ...]       # leaves whose theta0 copy is in consts["anchor"]
  free: tuple[str, ...]           # Sbar: "adapters/..." leaves pulled to 0 (l2sp beta)

  @property
  def name(self) -> str:
    return self.penalty.name

  @property
  def active(self) -> bool:
    """False at weight 0: the step then compiles to the plain one (bit-identical updates)."""
    return self.penalty.weight > 0

  @property
  def needs_teacher(self) -> bool:
    return self.penalty.family == "distill" and self.active

  @property
  def quadratic_active(self) -> bool:
    return self.penalty.family == "quadratic" and self.active

  def _weights(self, trainable: dict, frozen: dict) -> dict:
    variables = combine(trainable, frozen)
    if not self.merged:
      return pytree.flatten(variables)
    f32 = jax.tree.map(lambda x: x.astype(jnp.float32)
                       if jnp.issubdtype(x.dtype, jnp.floating) else x, variables["params"])
    merged = self.method.weight_view({"params": f32, "adapters": variables.get("adapters", {})})
    return {"params/" + p: x for p, x in pytree.flatten(merged).items()}

  def value(self, trainable: dict, frozen: dict, consts: dict) -> jax.Array:
    """The quadratic term at these weights (0 for distillation penalties)."""
    total = jnp.zeros((), jnp.float32)
    if not self.quadratic_active:
      return total
    w, ff = self._weights(trainable, frozen), pytree.flatten(frozen)
    # consts may be shared with other penalties (penalties.combined): only an importance-
    # weighted penalty reads the importance
    imp = consts.get("importance", {}) if self.penalty.importance else {}
    for p in self.weighted:
      anchor = consts["anchor"][p] if p in self.anchored else ff[p]
      total = total + quadratic(w[p], anchor, imp.get(p), self.penalty.coef)
    flat_t = pytree.flatten(trainable)
    for p in self.free:
      total = total + quadratic(flat_t[p], jnp.zeros((), jnp.float32), None,
                                self.penalty.beta / 2)
    return total

  def transform(self) -> optax.GradientTransformationExtraArgs:
    return coupled_gradient(self)

  def current_weights(self, trainable: dict, frozen: dict) -> dict:
    """{path: float32 w} of the weighted leaves at these weights (the merged view where the
    method merges): what a refreshed anchor theta* becomes."""
    w = self._weights(trainable, frozen)
    return {p: w[p].astype(jnp.float32) for p in self.weighted}

  @functools.cached_property
  def jitted_current_weights(self):
    """`current_weights` jitted once for this bound penalty (online EWC's anchors)."""
    return jax.jit(self.current_weights)

  def teacher_variables(self, frozen: dict, consts: dict) -> dict:
    return theta0_variables(frozen, consts)

  def loss_terms(self, logits_BTV, teacher_BTV, batch: dict, norms: dict) -> dict:
    """{name: weight * sum over positions / norms[tokens]} (empty for quadratic penalties)."""
    if not self.needs_teacher:
      return {}
    p = self.penalty
    w = distill_weights(batch, p.tokens)
    s, z0 = logits_BTV[:, :-1], teacher_BTV[:, :-1]
    if p.name == "lwf":
      total = lwf_sum(s, z0, w, p.temperature, p.t2_scale)
    else:
      total = kl_sum(s, z0, w, p.temperature, p.direction, p.t2_scale)
    return {p.name: p.weight * total / jnp.maximum(norms[p.tokens], 1.0)}


def coupled_gradient(bound) -> optax.GradientTransformationExtraArgs:
  """`g <- g + grad(bound.value)` (identity unless `bound.quadratic_active`). Needs the extra
  update arguments `frozen=` (the frozen partition) and `penalty_consts=`; stateless."""
  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None, *, frozen=None, penalty_consts=None, **extra):
    del extra
    if not bound.quadratic_active:
      return updates, state
    if params is None or frozen is None or penalty_consts is None:
      raise PenaltyError(f"penalty '{bound.name}' needs update(grads, state, params, "
                         "frozen=frozen_partition, penalty_consts=consts)")
    g = jax.grad(bound.value)(params, frozen, penalty_consts)
    return jax.tree.map(lambda u, x: u + x.astype(u.dtype), updates, g), state

  return optax.GradientTransformationExtraArgs(init, update)


def bind(penalty: Penalty, method: Method, variables: dict, base_params: dict | None = None,
         importance: dict | None = None, where: str = "importance",
         model=None, anchor_copies: dict | None = None,
         refreshed_in_run: bool = False) -> tuple[BoundPenalty, dict]:
  """-> (BoundPenalty, consts = {"importance": {path: F}, "anchor": {path: theta0 copy}}).
  `base_params`: theta0 as loaded (before `init_variables` may rewrite it, e.g. PiSSA);
  `importance` ("params/..." paths) is required by ewc / online_ewc / mas, and every leaf
  must be one the method changes (`where` names its source in errors). A penalty with its own
  `bind_to` (gift) binds itself (it needs the `model`). `anchor_copies`: theta0 copies already
  made (path -> array), reused and extended (penalties bound together share them).
  `refreshed_in_run`: the caller carries out online EWC's `refresh_every` (the Trainer does,
  train/penalty_refresh.py); elsewhere a penalty with it is refused (it would never refresh)."""
  if hasattr(penalty, "bind_to"):
    return penalty.bind_to(method, variables, base_params, model)
  base_params = variables["params"] if base_params is None else base_params
  flat_base, flat_var = pytree.flatten(base_params), pytree.flatten(variables["params"])
  mask = method.trainable(variables)
  trained = {p for p in pytree.flatten(partition(variables, mask)[0]) if p.startswith("params/")}
  rewritten = {"params/" + p for p, x in flat_var.items() if x is not flat_base.get(p)}
  changed, merged, free = penalisable(method, variables)
  weighted, anchored = (), sorted(trained | rewritten)
  # an anchor refreshed within the run (online EWC's refresh_every) moves off the base: every
  # weighted leaf then has its own float32 copy (the merged view's dtype)
  refreshing = getattr(penalty, "refresh_every", 0) > 0
  if refreshing and not refreshed_in_run:
    raise PenaltyError(f"penalty '{penalty.name}': refresh_every={penalty.refresh_every} is "
                       "carried out by the Trainer (`mllm-tune train`); here nothing would "
                       "refresh the Fisher and anchor: set refresh_every=0")
  if penalty.family == "quadratic":
    if penalty.importance is not None:
      if not importance:
        raise PenaltyError(f"penalty '{penalty.name}' needs an importance ({penalty.importance})")
      for p, x in sorted(importance.items()):
        if p not in changed:
          raise PenaltyError(
              f"{where}: leaf '{p}' is neither trained by method '{label(method)}' nor changed "
              f"by its merge (not LoRA-wrapped); a penalty on it would be a constant. The "
              f"method changes: {changed[:6]}{' ...' if len(changed) > 6 else ''}")
        if tuple(np.shape(x)) != tuple(np.shape(flat_base[p[len("params/"):]])):
          raise PenaltyError(f"{where}: leaf '{p}' has shape {tuple(np.shape(x))}, the "
                             f"parameter {tuple(np.shape(flat_base[p[len('params/'):]]))}")
      weighted = tuple(sorted(importance))
      missing = sorted(set(changed) - set(weighted))
      if missing:
        log.warning("penalty %s: %d changed leaves have no importance and are not penalised: "
                    "%s", penalty.name, len(missing), missing[:8])
    else:
      weighted = tuple(changed)
    free = tuple(free) if penalty.name == "l2sp" else ()
    anchored = sorted(weighted) if refreshing else sorted(set(anchored) & set(weighted))
    if not weighted and not free:
      raise PenaltyError(f"penalty '{penalty.name}': method '{label(method)}' changes no leaf "
                         "it could penalise")
  elif penalty.family == "none":
    anchored = []
  consts = {"importance": {p: jnp.asarray(importance[p], jnp.float32) for p in weighted}
            if penalty.importance else {},
            "anchor": {}}
  copies = {} if anchor_copies is None else anchor_copies
  for p in anchored:
    if p not in copies:
      copies[p] = jnp.array(flat_base[p[len("params/"):]], copy=True,
                            dtype=jnp.float32 if refreshing else None)
    consts["anchor"][p] = copies[p]
  bound = BoundPenalty(penalty, method, merged, tuple(weighted), tuple(anchored),
                       tuple(free) if penalty.family == "quadratic" else ())
  log.info("penalty %s (weight %g) on %d leaves%s (%s view); %d theta0 copies", penalty.name,
           penalty.weight, len(bound.weighted),
           f" + {len(bound.free)} new leaves" if bound.free else "",
           "merged" if merged else "raw", len(anchored))
  return bound, consts
