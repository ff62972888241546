"""Token losses under the batch convention of data/targets.py (the mask lies on the targets;
position t-1 predicts token t): per-token log-probs and NLL, per-segment means, and the trainer's
summed cross-entropy with a fused backward pass."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def token_logprobs(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
  """(B, T) float32 `log softmax(logits)[b, t, targets[b, t]]` (targets already aligned)."""
  logp = jax.nn.log_softmax(jnp.asarray(logits_BTV, jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, jnp.asarray(targets_BT)[..., None], axis=-1)[..., 0]


def next_token_nll(logits_BTV: jax.Array, ids_BT: jax.Array, loss_mask_BT: jax.Array
                   ) -> jax.Array:
  """(B, T) float32: -log p(ids[t] | logits[t-1]) where loss_mask[t] = 1, else 0 (t = 0 too)."""
  nll = -token_logprobs(logits_BTV[:, :-1], ids_BT[:, 1:].astype(jnp.int32))
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


def shifted_targets(ids_BT: jax.Array, loss_mask_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(targets, weights) (B, T): position t predicts token t+1 (the last position nothing)."""
  targets_BT = jnp.pad(ids_BT[:, 1:], ((0, 0), (0, 1)))
  w_BT = jnp.pad(loss_mask_BT[:, 1:].astype(jnp.float32), ((0, 0), (0, 1)))
  return targets_BT, w_BT


def first_max_index(x_BxV: jax.Array, max_Bx: jax.Array) -> jax.Array:
  """`argmax(x, -1)` given the row maxima: the first index holding the maximum, as one plain
  min-reduction (XLA:CPU runs jnp.argmax's (value, index) reduction several times slower).
  A row holding NaN gives V (no index), where argmax would give the NaN's index."""
  iota = lax.broadcasted_iota(jnp.int32, x_BxV.shape, x_BxV.ndim - 1)
  return jnp.min(jnp.where(x_BxV == max_Bx[..., None], iota, x_BxV.shape[-1]), axis=-1)


def token_ce(logits_BTV: jax.Array, ids_BT: jax.Array, loss_mask_BT: jax.Array):
  """(sum of NLL over targets, number of targets, number of correct argmax predictions).

  Position t predicts token t+1; the targets are shifted rather than the logits sliced, so the
  backward pass writes the (B, T, V) logit gradient once (softmax - one-hot, `_nll`'s VJP)
  instead of scattering into a fresh buffer and padding it."""
  targets_BT, w_BT = shifted_targets(ids_BT, loss_mask_BT)
  nll_BT = _nll(logits_BTV, targets_BT) * w_BT
  max_BT = jnp.max(logits_BTV, axis=-1)
  correct_BT = (first_max_index(logits_BTV, max_BT) == targets_BT).astype(jnp.float32) * w_BT
  return nll_BT.sum(), w_BT.sum(), correct_BT.sum()


@jax.custom_vjp
def _nll(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
  """`logsumexp(logits) - logits[target]` per position, in float32."""
  return _nll_fwd(logits_BTV, targets_BT)[0]


def _nll_fwd(logits_BTV, targets_BT):
  lf = logits_BTV.astype(jnp.float32)
  lse_BT = jax.nn.logsumexp(lf, axis=-1)
  picked_BT = jnp.take_along_axis(lf, targets_BT[..., None], axis=-1)[..., 0]
  return lse_BT - picked_BT, (logits_BTV, targets_BT, lse_BT)


def _nll_bwd(res, g_BT):
  logits_BTV, targets_BT, lse_BT = res
  p_BTV = jnp.exp(logits_BTV.astype(jnp.float32) - lse_BT[..., None])
  onehot_BTV = jax.lax.broadcasted_iota(jnp.int32, logits_BTV.shape, 2) == targets_BT[..., None]
  d_BTV = (p_BTV - onehot_BTV.astype(jnp.float32)) * g_BT[..., None]
  return d_BTV.astype(logits_BTV.dtype), None


_nll.defvjp(_nll_fwd, _nll_bwd)
