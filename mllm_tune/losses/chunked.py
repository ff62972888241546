"""Vocabulary head + next-token cross-entropy in chunks, never holding (B, T, V) logits.

`chunked_token_ce(head_fn, head_vars, h_GND, ids_GN, loss_mask_GN, chunk, per_row)` returns what
`token.token_ce(head_fn(h_GND, head_vars), ids_GN, loss_mask_GN)` returns (summed NLL, target
count, correct argmax count), computing the logits of `chunk` x B positions at a time; chunks run
in a loop, so only one chunk's logits exist at once.

Only positions with a target cost head work. The positions with a target are gathered to the
front (a stable sort of the weights) and the loop stops after the last chunk that holds one. In
multimodal training most positions are image or prompt tokens without a target, so most chunks
are skipped; transformers computes the logits of every position. The gathering runs over all
rows of the batch together, or, with `per_row` (the step sets it on several devices), within each
row, so that every chunk stays spread over the batch shards of a mesh (the loop then runs until
the row with the most targets is done). A position without a target contributes nothing, not
even a NaN of its hidden state (the head reads zeros there), and gets a zero gradient. The loop's
trip count is data dependent (a while loop).

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
                     loss_mask_BT: jax.Array, chunk: int, per_row: bool = False):
  """`head_fn(h_GcD, head_vars) -> float32 logits (G, c, V)`; `chunk`: positions per row and
  chunk (B x `chunk` positions per chunk); `per_row`: gather each row's targets within the row
  (keeps the batch axis, and its sharding, in every chunk) instead of over the whole batch."""
  if chunk < 1:
    raise ValueError(f"chunk must be >= 1 sequence positions, got {chunk}")
  targets_BT, w_BT = shifted_targets(ids_BT, loss_mask_BT)
  b, t = ids_BT.shape
  if t == 0 or b == 0:
    zero = jnp.zeros((), jnp.float32)
    return zero, zero, zero
  # G groups of N positions: the rows, or the whole batch as one sequence
  g = b if per_row else 1
  n_pos = b * t // g
  c = min(chunk, t) * (b // g)
  n = -(-n_pos // c)
  h_GND = h_BTD.reshape(g, n_pos, h_BTD.shape[-1])
  targets_GN, w_GN = targets_BT.reshape(g, n_pos), w_BT.reshape(g, n_pos)
  pad = n * c - n_pos
  if pad:  # zero-weight positions; their gradient is zero and is sliced off
    h_GND = jnp.pad(h_GND, ((0, 0), (0, pad), (0, 0)))
    targets_GN = jnp.pad(targets_GN, ((0, 0), (0, pad)))
    w_GN = jnp.pad(w_GN, ((0, 0), (0, pad)))
  # only inexact leaves are differentiated (jax.vjp gives integer leaves float0 cotangents)
  leaves, treedef = jax.tree.flatten(head_vars)
  inexact = tuple(jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in leaves)
  float_leaves = [x for x, f in zip(leaves, inexact) if f]
  other_leaves = [x for x, f in zip(leaves, inexact) if not f]

  def head_of_floats(h_GcD, floats, others):
    it_f, it_o = iter(floats), iter(others)
    return head_fn(h_GcD, jax.tree.unflatten(
        treedef, [next(it_f) if f else next(it_o) for f in inexact]))
  has_target = w_GN != 0
  n_target_G = has_target.sum(axis=1, dtype=jnp.int32)
  live = (jnp.max(n_target_G) + c - 1) // c  # chunks holding a target
  # per group, the positions with a target first (in order), then the rest: `order` lists the
  # positions in that order, `slot` is where each position goes (its inverse)
  before = jnp.cumsum(has_target, axis=1, dtype=jnp.int32) - has_target
  slot_GN = jnp.where(has_target, before,
                      n_target_G[:, None] + lax.broadcasted_iota(jnp.int32, w_GN.shape, 1)
                      - before)
  order_GN = jnp.argsort(slot_GN, axis=1).astype(jnp.int32) if n > 1 else slot_GN
  nll, correct = _fused_ce(head_of_floats, c, n > 1)(
      h_GND, float_leaves, other_leaves, targets_GN, w_GN, order_GN, slot_GN, live)
  return nll, w_BT.sum(), correct


def _chunk(head_fn, floats, others, h_GcD, t_Gc, w_Gc, with_grads: bool):
  # a position without a target reads zeros: its hidden state (even a NaN) reaches no output
  h_GcD = jnp.where((w_Gc != 0)[..., None], h_GcD, jnp.zeros((), h_GcD.dtype))
  if with_grads:
    logits_GcV, pull = jax.vjp(lambda h, f: head_fn(h, f, others), h_GcD, floats)
  else:
    logits_GcV = head_fn(h_GcD, floats, others)
  lf = logits_GcV.astype(jnp.float32)
  m_Gc = lf.max(axis=-1)
  e_GcV = jnp.exp(lf - m_Gc[..., None])
  s_Gc = e_GcV.sum(axis=-1)
  picked_Gc = jnp.take_along_axis(lf, t_Gc[..., None], axis=-1)[..., 0]
  nll = ((m_Gc + jnp.log(s_Gc) - picked_Gc) * w_Gc).sum()
  correct = ((first_max_index(lf, m_Gc) == t_Gc).astype(jnp.float32) * w_Gc).sum()
  if not with_grads:
    return nll, correct
  onehot = lax.broadcasted_iota(jnp.int32, lf.shape, lf.ndim - 1) == t_Gc[..., None]
  d_GcV = (e_GcV / s_Gc[..., None] - onehot.astype(jnp.float32)) * w_Gc[..., None]
  dh_GcD, dfloats = pull(d_GcV.astype(logits_GcV.dtype))
  return nll, correct, dh_GcD, dfloats


def _fused_ce(head_fn, c: int, compact: bool):
  """The custom-VJP loss over (G, N) groups of positions, N a multiple of `c`. `compact`: chunk
  i holds positions order_GN[:, i*c:(i+1)*c] (slot_GN is the inverse permutation), else the
  positions in sequence order (one chunk; the orders are unused); `live`: chunks to process."""
  piece = lambda x, i: lax.dynamic_slice_in_dim(x, i * c, c, axis=1)
  zero = lambda: jnp.zeros((), jnp.float32)

  def gathered(i, order_GN, *xs):  # chunk i of the processing order, from each (G, N, ...) x
    if not compact:
      return [piece(x, i) for x in xs]
    idx_Gc = piece(order_GN, i)
    return [jnp.take_along_axis(x, idx_Gc.reshape(idx_Gc.shape + (1,) * (x.ndim - 2)), axis=1)
            for x in xs]

  @jax.custom_vjp
  def ce(h_GND, floats, others, targets_GN, w_GN, order_GN, slot_GN, live):
    del slot_GN

    def body(i, acc):
      nll, correct = _chunk(head_fn, floats, others, *gathered(i, order_GN, h_GND, targets_GN,
                                                                w_GN), False)
      return acc[0] + nll, acc[1] + correct
    return lax.fori_loop(0, live, body, (zero(), zero()))

  def fwd(h_GND, floats, others, targets_GN, w_GN, order_GN, slot_GN, live):
    def body(i, acc):
      nll, correct, dh_GND, dfloats = acc
      a, b, dh_GcD, df = _chunk(head_fn, floats, others,
                                *gathered(i, order_GN, h_GND, targets_GN, w_GN), True)
      dh_GND = lax.dynamic_update_slice_in_dim(dh_GND, dh_GcD.astype(dh_GND.dtype), i * c, 1)
      dfloats = jax.tree.map(lambda x, y: x + y.astype(jnp.float32), dfloats, df)
      return nll + a, correct + b, dh_GND, dfloats
    init = (zero(), zero(), jnp.zeros_like(h_GND),
            jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), floats))
    nll, correct, dh_GND, dfloats = lax.fori_loop(0, live, body, init)
    if compact:  # back to sequence order: position j's gradient is entry slot_GN[:, j]
      dh_GND = jnp.take_along_axis(dh_GND, slot_GN[..., None], axis=1)
    return (nll, correct), (dh_GND, dfloats, floats)

  def bwd(res, g):
    dh_GND, dfloats, floats = res
    g_nll = g[0]
    return ((g_nll * dh_GND).astype(dh_GND.dtype),
            jax.tree.map(lambda d, x: (g_nll * d).astype(jnp.result_type(x)), dfloats, floats),
            None, None, None, None, None, None)

  ce.defvjp(fwd, bwd)
  return ce
