"""Several penalties in one run: `penalty.name="ewc+lwf"` (docs/methods.md §5.8).

A combination adds its members' terms: the quadratic pulls are one coupled gradient term before
the optimizer (the gradient of their sum), the distillation term is added to the loss from one
teacher pass of theta0. Each member keeps its own weight (`penalty.weights.<name>`, else its
default); the other options (`temperature`, `fisher_kind`, `gamma`, `beta`, ...) belong to one
family each and go to the members that have them. Every term is logged as `loss_terms/<name>`.

What may be combined [choice, to keep each run's inputs unambiguous]: at most one importance-
weighted penalty (ewc, online_ewc, mas: one importance file per run), at most one distillation
(lwf, kl: the same teacher twice), each name once, l2sp beside them; `none` and `gift` (itself a
combination of distillation and weight consolidation, with its own second backward pass) stand
alone.

`from_config` and `bind` here accept single penalties too and are the package's entry points.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

import jax.numpy as jnp

from mllm_tune.penalties import api
from mllm_tune.penalties.api import BoundPenalty, Penalty, PenaltyError

log = logging.getLogger(__name__)
SEPARATOR = "+"
ALONE = ("none", "gift")


@dataclasses.dataclass(frozen=True)
class Combination:
  """Penalties applied together (unbound); `members` in the order the name lists them."""
  members: tuple[Penalty, ...]
  family: ClassVar[str] = "combined"

  @property
  def name(self) -> str:
    return SEPARATOR.join(m.name for m in self.members)


def importance_source(penalty) -> Penalty | None:
  """The penalty (or member of a combination) whose importance (Fisher / MAS) the run needs, or
  None. Its `importance`, `fisher_kind`, `gamma` and `name` say which importance to compute."""
  members = getattr(penalty, "members", (penalty,))
  found = [m for m in members if m.importance is not None]
  return found[0] if found else None


def _check_members(name: str, names: list[str]) -> None:
  for n in names:
    if n not in api.REGISTRY:
      raise PenaltyError(f"unknown penalty '{n}' in '{name}'; known: "
                         f"{', '.join(sorted(api.REGISTRY))}")
    if n in ALONE:
      raise PenaltyError(f"penalty '{n}' cannot be combined ('{name}')" + (
          ": gift is itself distillation plus weight consolidation, with its own backward pass"
          if n == "gift" else ""))
  if len(set(names)) != len(names):
    raise PenaltyError(f"penalty '{name}' names a penalty twice")
  families = {"importance-weighted (ewc, online_ewc, mas; one importance file per run)":
              [n for n in names if api.REGISTRY[n].importance is not None],
              "distillation (lwf, kl; both distill from the same frozen base)":
              [n for n in names if api.REGISTRY[n].family == "distill"]}
  for what, found in families.items():
    if len(found) > 1:
      raise PenaltyError(f"penalty '{name}': at most one {what} penalty per run, got "
                         f"{' and '.join(found)}")


def _weight(name: str, weight, weights: dict, combined: bool):
  own = (weights or {}).get(name)
  if not combined:
    if own is not None and weight is not None and float(own) != float(weight):
      raise PenaltyError(f"penalty.weight {weight} and penalty.weights.{name} {own} disagree")
    return own if own is not None else weight
  if own is None and api.REGISTRY[name].default_weight is None:
    raise PenaltyError(f"penalty '{name}' in a combination needs penalty.weights.{name} (it "
                       "has no transferable default: sweep 1e0 ... 1e6 by decades)")
  return own


def from_config(cfg) -> Penalty | Combination:
  """The `penalty` config section -> Penalty, or a Combination for `name="a+b"` (spaces around
  names ignored). Keys a penalty lacks (file / data keys, other penalties' knobs) are ignored;
  None means the default. `weights.<name>` sets one member's weight (a weight for a penalty
  the name does not list is refused); for a combination `weight` is refused as ambiguous."""
  d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  names = [n.strip() for n in d.pop("name", "none").split(SEPARATOR)]
  name = SEPARATOR.join(names)
  weights = d.pop("weights", None) or {}
  combined = len(names) > 1
  if combined:
    _check_members(name, names)
    if d.get("weight") is not None:
      raise PenaltyError(f"penalty.weight is ambiguous for '{name}': set each member's weight "
                         f"with {', '.join(f'penalty.weights.{n}' for n in names)} and unset "
                         "penalty.weight (--config.penalty.weight=None)")
  elif name not in api.REGISTRY:
    raise PenaltyError(f"unknown penalty '{name}'; known: {', '.join(sorted(api.REGISTRY))}")
  if d.get("refresh_every") and names != ["online_ewc"]:
    raise PenaltyError(f"penalty.refresh_every refreshes online EWC's Fisher and anchor within "
                       f"the run; it needs penalty.name 'online_ewc' alone, not '{name}' (unset "
                       "it, --config.penalty.refresh_every=0)")
  stray = sorted(n for n, w in weights.items() if w is not None and n not in names)
  if stray:
    raise PenaltyError(f"penalty.weights.{stray[0]} is set but '{stray[0]}' is not in "
                       f"penalty.name '{name}' (add it, or unset the weight)")
  members = []
  for n in names:
    opts = {**d, "weight": _weight(n, d.get("weight"), weights, combined)}
    members.append(api.from_config({"name": n, **opts}))
  return Combination(tuple(members)) if combined else members[0]


@dataclasses.dataclass(frozen=True, eq=False)
class BoundCombination:
  """Bound members sharing one consts dict: the importance of the importance-weighted member
  and the union of the members' theta0 copies."""
  members: tuple[BoundPenalty, ...]

  @property
  def name(self) -> str:
    return SEPARATOR.join(m.name for m in self.members)

  @property
  def active(self) -> bool:
    return any(m.active for m in self.members)

  @property
  def needs_teacher(self) -> bool:
    return any(m.needs_teacher for m in self.members)

  @property
  def quadratic_active(self) -> bool:
    return any(m.quadratic_active for m in self.members)

  def value(self, trainable: dict, frozen: dict, consts: dict):
    """The sum of the quadratic members' terms."""
    return sum((m.value(trainable, frozen, consts) for m in self.members),
               jnp.zeros((), jnp.float32))

  def transform(self):
    return api.coupled_gradient(self)

  def teacher_variables(self, frozen: dict, consts: dict) -> dict:
    return api.theta0_variables(frozen, consts)

  def loss_terms(self, logits_BTV, teacher_BTV, batch: dict, norms: dict) -> dict:
    out = {}
    for m in self.members:
      out.update(m.loss_terms(logits_BTV, teacher_BTV, batch, norms))
    return out


def bind(penalty, method, variables: dict, base_params: dict | None = None,
         importance: dict | None = None, where: str = "importance", model=None,
         refreshed_in_run: bool = False):
  """`api.bind` for a Penalty; for a Combination each member is bound (the importance goes to
  its importance-weighted member) -> (BoundCombination, shared consts). `refreshed_in_run`: see
  `api.bind` (never for a combination's members)."""
  if not isinstance(penalty, Combination):
    return api.bind(penalty, method, variables, base_params, importance, where, model,
                    refreshed_in_run=refreshed_in_run)
  bound, consts = [], {"importance": {}, "anchor": {}}
  for m in penalty.members:
    b, c = api.bind(m, method, variables, base_params,
                    importance if m.importance is not None else None, where, model,
                    anchor_copies=consts["anchor"])
    bound.append(b)
    consts["importance"].update(c["importance"])
  log.info("penalty %s: %d theta0 copies shared by its members", penalty.name,
           len(consts["anchor"]))
  return BoundCombination(tuple(bound)), consts
