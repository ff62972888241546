"""Train a method on a prepared set through the trainer's own builder (`train/build.py`).

The same method preparation, partition, optimizer chain and jitted `train_step` as
`mllm-tune train`; what differs is only the data (in-memory `VqaArrays`, uniform sampling with a
seeded generator), the optimizer (AdamW with warmup + cosine decay and clipping, from arguments)
and that nothing is checkpointed or sharded. Returns the trained variables and timing.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mllm_tune import tuning
from mllm_tune.eval.vqa_sets import VqaArrays
from mllm_tune.train import build, setup
from mllm_tune.train import step as step_lib


@dataclasses.dataclass
class FitResult:
  variables: dict
  method: tuning.Method
  trainable_params: int
  total_params: int
  step_time_s: float     # median seconds per step after the first (compiled) one
  losses: list[float]


def bind_penalty(model, method, variables: dict, params: dict, penalty_cfg: dict,
                 importance_data=None, seed: int = 0):
  """A forgetting penalty (`mllm_tune.penalties`, e.g. {"name": "ewc", "weight": 1e2}) bound to
  this run -> (BoundPenalty, step constants). EWC/MAS importance is computed on θ0 over the
  leaves the method changes, from `importance_data` (batches of *general* data, docs/methods.md
  §5.1)."""
  from mllm_tune.importance import fisher
  from mllm_tune import penalties
  from mllm_tune.train.penalty_setup import changed_leaves
  penalty = penalties.from_config(penalty_cfg)
  scores = None
  src = penalties.importance_source(penalty)
  if src is not None:
    if importance_data is None:
      raise ValueError(f"penalty '{penalty.name}' needs importance data (general batches)")
    leaves, _ = changed_leaves(method, variables, params)
    kind = "mas" if src.importance == "mas" else src.fisher_kind
    scores, _ = fisher.fisher_from_batches(
        model, {"params": params, "adapters": {}}, leaves, importance_data, kind,
        int(penalty_cfg.get("fisher_samples", 256)), chunk=8, rng=jax.random.key(seed))
  return penalties.bind(penalty, method, variables, base_params=params, importance=scores,
                        model=model)


def fit(model, method: tuning.Method, params: dict, data: VqaArrays, spec, *, steps: int,
        batch_size: int, learning_rate: float, seed: int, warmup_steps: int = 0,
        weight_decay: float = 0.0, clip_norm: float = 1.0, progress=None,
        penalty: dict | None = None, importance_data=None) -> FitResult:
  """`steps` AdamW steps (cosine decay after linear warmup) of `method` on `data`, with an
  optional forgetting `penalty` config (see `bind_penalty`). `weight_decay` spares biases and
  normalization weights, as the trainer's default (`train.setup.decays`).

  Batches draw rows uniformly with `numpy.random.default_rng(seed)`, the adapter init uses
  `jax.random.key(seed)`: one seed fixes the whole run. `progress(n, loss)` is called per step.
  """
  if steps < 1:
    raise ValueError(f"steps={steps}: must be >= 1")
  rng = np.random.default_rng(seed)
  variables = method.init_variables(jax.random.key(seed), params)
  draw = lambda: data.batch(rng.integers(0, len(data), batch_size), spec)
  if build.needs_preparing(method):  # the summed NLL of 4 drawn batches (draws only then)
    method = build.prepare_method(method, model, variables, [draw() for _ in range(4)],
                                  per_token=False)
  mask, n_train = build.trainable_mask(method, variables, log=False)
  n_total = tuning.api.trainable_table(variables, mask)[2]
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(warmup_steps, 0),
                                                max(steps, warmup_steps + 1))
  inner = optax.chain(optax.clip_by_global_norm(clip_norm), optax.scale_by_adam(),
                      setup.masked_decay(weight_decay, setup.decay_mask),
                      optax.scale_by_learning_rate(schedule))
  bound, consts = None, None
  if penalty:
    bound, consts = bind_penalty(model, method, variables, params, penalty, importance_data, seed)
  run = build.assemble(model, method, variables, mask, inner, penalty=bound)
  frozen = run.frozen
  state = step_lib.TrainState(step=jnp.int32(0), trainable=run.trainable,
                              opt_state=run.optimizer.init(run.trainable),
                              rng=jax.random.key(seed + 1))
  # The step donates the state: give every leaf its own buffer (optimizer states such as
  # SPIDER's θ0 alias the params, and the params alias the caller's `params`).
  state = jax.tree.map(jnp.copy, state)
  train_step = jax.jit(functools.partial(step_lib.train_step, run.fns), donate_argnums=(1,))
  losses, times = [], []
  for i in range(steps):
    t0 = time.perf_counter()
    state, metrics = train_step(frozen, state, draw(), None, consts)
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
      raise FloatingPointError(f"non-finite loss {loss} at step {i} of "
                               f"'{tuning.api.label(method)}' (lr {learning_rate})")
    times.append(time.perf_counter() - t0)
    losses.append(loss)
    if progress is not None:
      progress(i + 1, loss)
  variables = tuning.combine(state.trainable, frozen)
  return FitResult(variables, method, n_train, n_total,
                   float(np.median(times[1:])) if steps > 1 else times[0], losses)
