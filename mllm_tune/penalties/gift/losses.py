"""GIFT (docs/methods.md §5.3; CVPR 2025, arXiv 2503.04229): distil the teacher on synthetic
image-text pairs and consolidate weights by their normalised Fisher on those pairs.

Checked against the released code (Luo-Jiaming/GIFT_CL `src/models/finetune_gift.py`,
`helpers.py`), per iteration with a synthetic batch of B pairs with class labels y:
  Z^S_ij = exp(logit_scale) <f_S(x_i), g_S(c_j)>   (B, B), Z^T from the teacher (no gradient)
  L_KD   = T^2 [H(softmax(Z^T/T), softmax(Z^S/T)) + H(same on transposes)],
           H(p, q) = -mean_rows sum p log q                       (`distillation`: a soft-target CE)
  L_ITA  = CE_ls(Z^S, Y^) + CE_ls(Z^S^T, Y^),  Y^_ij = 1[y_i = y_j] / sum_j 1[y_i = y_j]
  L_CE   = CE_ls(Z(task images, class prompts), task labels)   (the downstream loss)
  g_aux  = grad(kd_weight L_KD + ita_weight L_ITA)
  F      = g_aux^2 / mean(g_aux^2) per tensor (constant), L_AWC = lambda sum F (theta - theta_ref)^2
  grad   = g_aux + grad(L_CE + L_AWC)           (two backward passes; the code's accumulation)
CE_ls is torch's `cross_entropy(..., label_smoothing=eps)`, which mixes a soft target with the
uniform distribution before the CE: `t' = (1 - eps) t + eps / C` (C = number of columns); so Y^
is smoothed like a one-hot label.

"Per tensor" means per *logical* tensor: a stacked leaf (`<root>/layers/...`, leading axis L)
is normalised layer by layer, as the code normalises each torch parameter. Frozen leaves
(`frozen` regexes, default `logit_scale`, frozen in the code) get the code's constant importance
1e-6 and a zero gradient; a tensor whose aux gradient is all zero (the code: `grad is None`)
also gets 1e-6 [choice: the code would divide 0 by 0 for a present but all-zero gradient].
F is recomputed every iteration from this batch's g_aux at the current weights. (Leaves whose
true gradient is exactly 0, e.g. attention key biases, get F from rounding noise, as in the code.)
`static_awc = K > 0` (ablation): F is the running mean of the first K iterations' F
(`F_t = t/(t+1) F_{t-1} + F_new/(t+1)`), then frozen; from iteration K on no aux pass is run and
the gradient is grad(L_CE + L_AWC) (the code then also keeps adding stale gradients because it no
longer zeroes them: not reproduced).

Teacher logits use the teacher's own `logit_scale` (the code uses the student's; equal, since it
is frozen). MLLM transfer ([choice], docs/methods.md §5.3): `token_distillation` (token KL with T
and T^2,
docs/methods.md §5.7, forward direction) and `caption_nll` on teacher-forced caption tokens, AWC
unchanged (`gift_gradients` takes any aux/task loss closures over any params tree).

In the trainer GIFT is a penalty (`penalty.name=gift`, class `Gift`, bound as `BoundGift`) on any
tuning method: per step a synthetic caption batch (data/synthetic_pairs.PairBatches, the training
tokenizer / template / image preprocessing) feeds the aux pass; teacher = theta0 without
adapters; g_aux is w.r.t. the trainable partition; theta_ref = the trainable leaves at the start
of training, so with LoRA [choice] AWC pulls the adapter leaves A, B toward their init (not the
merged delta: F has the shape of g_aux, i.e. of the leaves). The two backward passes share one
jitted step: the task gradient in `train.step`, then `BoundGift.transform()` (first in the
optimizer chain) adds g_aux + grad(L_AWC); its state (checkpointed with the optimizer's) holds
the static_awc count / F and the step's terms, logged as `loss_terms/gift_{kd,ita,awc}`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mllm_tune.losses.distill import tempered_log_probs, token_kl
from mllm_tune.losses.token import next_token_nll
from mllm_tune import pytree
from mllm_tune.pytree import flatten, unflatten

EXCLUDED_IMPORTANCE = 1e-6  # the code's F for logit_scale and gradient-less tensors


@dataclasses.dataclass(frozen=True)
class GiftHparams:
  """docs/methods.md §5.3 defaults (configs/methods/gift.py)."""
  temperature: float = 2.0
  kd_weight: float = 1.0
  ita_weight: float = 0.25
  label_smoothing: float = 0.2
  awc_weight: float = 1.0
  static_awc: int = 0
  frozen: tuple[str, ...] = ("logit_scale",)  # regexes (fullmatch) on "/"-joined leaf paths

  @classmethod
  def from_config(cls, c) -> GiftHparams:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: (tuple(v) if k == "frozen" else v) for k, v in dict(c).items()
                  if k in names})


# ----------------------------------------------------------------------------- loss terms
def soft_cross_entropy(logits_BC: jax.Array, target_BC: jax.Array) -> jax.Array:
  """H(t, softmax(z)) = -mean_rows sum_c t log softmax(z) (float32 scalar)."""
  logp = jax.nn.log_softmax(logits_BC.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.sum(target_BC.astype(jnp.float32) * logp, axis=-1))


def smooth(target_BC: jax.Array, label_smoothing: float) -> jax.Array:
  """torch's label smoothing of a (soft) target: (1 - eps) t + eps / C."""
  return target_BC * (1.0 - label_smoothing) + label_smoothing / target_BC.shape[-1]


