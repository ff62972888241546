"""Mixture-of-experts MLP (Qwen3-VL-MoE's text model; transformers'
`Qwen3VLMoeTextSparseMoeBlock`).

Each token's router logits (a bias-free Linear, D -> E) go through a float32 softmax; the token
takes its `num_experts_per_tok` (k) most probable experts, with those k probabilities
renormalised to sum to 1 (cast back to the compute dtype, as transformers does). Expert e is a
gated MLP: `down_e(act(x gate_e) * (x up_e))`; the block returns the weighted sum of the k
expert outputs.

Params (one layer; stacked with a leading L in the scanned LLM):
  router/kernel       (D, E)        a `Linear`, so LoRA and the other Linear methods can reach it
  experts_gate_up     (E, D, 2F)    gate columns [0, F), up columns [F, 2F) (the hub's layout)
  experts_down        (E, F, D)
Per-expert LoRA (`expert_lora`) reads adapter leaves under each stack's name.

Dispatch is dropless: the N*k (token, expert) pairs are sorted by expert and run through
`jax.lax.ragged_dot` (grouped matmuls over contiguous row groups, wrapped in `grouped_matmul` so
that per-sample gradients can vmap it), then scattered back and summed. Reverse-mode only (a custom
VJP, like the default attention). No token is dropped and no capacity factor is involved, so the
result equals transformers' per-expert loop. How fast `ragged_dot` runs is the backend's business:
XLA:CPU (jax 0.10) lowers it densely, every row against every expert (E times the expert FLOPs and
an (E, N*k, D) masked input, which the tiny test models afford); on GPU it lowers to
`chlo.ragged_dot`, not yet measured (`perf/moe_check.py` is the device check). Top-k ties go to the
lower expert index (`lax.top_k`; torch's choice is implementation-defined), which only matters
for bf16 router logits. The router load-balancing loss is the trainer's (`train.router_aux_loss`,
`losses/router.py`), from the statistics each layer sows when `intermediates` is mutable.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.custom_batching import custom_vmap

from mllm_tune.models import adapters
from mllm_tune.models.adapters import parallel_adapter
from mllm_tune.models.layers import Linear, activation, default_kernel_init, dtype_of
from mllm_tune.losses.router import ROUTER_STATS
from mllm_tune.models.llm_config import LLMConfig


# ----------------------------------------------------------------------------- grouped matmuls
# `jax.lax.ragged_dot` has no batching rule for an unbatched operand (jax 0.10), and per-sample
# gradients (Fisher, grad_topk) vmap the model over samples with the weights unbatched. So the
# grouped matmul is a custom VJP whose forward and backward products are `custom_vmap`
# functions: under vmap, the samples' rows are merged into one ragged product (the shared
# weights are never copied per sample).
def _expert_of_rows(sizes_BE: jax.Array, rows: int) -> jax.Array:
  """(B, rows) expert index of each row of row-grouped samples (E for rows past the groups)."""
  ends_BE = jnp.cumsum(sizes_BE, axis=-1)
  return jax.vmap(lambda e: jnp.searchsorted(e, jnp.arange(rows), side="right"))(ends_BE)


def _batched(x: jax.Array, is_batched: bool, n: int) -> jax.Array:
  return x if is_batched else jnp.broadcast_to(x, (n,) + x.shape)


@custom_vmap
def _rows_times_experts(x_MD: jax.Array, w_EDF: jax.Array, sizes_E: jax.Array) -> jax.Array:
  """(M, F): row m (in expert-sorted groups of `sizes_E` rows) times its expert's (D, F)."""
  return jax.lax.ragged_dot(x_MD, w_EDF, sizes_E)


