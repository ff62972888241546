"""Grouped matmuls for mixture-of-experts dispatch: rows sorted into contiguous groups, group e
multiplied by expert e's weights (`jax.lax.ragged_dot`), differentiable and vmappable.

`grouped_matmul` is a custom VJP whose forward and backward products are `custom_vmap`
functions, so per-sample gradients (Fisher, grad_topk: the model vmapped over samples with the
weights unbatched) merge the samples' rows into one ragged product instead of copying the
shared weights per sample. `grouped_rows` masks rows past the groups (expert parallelism's
foreign or dropped pairs) in and out. Inside `shard_map`, the weight gradient is summed over the
manual mesh axes the rows vary along and the weights do not (`cast_varying`, `_weight_grad`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap

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


def grouped_rows(x_MD: jax.Array, w_EDF: jax.Array, sizes_E: jax.Array,
                 partial: bool = False) -> jax.Array:
  """`grouped_matmul`; `partial=True` when the groups may end before the last row (expert
  parallelism's foreign pairs): the rows past them are zeroed in the input and the output, so
  neither the result nor any gradient (rows, weights, routing weights, LoRA scales) reads what
  a backend leaves there."""
  if not partial:
    return grouped_matmul(x_MD, w_EDF, sizes_E)
  in_M1 = (jnp.arange(x_MD.shape[0]) < jnp.sum(sizes_E))[:, None]
  zero = lambda t: jnp.where(in_M1, t, jnp.zeros_like(t))
  return zero(grouped_matmul(zero(x_MD), w_EDF, sizes_E))


def _grouped_fwd(x_MD, w_EDF, sizes_E):
  return _rows_times_experts(x_MD, w_EDF, sizes_E), (x_MD, w_EDF, sizes_E)


def _weight_grad(dw: jax.Array, w: jax.Array) -> jax.Array:
  """Inside `shard_map`, the expert weights' gradient summed over the manual mesh axes it
  varies along and the weights do not (the same weights on every token shard)."""
  extra = tuple(sorted(_varying(dw) - _varying(w)))
  return jax.lax.psum(dw, extra) if extra else dw


def cast_varying(x: jax.Array, axes) -> jax.Array:
  """`x` typed as varying along the manual mesh `axes` too (`jax.lax.pcast`)."""
  missing = tuple(a for a in axes if a not in _varying(x))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def _varying(x: jax.Array) -> frozenset:
  """The manual mesh axes `x` varies along (jax 0.10: `manual_axis_type.varying`; `vma` before)."""
  t = jax.typeof(x)
  mat = getattr(t, "manual_axis_type", None)
  return frozenset(mat.varying) if mat is not None else frozenset(getattr(t, "vma", ()))


def _grouped_bwd(res, dy_MF):
  x_MD, w_EDF, sizes_E = res
  dx = _rows_times_experts(dy_MF, w_EDF.swapaxes(1, 2), sizes_E)
  dw = _expert_weight_grads(x_MD, dy_MF, sizes_E).astype(w_EDF.dtype)
  if _varying(dx) - _varying(x_MD):  # a sum in pair space would mix rows sorted differently
    raise ValueError("grouped_matmul: the rows must vary along every manual mesh axis the "
                     "weights vary along (cast the token rows before sorting them into pairs)")
  return dx, _weight_grad(dw, w_EDF), None


grouped_matmul.defvjp(_grouped_fwd, _grouped_bwd)