def contrastive_distillation(student_NM: jax.Array, teacher_NM: jax.Array,
                             temperature: float = 2.0) -> jax.Array:
  """L_KD = T^2 [H(softmax(Z^T/T), softmax(Z^S/T)) + the same on the transposes] (docs/methods.md
  §5.3)."""
  if student_NM.ndim != 2 or student_NM.shape != teacher_NM.shape:
    raise ValueError(f"student logits {student_NM.shape} and teacher logits {teacher_NM.shape} "
                     "must be the same (N, M) matrix")
  teacher_NM = jax.lax.stop_gradient(teacher_NM.astype(jnp.float32))
  t = temperature

  def one(s, z):
    return soft_cross_entropy(s / t, jax.nn.softmax(z / t, axis=-1)) * t * t
  return one(student_NM, teacher_NM) + one(student_NM.T, teacher_NM.T)


def label_targets(labels_B: jax.Array) -> jax.Array:
  """Y^_ij = 1[y_i = y_j] / sum_j 1[y_i = y_j] (B, B): pairs of the same class share the mass."""
  same = (labels_B[:, None] == labels_B[None, :]).astype(jnp.float32)
  return same / jnp.sum(same, axis=1, keepdims=True)


def image_text_alignment(student_BB: jax.Array, labels_B: jax.Array,
                         label_smoothing: float = 0.2) -> jax.Array:
  """L_ITA = CE_ls(Z^S, Y^) + CE_ls(Z^S^T, Y^) (docs/methods.md §5.3; Y^ is symmetric)."""
  b = labels_B.shape[0]
  if student_BB.shape != (b, b):
    raise ValueError(f"image-text logits {student_BB.shape} must be (B, B) = ({b}, {b}): "
                     "caption j belongs to image j")
  target = smooth(label_targets(labels_B), label_smoothing)
  return soft_cross_entropy(student_BB, target) + soft_cross_entropy(student_BB.T, target)


def classification_loss(logits_NC: jax.Array, labels_N: jax.Array,
                        label_smoothing: float = 0.2) -> jax.Array:
  """L_CE: torch `cross_entropy(logits, labels, label_smoothing)` (mean over rows)."""
  onehot = jax.nn.one_hot(labels_N, logits_NC.shape[-1], dtype=jnp.float32)
  return soft_cross_entropy(logits_NC, smooth(onehot, label_smoothing))


def token_distillation(student_BTV: jax.Array, teacher_BTV: jax.Array, loss_mask_BT: jax.Array,
                       temperature: float = 2.0) -> jax.Array:
  """MLLM L_KD [choice]: T^2 mean_{t: mask[t]=1} KL(p_T || p_S) with p = softmax(z[t-1] / T)
  (data/targets.py convention: mask on targets, logits one slot earlier); 0 without targets."""
  t = temperature
  s = tempered_log_probs(student_BTV[:, :-1], t)
  r = tempered_log_probs(jax.lax.stop_gradient(teacher_BTV[:, :-1]), t)
  kl_BT = token_kl(r, s)
  w = (loss_mask_BT[:, 1:] > 0).astype(jnp.float32)
  return t * t * jnp.sum(kl_BT * w) / jnp.maximum(jnp.sum(w), 1.0)