@_rows_times_experts.def_vmap
def _rows_times_experts_vmap(n, batched, x_BMD, w_EDF, sizes_BE):
  x_BMD, sizes_BE = _batched(x_BMD, batched[0], n), _batched(sizes_BE, batched[2], n)
  if batched[1]:  # per-sample weights: one product per sample
    return jax.lax.map(lambda a: jax.lax.ragged_dot(*a), (x_BMD, w_EDF, sizes_BE)), True
  b, m, d = x_BMD.shape
  # every sample's rows, re-sorted by expert across samples: one product with shared weights
  order = jnp.argsort(_expert_of_rows(sizes_BE, m).reshape(-1), stable=True)
  y = jax.lax.ragged_dot(x_BMD.reshape(b * m, d)[order], w_EDF, jnp.sum(sizes_BE, axis=0))
  return jnp.zeros_like(y).at[order].set(y).reshape(b, m, -1), True


_WGRAD_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[])


@custom_vmap
def _expert_weight_grads(x_MD: jax.Array, dy_MF: jax.Array, sizes_E: jax.Array) -> jax.Array:
  """(E, D, F): sum over expert e's rows of x^T dy (the gradient of `_rows_times_experts`)."""
  return jax.lax.ragged_dot_general(x_MD, dy_MF, sizes_E, _WGRAD_DIMS)


@_expert_weight_grads.def_vmap
def _expert_weight_grads_vmap(n, batched, x_BMD, dy_BMF, sizes_BE):
  x_BMD, dy_BMF = _batched(x_BMD, batched[0], n), _batched(dy_BMF, batched[1], n)
  sizes_BE = _batched(sizes_BE, batched[2], n)
  b, m, d = x_BMD.shape
  e = sizes_BE.shape[-1]
  # groups (sample, expert) are already contiguous in the flattened rows when every sample's
  # groups cover its rows; rows past a sample's groups are given to a zero-weight padding group
  pad_B = m - jnp.sum(sizes_BE, axis=-1)
  sizes = jnp.concatenate([sizes_BE, pad_B[:, None]], axis=-1).reshape(-1)
  g = jax.lax.ragged_dot_general(x_BMD.reshape(b * m, d), dy_BMF.reshape(b * m, -1), sizes,
                                 _WGRAD_DIMS)
  return g.reshape(b, e + 1, d, -1)[:, :e], True


@jax.custom_vjp
def grouped_matmul(x_MD: jax.Array, w_EDF: jax.Array, sizes_E: jax.Array) -> jax.Array:
  """`jax.lax.ragged_dot(x, w, sizes)` (rows grouped by expert), differentiable under vmap."""
  return _rows_times_experts(x_MD, w_EDF, sizes_E)


def _grouped_fwd(x_MD, w_EDF, sizes_E):
  return _rows_times_experts(x_MD, w_EDF, sizes_E), (x_MD, w_EDF, sizes_E)


def _grouped_bwd(res, dy_MF):
  x_MD, w_EDF, sizes_E = res
  dx = _rows_times_experts(dy_MF, w_EDF.swapaxes(1, 2), sizes_E)
  dw = _expert_weight_grads(x_MD, dy_MF, sizes_E).astype(w_EDF.dtype)
  return dx, dw, None


grouped_matmul.defvjp(_grouped_fwd, _grouped_bwd)


