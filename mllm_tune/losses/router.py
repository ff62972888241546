"""The router load-balancing loss of mixture-of-experts LLMs (Switch Transformer eqs. 4-6, as
transformers' `load_balancing_loss_func` computes it for Qwen3-VL-MoE).

Over all MoE layers and the real tokens (`token_mask`, the attention mask): f_e = the share of
(token, layer) rows that send one of their top-k slots to expert e (so the f_e sum to k), P_e =
the mean router probability of expert e; loss = E * sum_e f_e * P_e (k at perfect balance). The
MoE layers (models/moe.py) sow their (probabilities, top-k counts) under `ROUTER_STATS` into the
`intermediates` collection when it is mutable; this module reads them back."""
from __future__ import annotations

import jax
import jax.numpy as jnp

# what each MoE layer (models/moe.py) sows into `intermediates` when that collection is
# mutable: (router probabilities (N, E) float32, top-k counts (N, E))
ROUTER_STATS = "router_stats"
# what an expert-parallel MoE layer with a capacity factor sows: (dropped pairs, all pairs),
# float32 scalars (models/moe.py: routed_experts_sharded), into a collection of its own, so
# that asking for them does not also keep every layer's (N, E) router statistics
MOE_STATS = "moe_stats"
MOE_DROPPED = "moe_dropped"


def _sown(intermediates: dict, name: str) -> list[tuple]:
  out = []

  def walk(node):
    if isinstance(node, dict):
      for k in sorted(node):
        if k == name:
          out.append(tuple(node[k]))
        else:
          walk(node[k])
  walk(intermediates)
  return out


def dropped_pairs(intermediates: dict) -> tuple[jax.Array, jax.Array] | None:
  """(dropped, all) (token, expert) pairs over every MoE layer and pass that sowed
  `MOE_DROPPED` (expert parallelism with a capacity factor), or None when none did."""
  sown = [x for group in _sown(intermediates, MOE_DROPPED) for x in group]
  if not sown:
    return None
  return (sum(jnp.sum(d) for d, _ in sown), sum(jnp.sum(n) for _, n in sown))


def router_passes(intermediates: dict) -> list[tuple]:
  """Every sown statistics tuple, in tree order: one per MoE layer (or one for the scanned
  stack, each entry (L, N, E)), holding one (probs, counts) pair per forward pass of the LLM's
  layers in call order."""
  return _sown(intermediates, ROUTER_STATS)


def sample_count(token_mask_BT: jax.Array, segment_ids_BT: jax.Array | None = None) -> jax.Array:
  """The number of samples in a batch (float32): packed segments (runs of one nonzero segment
  id), or rows with a real token when the rows are not packed."""
  if segment_ids_BT is None:
    return jnp.sum(jnp.any(jnp.asarray(token_mask_BT) > 0, axis=-1)).astype(jnp.float32)
  seg = jnp.asarray(segment_ids_BT)
  prev = jnp.pad(seg, ((0, 0), (1, 0)))[:, :-1]
  return jnp.sum((seg != 0) & (seg != prev)).astype(jnp.float32)


def router_balance_loss(intermediates: dict, token_mask_BT: jax.Array,
                        shared_weight: jax.Array | float | None = None) -> jax.Array:
  """The load-balancing loss (scalar float32) of the router statistics a forward pass with
  `mutable=["intermediates"]` sowed; rows where `token_mask` is 0 (padding) are left out.

  With soft prompts (prompt tuning) the LLM runs its layers twice: first over the prompts alone
  (one row, seen by every sample: `models/llm.py`), then over the batch. The first pass's
  statistics count `shared_weight` times each, the number of samples (`sample_count`), as if
  every sample had the prompt tokens in front of it (peft's prompt tuning, whose virtual tokens
  sit in every row with mask 1)."""
  groups = router_passes(intermediates)
  if not groups:
    raise ValueError("no router statistics were recorded: the model has no mixture-of-experts "
                     "layers, or it was not applied with mutable=['intermediates']")
  batch_N = jnp.asarray(token_mask_BT, jnp.float32).reshape(-1)
  tokens = probs = rows = 0.0
  for passes in groups:
    if len(passes) not in (1, 2):
      raise ValueError(f"{len(passes)} passes of the LLM's layers recorded router statistics; "
                       "expected the batch's, after the soft prompts' when there are some")
    if len(passes) == 2 and shared_weight is None:
      raise ValueError("router statistics of two passes were recorded (soft prompts run on "
                       "their own, then the batch); give shared_weight, the number of samples")
    for i, (p, c) in enumerate(passes):
      if i == len(passes) - 1:  # the batch's own pass
        if p.shape[-2] != batch_N.shape[0]:
          raise ValueError(f"router statistics of {p.shape[-2]} rows for a token mask of "
                           f"{batch_N.shape[0]} (B x T)")
        mask_N = batch_N
      else:  # the soft prompts' pass, counted once per sample
        mask_N = jnp.full((p.shape[-2],), shared_weight, jnp.float32)
      p = p.reshape((-1,) + p.shape[-2:])
      c = c.reshape((-1,) + c.shape[-2:])
      tokens = tokens + jnp.einsum("lne,n->e", c, mask_N)
      probs = probs + jnp.einsum("lne,n->e", p, mask_N)
      rows = rows + p.shape[0] * jnp.sum(mask_N)
  rows = jnp.maximum(rows, 1.0)
  return groups[0][-1][0].shape[-1] * jnp.sum((tokens / rows) * (probs / rows))
