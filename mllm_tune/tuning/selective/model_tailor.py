"""Model Tailor (docs/methods.md §2.6, ICML 2024, arXiv 2402.12048; didizhu-zju/Model-Tailor
`main_model_tailor.py`, `llava/train/sparsegpt.py`): post-hoc, keep a ~10% patch of the
fine-tuned weights, reset the rest to theta0 and compensate with the OBS/SparseGPT update.

Per Linear, torch layout `W (out, in)` (= kernel^T), calibration inputs x:
  1. H = (2/N_tok) sum_tokens x x^T; H_ii = 1 where H_ii = 0 (dead inputs); H += damp *
     mean(diag H) * I; U = upper Cholesky factor of H^-1 (H^-1 = U^T U).
  2. Column blocks of `block_size`: salience a = |W_ft - W0| (from the fine-tuned W, as the
     code), sensitivity s = W^2 / diag(U)^2 (current, partly compensated W); z-score each row
     of the block (ddof 1; z = 0 for a constant row); score = 0.8 z(a) + 0.2 z(s); entries with
     score <= the block's `sparsity`-quantile are reset: exactly 10% kept when 10 divides the
     block size. (The released code thresholds at sorted(score)[int(n * sparsity)], resetting
     one entry more per block.)
  3. Per column i: q = w_i with reset rows := W0[:, i]; e = (w_i - q) / U_ii;
     W[:, i:] += sign * e U[i, i:]; column i := q; after the block W[:, end:] += sign * E U[blk,
     end:]. [choice] `compensation_sign=-1` is OBS (lowers ||(W_ft - W^) X||); the released
     code adds (`+1`). `compensate=False` skips step 3's updates (kept = W_ft, rest = W0).

Model level (`tailor`): blocks in order, each fed by the already-tailored blocks before it;
the H of every Linear of block l comes from one forward pass of block l (fine-tuned weights) on
those inputs; the tailored block's outputs feed block l+1. Tailored blocks: those where theta_ft
differs from theta0 (or `layers`); [choice] their norms keep theta_ft; the projector is reset to
theta0 (as the code); every other leaf keeps theta_ft. [choice] Qwen3-VL: the deepstack visual
features the model adds to the output of its first blocks travel with the per-block state and
are added by the same blocks, so block l sees what it sees in the model.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mllm_tune.models import model_kwargs
from mllm_tune.models.layers import Linear
from mllm_tune.models.llm import LLM, DecoderBlock
from mllm_tune import pytree
from mllm_tune.tuning.api import Method, MethodError, register

LINEARS = ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj", "mlp/gate_proj",
           "mlp/up_proj", "mlp/down_proj")
MOE_LEAVES = ("mlp/router/kernel", "mlp/experts_gate_up", "mlp/experts_down")


# ----------------------------------------------------------------------------- one Linear
def inverse_hessian_factor(h_II: jax.Array, damp: float) -> jax.Array:
  """Upper Cholesky factor U of (H + damp * mean(diag H) I)^-1, dead inputs set to H_ii = 1."""
  h = jnp.asarray(h_II, jnp.float32)
  diag = jnp.diagonal(h)
  h = h + jnp.diag(jnp.where(diag == 0, 1.0, 0.0))
  h = h + jnp.eye(h.shape[0], dtype=h.dtype) * damp * jnp.mean(jnp.diagonal(h))
  lower = jnp.linalg.cholesky(h)
  h_inv = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(h.shape[0], dtype=h.dtype))
  return jnp.linalg.cholesky(h_inv).T


def _row_z(x_OB: jax.Array) -> jax.Array:
  mean = jnp.mean(x_OB, axis=1, keepdims=True)
  std = jnp.std(x_OB, axis=1, keepdims=True, ddof=1)
  return jnp.where(std > 0, (x_OB - mean) / jnp.where(std > 0, std, 1.0), 0.0)


def reset_mask(salience_OB, w_OB, u_diag_B, sparsity: float, weights=(0.8, 0.2)):
  """Step 2 for one column block: True = reset to W0."""
  sens = jnp.square(w_OB) / jnp.square(u_diag_B)[None, :]
  score = weights[0] * _row_z(salience_OB) + weights[1] * _row_z(sens)
  # score <= its `sparsity`-quantile (linear interpolation): floor(s (n-1)) + 1 entries reset
  thresh = jnp.sort(score.reshape(-1))[int(math.floor(sparsity * (score.size - 1)))]
  return score <= thresh


def _compensate_block(w_OB, w0_OB, reset_OB, u_BB, sign):
  """Step 3 inside one block: (Q columns, error columns E)."""
  cols = jnp.arange(w_OB.shape[1])

  def body(i, carry):
    w, q_all, e_all = carry
    col = w[:, i]
    q = jnp.where(reset_OB[:, i], w0_OB[:, i], col)
    err = (col - q) / u_BB[i, i]
    row = jnp.where(cols >= i, u_BB[i], 0.0)
    w = w + sign * err[:, None] * row[None, :]
    return w, q_all.at[:, i].set(q), e_all.at[:, i].set(err)

  zeros = jnp.zeros_like(w_OB)
  _, q_all, e_all = jax.lax.fori_loop(0, w_OB.shape[1], body, (w_OB, zeros, zeros))
  return q_all, e_all


@functools.partial(jax.jit, static_argnames=("sparsity", "block_size", "damp", "weights",
                                             "compensation_sign", "compensate"))
def tailor_linear(w_ft_OI, w0_OI, h_II, *, sparsity: float = 0.9, block_size: int = 128,
                  damp: float = 0.01, weights=(0.8, 0.2), compensation_sign: float = -1.0,
                  compensate: bool = True) -> tuple[jax.Array, jax.Array]:
  """Steps 1-3 for one Linear (torch layout) -> (tailored W (out, in), reset mask (out, in))."""
  w_ft = jnp.asarray(w_ft_OI, jnp.float32)
  w0 = jnp.asarray(w0_OI, jnp.float32)
  u = inverse_hessian_factor(h_II, damp)
  salience = jnp.abs(w_ft - w0)
  w = w_ft
  resets = []
  d_in = w.shape[1]
  for i1 in range(0, d_in, block_size):
    i2 = min(i1 + block_size, d_in)
    u_blk = u[i1:i2, i1:i2]
    reset = reset_mask(salience[:, i1:i2], w[:, i1:i2], jnp.diagonal(u_blk), sparsity, weights)
    resets.append(reset)
    if not compensate:
      w = w.at[:, i1:i2].set(jnp.where(reset, w0[:, i1:i2], w[:, i1:i2]))
      continue
    q, err = _compensate_block(w[:, i1:i2], w0[:, i1:i2], reset, u_blk, compensation_sign)
    w = w.at[:, i1:i2].set(q)
    w = w.at[:, i2:].add(compensation_sign * (err @ u[i1:i2, i2:]))
  return w, jnp.concatenate(resets, axis=1)


# ----------------------------------------------------------------------------- model level
def _model_inputs(batch: dict) -> dict:
  return {k: v for k, v in model_kwargs(batch).items() if v is not None}


@functools.lru_cache(maxsize=8)
def block_inputs_fn(model):
  """Jitted `(params, batch) -> (h_BTD, (sin, cos), mask_BTS, deepstack)`: what enters LLM
  block 0 and what every block shares (`deepstack`: Qwen3-VL's (n, B, T, D) visual features
  added after blocks 0..n-1, else None).

  With `intercept_methods`, every decoder block acts as the identity (so the stack's output,
  read at the input of `final_norm`, is block 0's input) and hands over its broadcast inputs
  (RoPE tables, attention mask, deepstack features)."""
  def fn(params, batch):
    captured = {}

    def grab(next_fun, args, kwargs, context):
      mod = context.module
      if isinstance(mod, DecoderBlock) and context.method_name == "__call__":
        captured["sin_cos"], captured["mask"] = args[1], args[2]
        deepstack = args[5] if len(args) > 5 else kwargs.get("deepstack")
        if deepstack is not None:  # layer 0 gets it (unscanned stacks pass None after n)
          captured["deepstack"] = deepstack
        return args[0], None
      if (mod.name == "final_norm" and isinstance(mod.parent, LLM)
          and context.method_name == "__call__"):
        captured["h"] = args[0]
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
      model.apply({"params": params}, batch["input_ids"], **_model_inputs(batch))
    return captured["h"], captured["sin_cos"], captured["mask"], captured.get("deepstack")
  return jax.jit(fn)


@functools.lru_cache(maxsize=8)
def block_pass_fn(cfg):
  """Jitted `(layer_params, state, token_mask_BT, layer) -> (h_out, {linear: (sum 2 x x^T,
  n_tok)})`: decoder block `layer` on `state = (h, sin_cos, mask_BTS, deepstack)` (deepstack
  None, or added to the output as the model's block `layer` adds it), with the Gram sums of
  every Linear's input over the real tokens."""
  def fn(layer_params, state, token_mask_BT, layer):
    h, sin_cos, mask_BTS, deepstack = state
    layer_xs = (None, None) if deepstack is None else (None, None, layer)
    captured = {}

    def grab(next_fun, args, kwargs, context):
      if isinstance(context.module, Linear) and context.method_name == "__call__":
        captured["/".join(context.module.scope.path)] = args[0]
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
      out, _ = DecoderBlock(cfg).apply({"params": layer_params}, h, sin_cos, mask_BTS, 0,
                                       layer_xs, deepstack)  # (KV cache, prefix[, index])
    w_N = token_mask_BT.reshape(-1).astype(jnp.float32)
    grams = {}
    for name, x in captured.items():
      x_ND = x.reshape(-1, x.shape[-1]).astype(jnp.float32) * w_N[:, None]
      grams[name] = (2.0 * x_ND.T @ x_ND, jnp.sum(w_N))
    return out, grams
  return jax.jit(fn)


@jax.jit
def layer_slice(stacked: dict, layer) -> dict:
  """Block `layer`'s params from the stacked tree (one compile for every layer)."""
  return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, layer, keepdims=False), stacked)