def caption_nll(student_BTV: jax.Array, ids_BT: jax.Array, loss_mask_BT: jax.Array) -> jax.Array:
  """MLLM L_ITA [choice]: mean next-token NLL of the caption tokens (hard targets)."""
  nll = next_token_nll(student_BTV, ids_BT, loss_mask_BT)
  return jnp.sum(nll) / jnp.maximum(jnp.sum(loss_mask_BT > 0), 1).astype(jnp.float32)


def mllm_aux_loss(student_BTV: jax.Array, teacher_BTV: jax.Array, ids_BT: jax.Array,
                  loss_mask_BT: jax.Array, hp: GiftHparams) -> tuple[jax.Array, dict]:
  """kd_weight L_KD + ita_weight L_ITA on teacher-forced captions, and the two terms."""
  kd = token_distillation(student_BTV, teacher_BTV, loss_mask_BT, hp.temperature)
  ita = caption_nll(student_BTV, ids_BT, loss_mask_BT)
  return hp.kd_weight * kd + hp.ita_weight * ita, {"kd": kd, "ita": ita}


# ----------------------------------------------------------------------------- AWC
def _is_stacked(path: str) -> bool:
  """`<root>/layers/...` (pytree.STACKED_ROOTS), also under a partition's params/ or adapters/."""
  head, _, rest = path.partition("/")
  return pytree.is_stacked(rest if head in ("params", "adapters") else path)


def frozen_mask(params: dict, frozen: tuple[str, ...]) -> dict:
  """Leaf-bool tree: True where a `frozen` regex fullmatches the leaf path."""
  pats = [re.compile(p) for p in frozen]
  return unflatten({p: any(r.fullmatch(p) for r in pats) for p in flatten(params)})


def awc_importance(g_aux: dict, frozen: tuple[str, ...] = ("logit_scale",)) -> dict:
  """F = g^2 / mean(g^2) per logical tensor (stacked leaves per layer), stop-gradient;
  EXCLUDED_IMPORTANCE for frozen leaves and all-zero gradients (module docstring)."""
  is_frozen = flatten(frozen_mask(g_aux, frozen))
  out = {}
  for path, g in flatten(g_aux).items():
    sq = jnp.square(jax.lax.stop_gradient(g).astype(jnp.float32))
    if is_frozen[path]:
      out[path] = jnp.full(sq.shape, EXCLUDED_IMPORTANCE, jnp.float32)
      continue
    axes = tuple(range(1, sq.ndim)) if _is_stacked(path) else tuple(range(sq.ndim))
    mean = jnp.mean(sq, axis=axes, keepdims=True)
    out[path] = jnp.where(mean > 0, sq / jnp.where(mean > 0, mean, 1.0), EXCLUDED_IMPORTANCE)
  return unflatten(out)


def awc_penalty(params: dict, ref_params: dict, importance: dict, weight: float) -> jax.Array:
  """L_AWC = lambda sum_i F_i (theta_i - theta_ref_i)^2 (float32 scalar)."""
  terms = jax.tree.map(
      lambda p, r, f: jnp.sum(jax.lax.stop_gradient(f) * jnp.square(
          p.astype(jnp.float32) - jax.lax.stop_gradient(r).astype(jnp.float32))),
      params, ref_params, importance)
  return weight * sum(jax.tree.leaves(terms))


class AwcState(NamedTuple):
  importance: dict    # F, float32, shaped like params
  count: jax.Array    # int32 (): iterations whose F has been folded in


def init_awc_state(params: dict) -> AwcState:
  return AwcState(jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params),
                  jnp.zeros((), jnp.int32))


AuxLossFn = Callable[[dict], tuple[jax.Array, dict]]


def aux_importance(aux_loss_fn: AuxLossFn, params: dict, state: AwcState, hp: GiftHparams
                   ) -> tuple[dict, dict, dict[str, jax.Array]]:
  """GIFT's first backward pass -> (g_aux, F, aux terms). `static_awc = K > 0`: F is the running
  mean of the first K iterations' F, then frozen, and no aux pass runs (g_aux = 0, terms 0)."""
  def aux_phase(_):
    (aux, terms), g_aux = jax.value_and_grad(aux_loss_fn, has_aux=True)(params)
    new = awc_importance(g_aux, hp.frozen)
    if hp.static_awc > 0:  # running mean over the first K iterations
      n = state.count.astype(jnp.float32)
      new = jax.tree.map(lambda old, f: old * (n / (n + 1)) + f / (n + 1), state.importance, new)
    return g_aux, new, {"aux": aux, **terms}

  if hp.static_awc <= 0:
    return aux_phase(None)
  zero = jax.tree.map(jnp.zeros_like, params)
  shapes = jax.eval_shape(aux_phase, None)[2]
  static_phase = lambda _: (zero, state.importance,
                            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))
  return jax.lax.cond(state.count < hp.static_awc, aux_phase, static_phase, None)


