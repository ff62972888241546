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


def router_stats(intermediates: dict) -> list[tuple[jax.Array, jax.Array]]:
  """Every sown (probs, counts) pair, each (L, N, E) (scanned layers) or (N, E), in tree
  order."""
  out = []

  def walk(node):
    if isinstance(node, dict):
      for k in sorted(node):
        if k == ROUTER_STATS:
          out.extend(node[k])
        else:
          walk(node[k])
  walk(intermediates)
  return out


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

  Statistics of a pass over other rows than the batch's B x T (the soft prompts, run once and
  seen by every sample: `models/llm.py`) count `shared_weight` times each, the number of samples
  (`sample_count`), as if every sample had the prompt tokens in front of it (peft's prompt
  tuning, whose virtual tokens sit in every row with mask 1)."""
  stats = router_stats(intermediates)
  if not stats:
    raise ValueError("no router statistics were recorded: the model has no mixture-of-experts "
                     "layers, or it was not applied with mutable=['intermediates']")
  batch_N = jnp.asarray(token_mask_BT, jnp.float32).reshape(-1)
  tokens = probs = rows = 0.0
  for p, c in stats:
    mask_N = batch_N
    if p.shape[-2] != batch_N.shape[0]:
      if shared_weight is None:
        raise ValueError(f"router statistics of {p.shape[-2]} rows for a token mask of "
                         f"{batch_N.shape[0]} (B x T): a pass over other rows (e.g. soft "
                         "prompts run on their own) was recorded; give shared_weight")
      mask_N = jnp.full((p.shape[-2],), shared_weight, jnp.float32)
    p = p.reshape((-1,) + p.shape[-2:])
    c = c.reshape((-1,) + c.shape[-2:])
    tokens = tokens + jnp.einsum("lne,n->e", c, mask_N)
    probs = probs + jnp.einsum("lne,n->e", p, mask_N)
    rows = rows + p.shape[0] * jnp.sum(mask_N)
  rows = jnp.maximum(rows, 1.0)
  return stats[0][0].shape[-1] * jnp.sum((tokens / rows) * (probs / rows))