@jax.jit
def _set_layer(stacked: dict, layer, block: dict) -> dict:
  return jax.tree.map(lambda s, x: jax.lax.dynamic_update_index_in_dim(s, x.astype(s.dtype),
                                                                       layer, 0), stacked, block)


@jax.jit
def _layers_differ(stacked_a: dict, stacked_b: dict) -> jax.Array:
  """(L,) bool: any leaf of block l differs."""
  diffs = [jnp.any(a != b, axis=tuple(range(1, a.ndim)))
           for a, b in zip(jax.tree.leaves(stacked_a), jax.tree.leaves(stacked_b))]
  return jnp.any(jnp.stack(diffs), axis=0)


def changed_layers(params_pre: dict, params_ft: dict) -> list[int]:
  """LLM blocks whose weights differ between theta0 and theta_ft."""
  diff = _layers_differ(params_pre["llm"]["layers"], params_ft["llm"]["layers"])
  return [int(i) for i in np.flatnonzero(np.asarray(diff))]


def _token_mask(batch: dict) -> np.ndarray:
  if batch.get("attention_mask") is None:
    return np.ones(np.shape(batch["input_ids"]), bool)
  return np.asarray(batch["attention_mask"]) > 0


@register("model_tailor", "selective")
@dataclasses.dataclass(frozen=True)
class ModelTailor(Method):
  """Post-hoc Model Tailor (module docstring); trains nothing: use `tailor(...)`.

  Defaults (code): sparsity 0.9, block 128, damp 0.01, weights 0.8/0.2, 128 calibration
  samples (`num_samples` is informational: `tailor` uses every batch it is given)."""
  untrained_hint: ClassVar[str] = (
      "it is a post-hoc step on fine-tuned weights. Fine-tune first (e.g. configs/methods/"
      "full.py, or a freeze preset), then `mllm-tune export RUN --merged DIR --tailor` tailors "
      "the run's weights on its training data (Python: ModelTailor().tailor(model, theta0, "
      "theta_ft, batches))")
  sparsity: float = 0.9
  block_size: int = 128
  damp: float = 0.01
  salience_weight: float = 0.8
  sensitivity_weight: float = 0.2
  compensation_sign: float = -1.0
  compensate: bool = True
  layers: tuple[int, ...] | None = None
  reset_projector: bool = True
  num_samples: int = 128

  def __post_init__(self):
    if not 0.0 <= self.sparsity < 1.0:
      raise MethodError(f"model_tailor: sparsity must be in [0, 1), got {self.sparsity}")
    if self.compensation_sign not in (-1, 1, -1.0, 1.0):
      raise MethodError(f"model_tailor: compensation_sign must be -1 (OBS) or +1 (released "
                        f"code), got {self.compensation_sign}")

  def tailor_linears(self, p_ft: dict, p_pre: dict, grams: dict) -> dict:
    """Tailor every Linear of one block given H = sum / N_tok per Linear (`grams`)."""
    flat, flat_pre = pytree.flatten(p_ft), pytree.flatten(p_pre)
    for name in LINEARS:
      kernel = f"{name}/kernel"
      if kernel not in flat:  # a MoE block: no dense MLP Linears
        continue
      gram, n_tok = grams[name]
      w, _ = tailor_linear(flat[kernel].T, flat_pre[kernel].T, gram / jnp.maximum(n_tok, 1.0),
                           sparsity=self.sparsity, block_size=self.block_size, damp=self.damp,
                           weights=(self.salience_weight, self.sensitivity_weight),
                           compensation_sign=float(self.compensation_sign),
                           compensate=self.compensate)
      flat[kernel] = w.T.astype(flat[kernel].dtype)
    return pytree.unflatten(flat)

  def tailor(self, model, params_pre: dict, params_ft: dict, batches: Iterable[dict]) -> dict:
    """theta0, theta_ft, calibration batches ({input_ids, attention_mask[, pixel_values, ..]})
    -> tailored params (full weights, HF-exportable)."""
    batches = list(batches)
    if not batches:
      raise MethodError("model_tailor: no calibration batches")
    cfg = model.config.llm
    ft_layers, pre_layers = (pytree.flatten(p["llm"]["layers"]) for p in (params_ft, params_pre))
    for leaf in MOE_LEAVES:  # a mixture of experts' weights are no Linear kernels
      if leaf in ft_layers and not np.array_equal(np.asarray(ft_layers[leaf]),
                                                  np.asarray(pre_layers[leaf])):
        raise MethodError(f"model_tailor: the fine-tuned 'llm/layers/{leaf}' differs from the "
                          "base; Model Tailor patches Linear kernels only and cannot tailor "
                          "mixture-of-experts weights (tune the experts with another method)")
    params = jax.tree.map(lambda x: x, params_ft)
    if self.reset_projector and "projector" in params:
      params["projector"] = params_pre["projector"]
    layers = sorted(self.layers if self.layers is not None
                    else changed_layers(params_pre, params_ft))
    bad = [i for i in layers if not 0 <= i < cfg.num_layers]
    if bad:
      raise MethodError(f"model_tailor: layers {bad} out of range (model has {cfg.num_layers})")
    if not layers:
      return params
    inputs, block_pass = block_inputs_fn(model), block_pass_fn(cfg)
    states = [inputs(params, b) for b in batches]
    token_masks = [_token_mask(b) for b in batches]
    stacked = params["llm"]["layers"]
    for layer in range(layers[-1] + 1):
      p_l = layer_slice(stacked, layer)
      if layer in layers:  # H from the fine-tuned block on the already-tailored inputs
        grams = None
        for state, tm in zip(states, token_masks):
          _, g = block_pass(p_l, state, tm, jnp.int32(layer))
          grams = g if grams is None else jax.tree.map(jnp.add, grams, g)
        p_l = self.tailor_linears(p_l, layer_slice(params_pre["llm"]["layers"], layer), grams)
        stacked = _set_layer(stacked, layer, p_l)
      states = [(block_pass(p_l, s, tm, jnp.int32(layer))[0], *s[1:])
                for s, tm in zip(states, token_masks)]
    params["llm"] = {**params["llm"], "layers": stacked}
    return params