def gift_gradients(aux_loss_fn: AuxLossFn, task_loss_fn: AuxLossFn, params: dict,
                   ref_params: dict, state: AwcState, hp: GiftHparams
                   ) -> tuple[dict, AwcState, dict[str, jax.Array]]:
  """GIFT's update direction for any model: `g_aux + grad(L_task + L_AWC)`.

  `aux_loss_fn(params) -> (kd_weight L_KD + ita_weight L_ITA, terms)`, `task_loss_fn(params) ->
  (L_CE, terms)`. Returns (gradients, new state, metrics); frozen leaves get zero gradient.
  """
  g_aux, importance, aux_terms = aux_importance(aux_loss_fn, params, state, hp)

  def total(p):
    task, terms = task_loss_fn(p)
    awc = awc_penalty(p, ref_params, importance, hp.awc_weight)
    return task + awc, {"task": task, "awc": awc, **terms}

  (_, task_terms), g_task = jax.value_and_grad(total, has_aux=True)(params)
  frozen = frozen_mask(params, hp.frozen)
  grads = jax.tree.map(lambda a, b, f: jnp.zeros_like(a) if f else a + b, g_aux, g_task, frozen)
  return grads, AwcState(importance, state.count + 1), {**aux_terms, **task_terms}


# ----------------------------------------------------------------------------- CLIP step
def clip_task_loss(model, params: dict, batch: dict, label_smoothing: float) -> jax.Array:
  """L_CE: task images vs every class prompt, `batch` = pixel_values (N, H, W, C), labels (N,),
  class_ids / class_mask (C, T)."""
  out = model.apply({"params": params}, batch["pixel_values"], batch["class_ids"],
                    batch.get("class_mask"))
  return classification_loss(out.logits_per_image, batch["labels"], label_smoothing)


def clip_aux_loss(model, params: dict, teacher_logits_BB: jax.Array, batch: dict,
                  hp: GiftHparams) -> tuple[jax.Array, dict]:
  """kd_weight L_KD + ita_weight L_ITA on a synthetic batch: pixel_values (B, H, W, C),
  input_ids / attention_mask (B, T) (caption j of image j), labels (B,)."""
  z = model.apply({"params": params}, batch["pixel_values"], batch["input_ids"],
                  batch.get("attention_mask")).logits_per_image
  kd = contrastive_distillation(z, teacher_logits_BB, hp.temperature)
  ita = image_text_alignment(z, batch["labels"], hp.label_smoothing)
  return hp.kd_weight * kd + hp.ita_weight * ita, {"kd": kd, "ita": ita}


def clip_gift_gradients(model, hp: GiftHparams, params: dict, ref_params: dict,
                        teacher_params: dict, state: AwcState, task_batch: dict,
                        synth_batch: dict) -> tuple[dict, AwcState, dict]:
  """`gift_gradients` for a `models.clip.CLIP`; the teacher runs in the same trace."""
  teacher = model.apply({"params": jax.lax.stop_gradient(teacher_params)},
                        synth_batch["pixel_values"], synth_batch["input_ids"],
                        synth_batch.get("attention_mask")).logits_per_image
  aux = lambda p: clip_aux_loss(model, p, teacher, synth_batch, hp)
  task = lambda p: (clip_task_loss(model, p, task_batch, hp.label_smoothing), {})
  return gift_gradients(aux, task, params, ref_params, state, hp)


def make_gift_step(model, hp: GiftHparams, tx: optax.GradientTransformation):
  """Jitted `step(params, opt_state, awc_state, ref_params, teacher_params, task_batch,
  synth_batch) -> (params, opt_state, awc_state, metrics)`: one GIFT update of a CLIP model."""
  def step(params, opt_state, state, ref_params, teacher_params, task_batch, synth_batch):
    grads, state, metrics = clip_gift_gradients(model, hp, params, ref_params, teacher_params,
                                                state, task_batch, synth_batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, state, metrics
  return jax.jit(step)


def gift_optimizer(learning_rate: float = 1e-5, weight_decay: float = 0.0
                   ) -> optax.GradientTransformation:
  """The released optimizer: AdamW (betas 0.9 / 0.999 by default there), weight decay 0."""
  return optax.adamw(learning_rate, weight_decay=weight_decay)
