"""The loss-mask convention of every batch, and the reference next-token loss that follows it.

Convention (unshifted mask): `loss_mask[b, t] = 1` means token `input_ids[b, t]` is a target,
predicted from the logits at position t-1 of the same row. So the mask lies on the *targets*
(assistant content and its end-of-turn token), `loss_mask[:, 0] = 0`, and the first token of
every packed segment has mask 0: no token is ever predicted across a sample boundary. The
trainer computes `nll[t] = -log softmax(logits[t-1])[ids[t]]` and averages it over mask = 1.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_nll(logits_BTV: jax.Array, ids_BT: jax.Array, loss_mask_BT: jax.Array
                   ) -> jax.Array:
  """(B, T) float32: -log p(ids[t] | logits[t-1]) where loss_mask[t] = 1, else 0 (t = 0 too)."""
  logp = jax.nn.log_softmax(logits_BTV[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, ids_BT[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
  nll = jnp.pad(nll, ((0, 0), (1, 0)))
  return jnp.where(loss_mask_BT > 0, nll, 0.0)


def segment_losses(nll_BT: jax.Array, loss_mask_BT: jax.Array, segment_ids_BT: jax.Array,
                   num_segments: int) -> tuple[jax.Array, jax.Array]:
  """Mean target loss per packed segment: (B, S) losses and (B, S) target counts, where
  column k is segment id k + 1 (0 where a segment has no target)."""
  onehot_BTS = segment_ids_BT[..., None] == jnp.arange(1, num_segments + 1)
  weight_BTS = onehot_BTS * (loss_mask_BT > 0)[..., None]
  count_BS = weight_BTS.sum(axis=1)
  total_BS = jnp.einsum("bt,bts->bs", nll_BT, weight_BTS.astype(nll_BT.dtype))
  return total_BS / jnp.maximum(count_BS, 1), count_BS


def mean_token_loss(logits_BTV: jax.Array, batch: dict) -> jax.Array:
  """Scalar: the average next-token loss over all targets of a batch."""
  nll = next_token_nll(logits_BTV, batch["input_ids"], batch["loss_mask"])
  return nll.sum() / jnp.maximum(jnp.sum(batch["loss_mask"] > 0), 1)
