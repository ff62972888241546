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


def router_balance_loss(intermediates: dict, token_mask_BT: jax.Array) -> jax.Array:
  """The load-balancing loss (scalar float32) of the router statistics a forward pass with
  `mutable=["intermediates"]` sowed; rows where `token_mask` is 0 (padding) are left out."""
  stats = router_stats(intermediates)
  if not stats:
    raise ValueError("no router statistics were recorded: the model has no mixture-of-experts "
                     "layers, or it was not applied with mutable=['intermediates']")
  mask_N = jnp.asarray(token_mask_BT, jnp.float32).reshape(-1)
  tokens = probs = rows = 0.0
  for p, c in stats:
    if p.shape[-2] != mask_N.shape[0]:
      raise ValueError(f"router statistics of {p.shape[-2]} rows for a token mask of "
                       f"{mask_N.shape[0]} (B x T): a pass over other rows (e.g. soft prompts "
                       "run on their own) was recorded")
    p = p.reshape((-1,) + p.shape[-2:])
    c = c.reshape((-1,) + c.shape[-2:])
    tokens = tokens + jnp.einsum("lne,n->e", c, mask_N)
    probs = probs + jnp.einsum("lne,n->e", p, mask_N)
    rows = rows + p.shape[0] * jnp.sum(mask_N)
  rows = jnp.maximum(rows, 1.0)
  return stats[0][0].shape[-1] * jnp.sum((tokens / rows) * (probs / rows))
