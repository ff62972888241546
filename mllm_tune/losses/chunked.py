"""Vocabulary head + next-token cross-entropy in sequence chunks, never holding (B, T, V) logits.

`chunked_token_ce(head_fn, head_vars, h_BTD, ids_BT, loss_mask_BT, chunk)` returns what
`token.token_ce(head_fn(h_BTD, head_vars), ids_BT, loss_mask_BT)` returns (summed NLL, target
count, correct argmax count), computing the logits of `chunk` sequence positions (all batch rows)
at a time; chunks run in a loop, so only one chunk's logits exist at once. Chunking along the
sequence, not the flattened rows, keeps every chunk spread over the batch shards of a mesh.

Differentiation is a custom VJP. The summed NLL's cotangent is a scalar, so its forward computes,
chunk by chunk, the NLL, the argmax and the gradient of the summed NLL w.r.t. the hidden states
and the head's variables (softmax - one-hot, pulled back through `head_fn` with `jax.vjp`); the
backward only scales them. Neither the logits nor their gradient outlive a chunk and the head
matmul is not recomputed. Gradients of head variables that are not differentiated (a frozen LM
head under LoRA) are dead code that XLA removes. The argmax count is not differentiable.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from mllm_tune.losses.token import first_max_index, shifted_targets


def chunked_token_ce(head_fn, head_vars, h_BTD: jax.Array, ids_BT: jax.Array,
                     loss_mask_BT: jax.Array, chunk: int):
  """`head_fn(h_BcD, head_vars) -> float32 logits (B, c, V)`; `chunk`: positions per chunk."""
  if chunk < 1:
    raise ValueError(f"chunk must be >= 1 sequence positions, got {chunk}")
  targets_BT, w_BT = shifted_targets(ids_BT, loss_mask_BT)
  t = h_BTD.shape[1]
  if t == 0:
    zero = jnp.zeros((), jnp.float32)
    return zero, zero, zero
  c = min(chunk, t)
  n = -(-t // c)
  pad = n * c - t
  if pad:  # zero-weight positions; their gradient is zero and is sliced off
    h_BTD = jnp.pad(h_BTD, ((0, 0), (0, pad), (0, 0)))
    targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
    w_BT = jnp.pad(w_BT, ((0, 0), (0, pad)))
  # only inexact leaves are differentiated (jax.vjp gives integer leaves float0 cotangents)
  leaves, treedef = jax.tree.flatten(head_vars)
  inexact = tuple(jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in leaves)
  float_leaves = [x for x, f in zip(leaves, inexact) if f]
  other_leaves = [x for x, f in zip(leaves, inexact) if not f]

  def head_of_floats(h_BcD, floats, others):
    it_f, it_o = iter(floats), iter(others)
    return head_fn(h_BcD, jax.tree.unflatten(
        treedef, [next(it_f) if f else next(it_o) for f in inexact]))
  nll, correct = _fused_ce(head_of_floats, c, n)(h_BTD, float_leaves, other_leaves, targets_BT,
                                                  w_BT)
  return nll, w_BT.sum(), correct


def _chunk(head_fn, floats, others, h_BcD, t_Bc, w_Bc, with_grads: bool):
  if with_grads:
    logits_BcV, pull = jax.vjp(lambda h, f: head_fn(h, f, others), h_BcD, floats)
  else:
    logits_BcV = head_fn(h_BcD, floats, others)
  lf = logits_BcV.astype(jnp.float32)
  m_Bc = lf.max(axis=-1)
  e_BcV = jnp.exp(lf - m_Bc[..., None])
  s_Bc = e_BcV.sum(axis=-1)
  picked_Bc = jnp.take_along_axis(lf, t_Bc[..., None], axis=-1)[..., 0]
  nll = ((m_Bc + jnp.log(s_Bc) - picked_Bc) * w_Bc).sum()
  correct = ((first_max_index(lf, m_Bc) == t_Bc).astype(jnp.float32) * w_Bc).sum()
  if not with_grads:
    return nll, correct
  onehot = lax.broadcasted_iota(jnp.int32, lf.shape, lf.ndim - 1) == t_Bc[..., None]
  d_BcV = (e_BcV / s_Bc[..., None] - onehot.astype(jnp.float32)) * w_Bc[..., None]
  dh_BcD, dfloats = pull(d_BcV.astype(logits_BcV.dtype))
  return nll, correct, dh_BcD, dfloats


def _fused_ce(head_fn, c: int, n: int):
  piece = lambda x, i: lax.dynamic_slice_in_dim(x, i * c, c, axis=1)
  zero = lambda: jnp.zeros((), jnp.float32)

  @jax.custom_vjp
  def ce(h_BTD, floats, others, targets_BT, w_BT):
    def body(i, acc):
      nll, correct = _chunk(head_fn, floats, others, piece(h_BTD, i), piece(targets_BT, i),
                            piece(w_BT, i), False)
      return acc[0] + nll, acc[1] + correct
    return lax.fori_loop(0, n, body, (zero(), zero()))

  def fwd(h_BTD, floats, others, targets_BT, w_BT):
    def body(i, acc):
      nll, correct, dh_BTD, dfloats = acc
      a, b, dh_BcD, df = _chunk(head_fn, floats, others, piece(h_BTD, i), piece(targets_BT, i),
                                piece(w_BT, i), True)
      dh_BTD = lax.dynamic_update_slice_in_dim(dh_BTD, dh_BcD.astype(dh_BTD.dtype), i * c, 1)
      dfloats = jax.tree.map(lambda x, y: x + y.astype(jnp.float32), dfloats, df)
      return nll + a, correct + b, dh_BTD, dfloats
    init = (zero(), zero(), jnp.zeros_like(h_BTD),
            jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), floats))
    nll, correct, dh_BTD, dfloats = lax.fori_loop(0, n, body, init)
    return (nll, correct), (dh_BTD, dfloats, floats)

  def bwd(res, g):
    dh_BTD, dfloats, floats = res
    g_nll = g[0]
    return ((g_nll * dh_BTD).astype(dh_BTD.dtype),
            jax.tree.map(lambda d, x: (g_nll * d).astype(jnp.result_type(x)), dfloats, floats),
            None, None, None)

  ce.defvjp(fwd, bwd)
  return ce
