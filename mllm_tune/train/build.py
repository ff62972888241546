"""Building a training run from its parts: what `Trainer` and the benchmark's `fit` share.

A run is a method (prepared on task data when its mask comes from data), its trainable mask, the
(trainable, frozen) partition, the optimizer chain (masks around the user's optimizer, a coupled
penalty gradient first) and the step functions. Everything here is construction without side
effects: no files, no config sections, no device placement beyond the callbacks a caller passes
(the Trainer adds its mesh, checkpoints and logs around it; `fit` runs it as it is).

    method = prepare_method(method, model, variables, batches)   # grad_topk & co.; else as is
    mask, n = trainable_mask(method, variables)
    run = assemble(model, method, variables, mask, optax.adamw(1e-4), penalty=bound)
    state = TrainState(step0, run.trainable, run.optimizer.init(run.trainable), rng)
    state, metrics = jax.jit(partial(train_step, run.fns))(run.frozen, state, batch)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import jax.numpy as jnp
import optax

from mllm_tune import tuning
from mllm_tune.importance import fisher
from mllm_tune.losses.token import token_ce
from mllm_tune.models import model_kwargs
from mllm_tune.train.setup import cast_tree
from mllm_tune.train.step import StepFns


def nll_loss(model, per_token: bool = True) -> Callable[[dict, dict], Any]:
  """`(variables, batch) -> loss` for `method.prepare`: the batch's next-token NLL over its
  supervised positions, averaged per token (`per_token`, the trainer's) or summed (the
  benchmark's `fit`). Takes training batches and stacked samples (`sample_batches`)."""
  crop_features = fisher.image_spec(model)[1]

  def loss(variables, batch):
    batch = fisher.examples_batch(batch, crop_features)
    logits = model.apply(variables, batch["input_ids"], **model_kwargs(batch))
    nll, n, _ = token_ce(logits, batch["input_ids"], batch["loss_mask"])
    return nll / jnp.maximum(n, 1.0) if per_token else nll
  return loss


def needs_preparing(method) -> bool:
  """Methods whose mask comes from task data (grad_topk without a given mask)."""
  return hasattr(method, "prepare") and getattr(method, "mask", 0) is None


def sample_batches(model, batches: Iterable[dict]) -> list[dict]:
  """Batches whose rows are samples, for methods that score per-row gradients: a batch with
  images is cut into its samples (`fisher.split_examples`: packed rows, image slots shared across
  the rows, anyres crops and pack tables), stacked one per row with the row's own images
  (`pixel_values` (N, K, H, W, C), which `nll_loss` takes); text-only batches stay as they are."""
  tok, seq = fisher.image_spec(model)
  return [fisher.stack_examples(fisher.split_examples(b, tok, seq), tok, seq)
          if "pixel_values" in b else b for b in batches]


def prepare_method(method, model, variables: dict, batches: Iterable[dict],
                   per_token: bool = True):
  """`method` with its data-derived mask computed on `batches` (unchanged when it has none);
  batches with images are cut into samples first (`sample_batches`)."""
  if not needs_preparing(method):
    return method
  return method.prepare(nll_loss(model, per_token), variables, sample_batches(model, batches))


def trainable_mask(method, variables: dict, log: bool = True) -> tuple[dict, int]:
  """(mask, number of trainable entries); a method that trains nothing raises
  `tuning.MethodError`. `log` prints the trainable table (`tuning.log_trainable`)."""
  mask = method.trainable(variables)
  if log:
    return mask, tuning.log_trainable(method, variables, mask)
  _, n_train, _ = tuning.api.trainable_table(variables, mask)
  if n_train == 0:
    raise tuning.api.trains_nothing(method)
  return mask, n_train


@dataclasses.dataclass
class Run:
  """The pieces a step needs: `fns` (static for jit), the partition and the optimizer."""
  method: Any
  mask: dict
  trainable: dict
  frozen: dict
  optimizer: optax.GradientTransformation
  fns: StepFns


def assemble(model, method, variables: dict, mask: dict,
             base_optimizer: optax.GradientTransformation, *, penalty=None, grad_accum: int = 1,
             loss_chunk: int = 256, router_aux_loss: float = 0.0, master_dtype=None,
             frozen_dtype=None,
             place_trainable: Callable[[dict], dict] | None = None,
             place_frozen: Callable[[dict], dict] | None = None) -> Run:
  """Partition `variables` by `mask`, optionally cast (trainable leaves to `master_dtype`, e.g.
  float32 master weights; the frozen base weights to `frozen_dtype`, while frozen adapter
  constants such as LoRA scales and dropout rates keep their precision: a bf16 rsLoRA scale
  8/sqrt(3) would be 4.625, not 4.6188) and place them (callbacks, e.g.
  `jax.device_put` onto a mesh), and build the optimizer chain: partial masks around
  `method.transform(base_optimizer)` (`tuning.build_optimizer`), preceded by the penalty's
  coupled gradient when a bound `penalty` is given."""
  trainable, frozen = tuning.partition(variables, mask)
  if master_dtype is not None:
    trainable = cast_tree(trainable, master_dtype)
  if frozen_dtype is not None:
    frozen = {**frozen, "params": cast_tree(frozen.get("params", {}), frozen_dtype)}
  if place_frozen is not None:
    frozen = place_frozen(frozen)
  if place_trainable is not None:
    trainable = place_trainable(trainable)
  optimizer = tuning.build_optimizer(method, variables, mask, trainable, base_optimizer)
  if penalty is not None:  # the coupled penalty gradient comes before the masks
    optimizer = optax.chain(penalty.transform(), optimizer)
  if router_aux_loss and not getattr(model.config.llm, "num_experts", 0):
    raise ValueError(f"train.router_aux_loss={router_aux_loss}: the model's LLM has no "
                     "mixture-of-experts layers (a router loss needs num_experts > 0)")
  fns = StepFns(model, method, optimizer, grad_accum, penalty=penalty, loss_chunk=loss_chunk,
                router_aux_loss=router_aux_loss)
  return Run(method, mask, trainable, frozen, optimizer, fns)
