"""Pure training step: `train_step(state, batch) -> (state, metrics)`.

Gradients are taken w.r.t. the trainable partition only (`tuning.partition`): frozen leaves are
closed over, get no gradient buffers and no optimizer state. Loss = token cross-entropy over
`loss_mask` (token t is a target predicted from position t-1, the data pipeline's convention)
+ the method's `loss_terms` (+ `router_aux_loss` times a mixture-of-experts LLM's router
load-balancing loss, `losses/router.py`, logged as `loss_terms/router_aux`; expert parallelism
with a capacity factor also logs `moe_dropped`, the share of dropped pairs). Unless a method or
penalty term reads the logits, the vocabulary head and the cross-entropy run
`StepFns.loss_chunk` positions at a time (`losses/chunked.py`), so the (B, T, V) logits are never
materialized. Gradient accumulation scans over a leading micro-batch
axis and is exact: the cross-entropy is normalised by the token count of the whole step.

A forgetting penalty (`StepFns.penalty`, a `penalties.BoundPenalty`) adds its
distillation terms (teacher = the frozen base, same jit) to the loss, normalised by the step's
position count, and its quadratic term through the optimizer chain (`frozen=` and
`penalty_consts=` extra update arguments); the quadratic value is logged as
`loss_terms/<name>`. A combination (`penalties.BoundCombination`, e.g. ewc+lwf) does both, one
teacher pass, and logs each member's term under its own name. GIFT (`penalties.gift.BoundGift`)
runs its own backward pass on the synthetic caption batch `penalty_batch` inside that chain (same
jit) and logs `loss_terms/gift_*`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from mllm_tune import models
from mllm_tune.models import model_kwargs
from mllm_tune.models.adapters import ADAPTERS
from mllm_tune.losses.chunked import chunked_token_ce
from mllm_tune.losses.router import MOE_STATS, dropped_pairs, router_balance_loss, sample_count
from mllm_tune.losses.token import token_ce
from mllm_tune.tuning import api as tuning_api
from mllm_tune import pytree



@flax.struct.dataclass
class TrainState:
  step: jax.Array
  trainable: dict
  opt_state: Any
  rng: jax.Array


@dataclasses.dataclass(frozen=True)
class StepFns:
  """What the step closes over (static for jit): model, method, optimizer, frozen-leaf dtype,
  and an optional bound forgetting penalty (its arrays come as `penalty_consts`)."""
  model: Any
  method: Any
  optimizer: optax.GradientTransformation
  grad_accum: int = 1
  penalty: Any = None
  loss_chunk: int = 256  # sequence positions per chunk of the fused head + CE (0: full logits)
  router_aux_loss: float = 0.0  # MoE LLMs: weight of the router load-balancing loss (0: off)


def position_counts(micro: dict) -> dict:
  """Step-level position counts (over a leading micro-batch axis) that normalise penalty terms:
  `supervised` = targets (loss_mask), `all` = positions whose token and next token are real."""
  am = micro.get("attention_mask", jnp.ones_like(micro["input_ids"])).astype(jnp.float32)
  return {"supervised": micro["loss_mask"][..., 1:].sum().astype(jnp.float32),
          "all": (am[..., 1:] * am[..., :-1]).sum()}


def chunked_loss(fns: StepFns, variables: dict) -> bool:
  """Whether the step may compute the head + cross-entropy chunk by chunk (`losses/chunked.py`):
  enabled, no method or penalty term reads the logits, no dropout on the head (it gets no rng)."""
  if fns.loss_chunk < 1 or fns.method.needs_logits:
    return False
  if fns.penalty is not None and fns.penalty.needs_teacher:
    return False
  head_adapters = models.head_variables(fns.model, variables).get(ADAPTERS, {})
  return not any(p.endswith("dropout") for p in pytree.flatten(head_adapters))


def sown_collections(fns: StepFns) -> list[str]:
  """What the step collects from the forward pass: the MoE router statistics
  (`intermediates`) for the router loss, the dropped-pair counts (`MOE_STATS`) under a
  capacity factor."""
  llm = getattr(fns.model.config, "llm", None)
  return (["intermediates"] * bool(fns.router_aux_loss)
          + [MOE_STATS] * bool(getattr(llm, "moe_capacity_factor", 0.0)))


def _apply(fns: StepFns, variables: dict, ids, rngs, sink: dict | None, **kw):
  """`model.apply`; with a `sink` dict, also collects what the model sows into
  `sown_collections(fns)` (by collection name) into it."""
  if sink is None:
    return fns.model.apply(variables, ids, rngs=rngs, **kw)
  out, state = fns.model.apply(variables, ids, rngs=rngs, mutable=sown_collections(fns), **kw)
  sink.update(state)
  return out


def model_ce(fns: StepFns, variables: dict, batch: dict, rngs: dict | None = None,
             trained_head: bool = False, sink: dict | None = None):
  """(logits, or None when chunked; summed NLL; target count; correct count) on `batch`.
  `trained_head`: the LM head (or tied embedding) gets gradients. On several devices its
  gradient would then be reduced across the batch shards once per chunk (the chunk loop's carry),
  so it is computed in one chunk there (still without keeping the logits). `sink`: a dict that
  receives what the forward pass sows (`_apply`)."""
  ids, kw = batch["input_ids"], model_kwargs(batch)
  if chunked_loss(fns, variables):
    h = _apply(fns, variables, ids, rngs, sink, return_hidden=True, **kw)
    head_fn = lambda h_BcD, head_vars: models.apply_head(fns.model, head_vars, h_BcD)
    mesh = jax.device_count() > 1  # keep each chunk spread over the batch shards
    chunk = ids.shape[1] if trained_head and mesh else fns.loss_chunk
    return None, *chunked_token_ce(head_fn, models.head_variables(fns.model, variables), h, ids,
                                   batch["loss_mask"], chunk, per_row=mesh)
  logits = _apply(fns, variables, ids, rngs, sink, **kw)
  return logits, *token_ce(logits, ids, batch["loss_mask"])


def micro_loss(fns: StepFns, trainable, frozen, batch, rng, total_tokens, n_micro,
               penalty_consts=None, norms=None):
  variables = tuning_api.combine(trainable, frozen)
  sink = {} if sown_collections(fns) else None
  logits, nll, n, correct = model_ce(fns, variables, batch, {"dropout": rng},
                                     bool(models.head_variables(fns.model, trainable)), sink)
  terms = fns.method.loss_terms(variables, batch, logits)
  if fns.router_aux_loss:  # per micro-batch, as transformers adds it to each forward's loss
    mask = batch.get("attention_mask", jnp.ones_like(batch["input_ids"]))
    samples = sample_count(mask, batch.get("segment_ids"))  # soft prompts count per sample
    terms = {**terms, "router_aux": fns.router_aux_loss * router_balance_loss(sink, mask,
                                                                              samples)}
  loss = nll / jnp.maximum(total_tokens, 1.0) + sum(terms.values(), 0.0) / n_micro
  aux = {"nll": nll, "tokens": n, "correct": correct,
         **{f"loss_terms/{k}": v / n_micro for k, v in terms.items()}}
  dropped = None if sink is None else dropped_pairs(sink)
  if dropped is not None:  # expert parallelism with a capacity factor
    aux["moe/dropped"], aux["moe/pairs"] = dropped
  pen = fns.penalty
  if pen is not None and pen.needs_teacher:
    teacher = jax.lax.stop_gradient(fns.model.apply(
        pen.teacher_variables(frozen, penalty_consts), batch["input_ids"],
        **model_kwargs(batch)))
    norms = norms if norms is not None else position_counts(
        jax.tree.map(lambda x: x[None], batch))
    for k, v in pen.loss_terms(logits, teacher, batch, norms).items():
      loss = loss + v
      aux[f"loss_terms/{k}"] = v
  return loss, aux


def train_step(fns: StepFns, frozen: dict, state: TrainState, batch: dict,
               lr_fn: Callable[[jax.Array], jax.Array] | None = None,
               penalty_consts: dict | None = None, penalty_batch: dict | None = None):
  """One optimizer step. With `grad_accum > 1` every batch array has a leading (A,) axis.
  `penalty_consts`: the arrays of `fns.penalty` (importance, theta0 copies); `penalty_batch`:
  GIFT's synthetic caption batch for this step (B', T') (no accumulation axis)."""
  rng, step_rng = jax.random.split(state.rng)
  a = fns.grad_accum
  micro = batch if a > 1 else jax.tree.map(lambda x: x[None], batch)
  total_tokens = micro["loss_mask"][:, :, 1:].sum().astype(jnp.float32)
  extra = {}
  if fns.penalty is not None:
    extra = {"penalty_consts": penalty_consts, "norms": position_counts(micro)}
  grad_fn = functools.partial(jax.grad(micro_loss, argnums=1, has_aux=True), **extra)

  def body(carry, xs):
    grads, aux_sum = carry
    mb, i = xs
    g, aux = grad_fn(fns, state.trainable, frozen, mb, jax.random.fold_in(step_rng, i),
                     total_tokens, a)
    grads = jax.tree.map(jnp.add, grads, g)
    aux_sum = jax.tree.map(jnp.add, aux_sum, aux)
    return (grads, aux_sum), None

  if a == 1:  # no accumulation loop: the gradient is the step's buffer, not a sum into zeros
    grads, aux = grad_fn(fns, state.trainable, frozen, batch, jax.random.fold_in(step_rng, 0),
                         total_tokens, a)
  else:
    zeros = jax.tree.map(jnp.zeros_like, state.trainable)
    aux0 = jax.eval_shape(lambda: grad_fn(fns, state.trainable, frozen,
                                          jax.tree.map(lambda x: x[0], micro), step_rng,
                                          total_tokens, a)[1])
    aux0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux0)
    (grads, aux), _ = jax.lax.scan(body, (zeros, aux0), (micro, jnp.arange(a)))
  if fns.penalty is None:
    updates, opt_state = fns.optimizer.update(grads, state.opt_state, state.trainable)
  else:
    extra = {"penalty_batch": penalty_batch} if penalty_batch is not None else {}
    updates, opt_state = optax.with_extra_args_support(fns.optimizer).update(
        grads, state.opt_state, state.trainable, frozen=frozen, penalty_consts=penalty_consts,
        **extra)
    if hasattr(fns.penalty, "step_terms"):  # gift: its terms come from its transform's state
      aux.update({f"loss_terms/{k}": v for k, v in fns.penalty.step_terms(opt_state).items()})
    else:  # quadratic terms, and distillation at weight 0 (logs 0); a combination's members
      for pen in getattr(fns.penalty, "members", (fns.penalty,)):
        if f"loss_terms/{pen.name}" not in aux:
          aux[f"loss_terms/{pen.name}"] = pen.value(state.trainable, frozen, penalty_consts)
  trainable = optax.apply_updates(state.trainable, updates)
  ce = aux["nll"] / jnp.maximum(aux["tokens"], 1.0)
  terms = {k: v for k, v in aux.items() if k.startswith("loss_terms/")}
  metrics = {"loss": ce + sum(terms.values(), 0.0), "ce": ce,
             "accuracy": aux["correct"] / jnp.maximum(aux["tokens"], 1.0),
             "tokens": aux["tokens"], "grad_norm": optax.tree.norm(grads),
             "update_norm": optax.tree.norm(updates), **terms}
  if "moe/dropped" in aux:  # share of (token, expert) pairs past their expert's capacity
    metrics["moe_dropped"] = aux["moe/dropped"] / jnp.maximum(aux["moe/pairs"], 1.0)
  if lr_fn is not None:
    metrics["learning_rate"] = lr_fn(state.step)
  new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state,
                            rng=rng)
  return new_state, metrics


def eval_step(fns: StepFns, frozen: dict, trainable: dict, batch: dict) -> dict:
  """Summed NLL, token and correct counts (no dropout) for aggregation over an eval set."""
  variables = tuning_api.combine(trainable, frozen)
  _, nll, n, correct = model_ce(fns, variables, batch)
  return {"nll": nll, "tokens": n, "correct": correct}


def find_nonfinite(tree: dict) -> list[str]:
  """Paths of leaves holding NaN or Inf (host-side, for the loop's guard message)."""
  import numpy as np
  from mllm_tune import pytree
  return [p for p, x in pytree.flatten(tree).items()
          if not np.isfinite(np.asarray(x, np.float32)).all()]
