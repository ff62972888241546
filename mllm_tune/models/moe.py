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
`jax.lax.ragged_dot` (grouped matmuls over contiguous row groups, wrapped in
`models/grouped_matmul.py` so that per-sample gradients can vmap it), then scattered back and
summed. Reverse-mode only (a custom VJP, like the default attention). No token is dropped and no
capacity factor is involved (except under expert parallelism, below, when asked), so the result
equals transformers' per-expert loop. How fast `ragged_dot` runs is the backend's business:
XLA:CPU (jax 0.10) lowers it densely, every row against every expert (E times the expert FLOPs and
an (E, N*k, D) masked input, which the tiny test models afford); on GPU it lowers to
`chlo.ragged_dot`, not yet measured (`perf/moe_check.py` is the device check). Top-k ties go to the
lower expert index (`lax.top_k`; torch's choice is implementation-defined), which only matters
for bf16 router logits. The router load-balancing loss is the trainer's (`train.router_aux_loss`,
`losses/router.py`), from the statistics each layer sows when `intermediates` is mutable.

Expert parallelism: inside `expert_parallel(mesh)` (or `jax.set_mesh`) with a mesh whose
`expert` axis has several devices (the trainer's `mesh.expert`), the stacks are split by expert
and `routed_experts_sharded` dispatches the rows across that axis (its docstring); anywhere else
every device holds every expert. There, `LLMConfig.moe_capacity_factor` > 0 bounds each
device's pair buffer by GShard's expert capacity (pairs past it are dropped, and the layer sows
their count under `MOE_DROPPED` in the `MOE_STATS` collection; padding tokens are not routed
then); without expert parallelism the factor does nothing, as the dispatch then holds exactly
the N * k pairs.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from mllm_tune.models import adapters
from mllm_tune.models.adapters import parallel_adapter
from mllm_tune.models.grouped_matmul import cast_varying, grouped_rows
from mllm_tune.models.layers import Linear, activation, default_kernel_init, dtype_of
from mllm_tune.losses.router import MOE_DROPPED, MOE_STATS, ROUTER_STATS
from mllm_tune.models.llm_config import LLMConfig
from mllm_tune.models.mesh_axes import BATCH_AXES, EXPERT, FSDP

_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- routing
def route(logits_NE: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """(weights (N, k) in the logits' dtype, expert ids (N, k)): the k most probable experts of
  each row of a float32 softmax, their probabilities renormalised to sum to 1."""
  probs_NE = jax.nn.softmax(logits_NE.astype(jnp.float32), axis=-1)
  top_NK, idx_NK = jax.lax.top_k(probs_NE, k)
  top_NK = top_NK / jnp.sum(top_NK, axis=-1, keepdims=True)
  return top_NK.astype(logits_NE.dtype), idx_NK


class ExpertLora(NamedTuple):
  """Per-expert LoRA of one weight stack (E, d_in, d_out) (PEFT's `target_parameters` LoRA on MoE
  experts): the rows of expert e get `(s * (drop(x) @ a[e])) @ b[e]`, i.e. the stack becomes
  `W_e + s A_e B_e`. `key` None: no dropout."""
  a: jax.Array                  # (E, d_in, r)
  b: jax.Array                  # (E, r, d_out)
  scale: jax.Array              # ()
  rate: jax.Array | None = None
  key: jax.Array | None = None

  def delta(self, x_MD: jax.Array, sizes_E: jax.Array, partial: bool = False) -> jax.Array:
    xd = x_MD if self.key is None else adapters.dropout_with_key(self.key, x_MD, self.rate)
    xa = grouped_rows(xd, self.a, sizes_E, partial) * self.scale
    return grouped_rows(xa, self.b, sizes_E, partial)


def expert_order(flat_M: jax.Array, num_experts: int, foreign: bool = False,
                 capacity: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """How the (token, expert) pairs `flat_M` (expert ids) fill the grouped products' rows:
  (order_R: the pair index of each row, grouped by expert; sizes_E: rows per expert; kept: how
  many rows hold a pair). Ids outside [0, E) (`foreign`) get no row.

  `capacity` 0: dropless, one row per pair (R = M; rows past the groups, the foreign pairs,
  are masked by `grouped_rows`). `capacity` C > 0: each expert keeps its first C pairs in pair
  order (GShard / Switch's expert capacity) and the rest are dropped; R = min(E C, M) rows, the
  kept pairs first, in expert order."""
  m = flat_M.shape[0]
  if foreign:
    flat_M = jnp.where((flat_M >= 0) & (flat_M < num_experts), flat_M, num_experts)
  order_M = jnp.argsort(flat_M, stable=True)           # grouped by expert (foreign pairs last)
  counts_E = jnp.bincount(flat_M, length=num_experts + foreign)[:num_experts].astype(jnp.int32)
  if not capacity:
    return order_M, counts_E, jnp.sum(counts_E)
  sorted_M = flat_M[order_M]
  starts_E = jnp.cumsum(counts_E) - counts_E
  rank_M = jnp.arange(m) - starts_E[jnp.minimum(sorted_M, num_experts - 1)]
  keep_M = (sorted_M < num_experts) & (rank_M < capacity)
  rows = min(num_experts * capacity, m)
  slot_M = jnp.where(keep_M, jnp.cumsum(keep_M) - 1, rows)  # kept pairs stay in expert order
  order_R = jnp.zeros((rows,), order_M.dtype).at[slot_M].set(order_M, mode="drop")
  sizes_E = jnp.minimum(counts_E, capacity)
  return order_R, sizes_E, jnp.sum(sizes_E)


def routed_experts(x_ND: jax.Array, weights_NK: jax.Array, idx_NK: jax.Array,
                   gate_up_EDF2: jax.Array, down_EFD: jax.Array, act: str,
                   gate_up_lora: ExpertLora | None = None,
                   down_lora: ExpertLora | None = None, *, foreign: bool = False,
                   capacity: int = 0) -> jax.Array:
  """sum_j weights[n, j] * expert_{idx[n, j]}(x[n]) for every row n, (N, D), dropless.

  `foreign=True`: expert ids outside [0, E) name experts held elsewhere (expert parallelism:
  `routed_experts_sharded` passes ids relative to its local stack). Those pairs are sorted past
  the groups and masked out of the grouped products' input and output (and so out of every
  gradient), whatever a backend leaves in rows past the groups (`grouped_rows`).
  `capacity` > 0: at most that many pairs per expert (`expert_order`); a dropped pair adds
  nothing, as if its routing weight were 0."""
  k = idx_NK.shape[1]
  num_experts, f = down_EFD.shape[0], down_EFD.shape[1]
  order_R, sizes_E, _ = expert_order(idx_NK.reshape(-1), num_experts, foreign, capacity)
  partial = foreign or bool(capacity)
  token_R = order_R // k
  xs_RD = x_ND[token_R]
  h_RF2 = grouped_rows(xs_RD, gate_up_EDF2.astype(x_ND.dtype), sizes_E, partial)
  if gate_up_lora is not None:
    h_RF2 = h_RF2 + gate_up_lora.delta(xs_RD, sizes_E, partial)
  h_RF = activation(act)(h_RF2[:, :f]) * h_RF2[:, f:]
  y_RD = grouped_rows(h_RF, down_EFD.astype(x_ND.dtype), sizes_E, partial)
  if down_lora is not None:
    y_RD = y_RD + down_lora.delta(h_RF, sizes_E, partial)
  y_RD = y_RD * weights_NK.reshape(-1)[order_R][:, None].astype(y_RD.dtype)
  return jnp.zeros_like(x_ND).at[token_R].add(y_RD)


# ----------------------------------------------------------------------------- expert parallelism
_EXPERT_MESH: contextvars.ContextVar = contextvars.ContextVar("expert_mesh", default=None)


@contextlib.contextmanager
def expert_parallel(mesh):
  """MoE layers traced inside run expert parallel over `mesh`'s `expert` axis (the trainer
  enters it when `mesh.expert` > 1). It makes `mesh` jax's ambient abstract mesh
  (`jax.sharding.use_abstract_mesh`, part of jit's cache key: a function traced inside and
  outside gets two programs) and keeps the concrete mesh for `shard_map`, so calls whose inputs
  are not yet on the mesh work too. Array placement outside jit is left alone (unlike
  `jax.set_mesh`, which a user may enter instead)."""
  token = _EXPERT_MESH.set(mesh)
  try:
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      yield
  finally:
    _EXPERT_MESH.reset(token)


def expert_mesh():
  """The mesh to dispatch experts over when the ambient mesh's `expert` axis has more than one
  device (the concrete one of `expert_parallel`, else the abstract one), else None (then every
  device holds every expert)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or EXPERT not in mesh.axis_names or mesh.shape[EXPERT] == 1:
    return None
  concrete = _EXPERT_MESH.get()
  return concrete if concrete is not None and concrete.abstract_mesh == mesh else mesh


_LOGGED: set = set()


def expert_capacity(rows: int, k: int, num_experts: int, capacity_factor: float) -> int:
  """Pairs each expert keeps when a dispatch group of `rows` tokens sends k pairs each:
  ceil(factor * rows * k / E) (GShard's expert capacity), at most `rows` (no expert gets more);
  0 (dropless) when the factor is 0."""
  if not capacity_factor:
    return 0
  return min(rows, math.ceil(capacity_factor * rows * k / num_experts))


def routed_experts_sharded(mesh, x_ND, weights_NK, idx_NK, gate_up_EDF2, down_EFD, act,
                           gate_up_lora: ExpertLora | None = None,
                           down_lora: ExpertLora | None = None,
                           capacity_factor: float = 0.0,
                           valid_N: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """`routed_experts` with the expert stacks (and their LoRA factors) split over the mesh's
  `expert` axis: each device holds E / n experts (an all-gather dispatcher, Megatron-Core's
  `allgather` token dispatcher in shard_map form).

  The rows are split over the batch axes (data, fsdp, expert) as the batch is. Each device
  gathers the rows (with their routing) of its `expert` group, runs the (token, expert) pairs
  of its own experts, dropless, and a reduce-scatter over `expert` sums every row's k expert
  outputs and hands each device its rows back. Per device and layer that moves the group's
  rows twice (an all-gather forward, a reduce-scatter), as much as an all-to-all of the
  N * k pairs when k >= n, and works on every backend (XLA:CPU has no ragged all-to-all). The
  row buffer is the group's N * k pairs (the worst case of all pairs on one device), not the
  average N * k / n. When the rows do not split over the batch axes (a decoding batch of one),
  every device takes every row and a sum over `expert` combines the partial outputs. The
  expert weights enter split over `fsdp` too and are all-gathered inside (FSDP: their gradient
  leaves as a reduce-scatter). LoRA dropout draws one mask per device.

  `capacity_factor` > 0 bounds that buffer: each expert keeps at most `expert_capacity` of
  the group's pairs (the first in row order; GShard's expert capacity, with the group's rows
  as its group), so a device holds (E / n) * capacity pair rows, about factor / n of the
  dropless buffer, and the rest are dropped (they add nothing, as if routed with weight 0).
  Which pairs drop depends on the group, i.e. on the mesh; 0 (the default) is dropless and
  gives the one-device result. `valid_N` (bool, with a capacity factor): rows that are real
  tokens; the others (padding) are not routed, so they take no capacity, count as no pair and
  get a zero output. Returns (y, dropped pairs over the whole batch, int32)."""
  ep, num_experts = mesh.shape[EXPERT], down_EFD.shape[0]
  if num_experts % ep:
    raise ValueError(f"{num_experts} experts do not split over the mesh's expert axis of {ep} "
                     "devices (mesh.expert)")
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
  if x_ND.shape[0] % math.prod(mesh.shape[a] for a in axes):
    axes = ()
  gathered = EXPERT in axes
  rows, stack = P(axes or None), P(EXPERT)
  fsdp = mesh.shape[FSDP] if FSDP in mesh.axis_names else 1
  split_d = FSDP in axes and gate_up_EDF2.shape[1] % fsdp == 0  # rows split over fsdp too
  gate_up_spec = P(EXPERT, FSDP, None) if split_d else stack
  down_spec = P(EXPERT, None, FSDP) if split_d else stack
  lora_spec = lambda l: None if l is None else ExpertLora(
      stack, stack, P(), None if l.rate is None else P(), None if l.key is None else P())
  key = (num_experts, ep, axes, x_ND.shape[0])
  if key not in _LOGGED:
    _LOGGED.add(key)
    _log.info("mixture of experts: %d experts over the %d devices of mesh axis 'expert' (%d per "
              "device); %d rows %s", num_experts, ep, num_experts // ep, x_ND.shape[0],
              f"split over {axes}" if axes else "on every device")

  cap_on = bool(capacity_factor)
  if valid_N is None or not cap_on:
    valid_N = jnp.ones(x_ND.shape[:1], bool)

  def body(x_nD, w_nK, idx_nK, valid_n, gate_up, down, gu_lora, dn_lora):
    if gathered:  # the validity mask travels only where a capacity reads it
      x_nD, w_nK, idx_nK = (jax.lax.all_gather(t, EXPERT, axis=0, tiled=True)
                            for t in (x_nD, w_nK, idx_nK))
      if cap_on:
        valid_n = jax.lax.all_gather(valid_n, EXPERT, axis=0, tiled=True)
    if split_d:
      gate_up = jax.lax.all_gather(gate_up, FSDP, axis=1, tiled=True)
      down = jax.lax.all_gather(down, FSDP, axis=2, tiled=True)
    fold = lambda l: l if l is None or l.key is None else l._replace(
        key=jax.random.fold_in(l.key, jax.lax.axis_index(axes + (EXPERT,) * (not gathered))))
    gu_lora, dn_lora = fold(gu_lora), fold(dn_lora)  # a dropout mask of its own per device
    # the rows meet expert-varying weights: typed varying in token space, so that their
    # gradient is summed over `expert` there, not in each device's own pair order
    x_nD, w_nK = cast_varying(x_nD, (EXPERT,)), cast_varying(w_nK, (EXPERT,))
    local_e = down.shape[0]
    local_idx = idx_nK - jax.lax.axis_index(EXPERT) * local_e
    if cap_on:  # padding rows are not routed: a foreign id for each of their pairs
      local_idx = jnp.where(valid_n[:, None], local_idx, local_e)
    cap = expert_capacity(x_nD.shape[0], idx_nK.shape[1], num_experts, capacity_factor)
    y_nD = routed_experts(x_nD, w_nK, local_idx, gate_up, down, act, gu_lora, dn_lora,
                          foreign=True, capacity=cap)
    dropped = jnp.zeros((), jnp.int32)
    if cap:  # this device's pairs past their expert's capacity, summed over the mesh
      mine = (local_idx >= 0) & (local_idx < local_e)
      counts = jnp.bincount(jnp.where(mine, local_idx, local_e).reshape(-1), length=local_e + 1)
      dropped = jax.lax.psum(jnp.sum(jnp.maximum(counts[:local_e] - cap, 0)).astype(jnp.int32),
                             axes if gathered else (EXPERT,))
    if gathered:
      return jax.lax.psum_scatter(y_nD, EXPERT, scatter_dimension=0, tiled=True), dropped
    return jax.lax.psum(y_nD, EXPERT), dropped

  fn = jax.shard_map(body, mesh=mesh, out_specs=(rows, P()), check_vma=True,
                     in_specs=(rows, rows, rows, rows, gate_up_spec, down_spec,
                               lora_spec(gate_up_lora), lora_spec(down_lora)))
  dt = x_ND.dtype
  return fn(x_ND, weights_NK, idx_NK, valid_N.astype(bool), gate_up_EDF2.astype(dt),
            down_EFD.astype(dt), gate_up_lora, down_lora)


def expert_lora(module, name: str, dt) -> ExpertLora | None:
  """The per-expert LoRA of the weight stack `name` (its adapter leaves sit under the stack's
  name: `experts_down/lora_a` (E, d_in, r), `lora_b` (E, r, d_out), `lora_scale` (), optional
  `lora_dropout` ()), or None."""
  leaves = adapters.get(module, name)
  if leaves is None:
    return None
  rate = leaves.get(adapters.LORA_DROPOUT)
  key = module.make_rng("dropout") if rate is not None and module.has_rng("dropout") else None
  return ExpertLora(leaves[adapters.LORA_A].astype(dt), leaves[adapters.LORA_B].astype(dt),
                    jnp.asarray(leaves.get(adapters.LORA_SCALE, 1.0), dt),
                    None if key is None else jnp.asarray(rate, jnp.float32), key)


class MoEMLP(nn.Module):
  """The sparse MLP of one decoder layer (`LLMConfig.num_experts` > 0)."""
  cfg: LLMConfig

  @nn.compact
  def __call__(self, x_BTD: jax.Array, valid_BT: jax.Array | None = None) -> jax.Array:
    """`valid_BT`: which tokens are real (not padding); used with a capacity factor only."""
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
    loras = expert_lora(self, "experts_gate_up", dt), expert_lora(self, "experts_down", dt)
    mesh = expert_mesh()
    if mesh is None:
      y_ND = routed_experts(x_ND.astype(dt), weights_NK, idx_NK, gate_up, down, c.hidden_act,
                            *loras)
    else:  # expert parallelism: the stacks are split over the mesh's expert axis
      valid_N = None if valid_BT is None else valid_BT.reshape(-1)
      y_ND, dropped = routed_experts_sharded(mesh, x_ND.astype(dt), weights_NK, idx_NK, gate_up,
                                             down, c.hidden_act, *loras,
                                             capacity_factor=c.moe_capacity_factor,
                                             valid_N=valid_N)
      if c.moe_capacity_factor and self.is_mutable_collection(MOE_STATS):
        rows = x_ND.shape[0] if valid_N is None else jnp.sum(valid_N)
        self.sow(MOE_STATS, MOE_DROPPED, (dropped.astype(jnp.float32),
                                          jnp.asarray(rows * idx_NK.shape[1], jnp.float32)))
    return parallel_adapter(self, x_BTD, y_ND.reshape(x_BTD.shape))