# ----------------------------------------------------------------------------- routing
def route(logits_NE: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """(weights (N, k) in the logits' dtype, expert ids (N, k)): the k most probable experts of
  each row of a float32 softmax, their probabilities renormalised to sum to 1."""
  probs_NE = jax.nn.softmax(logits_NE.astype(jnp.float32), axis=-1)
  top_NK, idx_NK = jax.lax.top_k(probs_NE, k)
  top_NK = top_NK / jnp.sum(top_NK, axis=-1, keepdims=True)
  return top_NK.astype(logits_NE.dtype), idx_NK


def routed_experts(x_ND: jax.Array, weights_NK: jax.Array, idx_NK: jax.Array,
                   gate_up_EDF2: jax.Array, down_EFD: jax.Array, act: str,
                   gate_up_delta=None, down_delta=None) -> jax.Array:
  """sum_j weights[n, j] * expert_{idx[n, j]}(x[n]) for every row n, (N, D), dropless.

  `gate_up_delta` / `down_delta`: optional `(rows (M, d_in), sizes (E,)) -> (M, d_out)` added to
  the expert products (per-expert LoRA, `expert_lora`)."""
  n, k = idx_NK.shape
  num_experts, f = down_EFD.shape[0], down_EFD.shape[1]
  flat_M = idx_NK.reshape(-1)                          # M = N * k (token, expert) pairs
  order_M = jnp.argsort(flat_M, stable=True)           # grouped by expert
  token_M = order_M // k
  sizes_E = jnp.bincount(flat_M, length=num_experts).astype(jnp.int32)
  xs_MD = x_ND[token_M]
  h_MF2 = grouped_matmul(xs_MD, gate_up_EDF2.astype(x_ND.dtype), sizes_E)
  if gate_up_delta is not None:
    h_MF2 = h_MF2 + gate_up_delta(xs_MD, sizes_E)
  h_MF = activation(act)(h_MF2[:, :f]) * h_MF2[:, f:]
  y_MD = grouped_matmul(h_MF, down_EFD.astype(x_ND.dtype), sizes_E)
  if down_delta is not None:
    y_MD = y_MD + down_delta(h_MF, sizes_E)
  y_MD = y_MD * weights_NK.reshape(-1)[order_M][:, None].astype(y_MD.dtype)
  return jnp.zeros_like(x_ND).at[token_M].add(y_MD)


def expert_lora(module, name: str, dt):
  """The per-expert LoRA of the weight stack `name` as a `routed_experts` delta, or None.

  Its adapter leaves sit under the stack's name (`experts_down/lora_a` (E, d_in, r),
  `lora_b` (E, r, d_out), `lora_scale` (), optional `lora_dropout` ()): expert e's rows get
  `(s * (drop(x) @ A_e)) @ B_e`, i.e. the stack becomes `W_e + s A_e B_e` (PEFT's
  `target_parameters` LoRA on MoE experts)."""
  leaves = adapters.get(module, name)
  if leaves is None:
    return None
  a, b = leaves[adapters.LORA_A].astype(dt), leaves[adapters.LORA_B].astype(dt)
  scale = jnp.asarray(leaves.get(adapters.LORA_SCALE, 1.0), dt)
  rate = leaves.get(adapters.LORA_DROPOUT)

  def delta(x_MD, sizes_E):
    xd = adapters.dropout(module, x_MD, rate)
    return grouped_matmul(grouped_matmul(xd, a, sizes_E) * scale, b, sizes_E)
  return delta


class MoEMLP(nn.Module):
  """The sparse MLP of one decoder layer (`LLMConfig.num_experts` > 0)."""
  cfg: LLMConfig

  @nn.compact
  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    c = self.cfg
    d, e, f = c.hidden_size, c.num_experts, c.moe_intermediate_size
    x_ND = x_BTD.reshape(-1, d)
    logits_NE = Linear(e, False, c.dtype, c.param_dtype, name="router")(x_ND)
    weights_NK, idx_NK = route(logits_NE, c.num_experts_per_tok)
    if self.is_mutable_collection("intermediates"):
      probs_NE = jax.nn.softmax(logits_NE.astype(jnp.float32), axis=-1)
      counts_NE = jnp.sum(jax.nn.one_hot(idx_NK, e, dtype=jnp.float32), axis=1)
      self.sow("intermediates", ROUTER_STATS, (probs_NE, counts_NE))
    pdt = dtype_of(c.param_dtype)
    gate_up = self.param("experts_gate_up", default_kernel_init(), (e, d, 2 * f), pdt)
    down = self.param("experts_down", default_kernel_init(), (e, f, d), pdt)
    dt = dtype_of(c.dtype)
    y_ND = routed_experts(x_ND.astype(dt), weights_NK, idx_NK, gate_up, down, c.hidden_act,
                          expert_lora(self, "experts_gate_up", dt),
                          expert_lora(self, "experts_down", dt))
    return parallel_adapter(self, x_BTD, y_ND.reshape(x_BTD.shape))
