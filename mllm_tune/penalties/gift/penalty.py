"""GIFT in the trainer (`penalty.name=gift`, docs/methods.md §5.3 MLLM adaptation): the registered
penalty `Gift`, its bound form `BoundGift` (the two-backward-pass optax transform) and its
state. The loss terms and AWC math are in `gift.py`."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mllm_tune import models
from mllm_tune.losses.token import next_token_nll
from mllm_tune.penalties import api as penalties
from mllm_tune.tuning.api import Method, combine, label, partition
from mllm_tune.penalties.gift.losses import (AuxLossFn, AwcState, GiftHparams, aux_importance,
                                             awc_importance, awc_penalty, caption_nll,
                                             token_distillation)
from mllm_tune.pytree import flatten, unflatten


# ----------------------------------------------------------------------------- the trainer
MODEL_INPUTS = tuple(k for k in models.MODEL_INPUTS if k != "input_ids")
TERMS = ("gift_kd", "gift_ita", "gift_awc")


@penalties.register("gift")
@dataclasses.dataclass(frozen=True)
class Gift(penalties.Penalty):
  """GIFT on any tuning method (docs/methods.md §5.3 [choice] MLLM): `weight` = lambda of L_AWC (the
  code's `l2`), kd_weight x token KD at `temperature` (T^2), ita_weight x caption NLL, static_awc."""
  family: ClassVar[str] = "gift"
  default_weight: ClassVar[float | None] = GiftHparams.awc_weight
  temperature: float = GiftHparams.temperature
  kd_weight: float = GiftHparams.kd_weight
  ita_weight: float = GiftHparams.ita_weight
  static_awc: int = GiftHparams.static_awc

  def __post_init__(self):
    super().__post_init__()
    for key in ("kd_weight", "ita_weight"):
      if not (np.isfinite(getattr(self, key)) and getattr(self, key) >= 0):
        raise penalties.PenaltyError(f"penalty.{key} must be finite and >= 0, got "
                                     f"{getattr(self, key)}")
    if int(self.static_awc) != self.static_awc or self.static_awc < 0:
      raise penalties.PenaltyError(f"penalty.static_awc must be an int >= 0, got "
                                   f"{self.static_awc}")

  @property
  def hparams(self) -> GiftHparams:
    return GiftHparams(self.temperature, self.kd_weight, self.ita_weight, 0.0, self.weight,
                       int(self.static_awc), ())

  def bind_to(self, method: Method, variables: dict, base_params: dict | None = None,
              model=None) -> tuple["BoundGift", dict]:
    """-> (BoundGift, consts): "anchor" = theta0 copies of the base leaves the method trains or
    rewrites (the teacher), "ref" = theta_ref copies of the other trainable leaves (adapters at
    their init; a trained base leaf's theta_ref is its anchor)."""
    if model is None:
      raise penalties.PenaltyError("penalty 'gift' runs the model on synthetic pairs: "
                                   "bind(..., model=model)")
    base = flatten(variables["params"] if base_params is None else base_params)
    rewritten = {"params/" + p for p, x in flatten(variables["params"]).items()
                 if x is not base.get(p)}
    flat_t = flatten(partition(variables, method.trainable(variables))[0])
    if not flat_t:
      raise penalties.PenaltyError(f"penalty 'gift': method '{label(method)}' trains nothing")
    anchored = sorted({p for p in flat_t if p.startswith("params/")} | rewritten)
    own = sorted(p for p in flat_t if p not in anchored or p in rewritten)
    consts = {"anchor": {p: jnp.array(base[p[len("params/"):]], copy=True) for p in anchored},
              "ref": {p: jnp.array(flat_t[p], copy=True) for p in own}}
    return BoundGift(self, method, model, tuple(anchored), tuple(own)), consts


class GiftState(NamedTuple):
  """The transform's state: AWC count (+ F with static_awc, else EmptyState) and this step's
  weighted terms (gift_kd, gift_ita, gift_awc: float32 scalars, for logging)."""
  awc: AwcState
  terms: dict


@dataclasses.dataclass(frozen=True, eq=False)
class BoundGift:
  """GIFT bound to a method and model, the trainer-facing twin of `penalties.BoundPenalty`
  (module docstring, last paragraph). The aux pass runs without dropout."""
  penalty: Gift
  method: Method
  model: Any
  anchored: tuple[str, ...]   # "params/..." leaves with a theta0 copy in consts["anchor"]
  own_ref: tuple[str, ...]    # trainable leaves with their own theta_ref in consts["ref"]
  name: ClassVar[str] = "gift"
  needs_teacher: ClassVar[bool] = False  # no teacher on the downstream batch

  @property
  def active(self) -> bool:
    """False when all three weights are 0: the step is then the plain one, bit for bit."""
    p = self.penalty
    return max(p.weight, p.kd_weight, p.ita_weight) > 0

  def teacher_variables(self, frozen: dict, consts: dict) -> dict:
    return penalties.theta0_variables(frozen, consts)

  def reference(self, trainable: dict, consts: dict) -> dict:
    """theta_ref shaped like the trainable partition."""
    flat = {**consts["anchor"], **consts["ref"]}
    return unflatten({p: flat[p] for p in flatten(trainable)})

  def gradients(self, trainable: dict, frozen: dict, consts: dict, batch: dict,
                state: GiftState) -> tuple[dict, GiftState]:
    """(g_aux + grad L_AWC at `trainable`, new state); `batch`: a caption batch (B, T) with
    pixel_values (M, H, W, 3), built like the training data (data.synthetic_pairs)."""
    hp = self.penalty.hparams
    ids, mask = batch["input_ids"], batch["loss_mask"]
    kw = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    logits = lambda v: self.model.apply(v, ids, **kw)
    zero = jnp.zeros((), jnp.float32)

    def aux_fn(t):  # the teacher runs in here: static_awc skips it with the aux pass
      z = logits(combine(t, frozen))
      kd = zero if hp.kd_weight == 0 else token_distillation(
          z, jax.lax.stop_gradient(logits(self.teacher_variables(frozen, consts))), mask,
          hp.temperature)
      ita = caption_nll(z, ids, mask) if hp.ita_weight > 0 else zero
      return hp.kd_weight * kd + hp.ita_weight * ita, {"kd": kd, "ita": ita}

    if hp.kd_weight > 0 or hp.ita_weight > 0:
      g, importance, terms = aux_importance(aux_fn, trainable, state.awc, hp)
    else:  # g_aux = 0: F is EXCLUDED_IMPORTANCE everywhere, as awc_importance gives
      g = jax.tree.map(jnp.zeros_like, trainable)
      importance, terms = awc_importance(g, ()), {"kd": zero, "ita": zero}
    awc = zero
    if hp.awc_weight > 0:
      awc, g_awc = jax.value_and_grad(awc_penalty)(trainable, self.reference(trainable, consts),
                                                   importance, hp.awc_weight)
      g = jax.tree.map(jnp.add, g, g_awc)
    logged = {"gift_kd": hp.kd_weight * terms["kd"], "gift_ita": hp.ita_weight * terms["ita"],
              "gift_awc": awc}
    kept = importance if hp.static_awc else state.awc.importance
    return g, GiftState(AwcState(kept, state.awc.count + 1), logged)

  def transform(self) -> optax.GradientTransformationExtraArgs:
    """`g <- g + g_aux + grad(L_AWC)`; extra update arguments `frozen=`, `penalty_consts=`,
    `penalty_batch=` (identity when inactive)."""
    def init(params):
      imp = (jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), params)
             if self.penalty.static_awc else optax.EmptyState())
      return GiftState(AwcState(imp, jnp.zeros((), jnp.int32)),
                       {k: jnp.zeros((), jnp.float32) for k in TERMS})

    def update(updates, state, params=None, *, frozen=None, penalty_consts=None,
               penalty_batch=None, **extra):
      del extra
      if not self.active:
        return updates, state
      if params is None or frozen is None or penalty_consts is None or penalty_batch is None:
        raise penalties.PenaltyError(
            "penalty 'gift' needs update(grads, state, params, frozen=frozen_partition, "
            "penalty_consts=consts, penalty_batch=synthetic caption batch)")
      g, state = self.gradients(params, frozen, penalty_consts, penalty_batch, state)
      return jax.tree.map(lambda u, x: u + x.astype(u.dtype), updates, g), state

    return optax.GradientTransformationExtraArgs(init, update)

  def step_terms(self, opt_state) -> dict[str, jax.Array]:
    """This step's weighted terms, read from the GiftState inside `opt_state`."""
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, GiftState)):
      if isinstance(s, GiftState):
        return dict(s.terms)
    raise penalties.PenaltyError("no GIFT state in the optimizer state: chain "
                                 "bound.transform() before the optimizer")
