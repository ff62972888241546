"""The LLM's token embedding with its adapters (trainable tokens, LoRA on the lookup) and HF's
padding_idx gradient rule; its leaves are listed in `models/adapters.py`."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from mllm_tune.models.adapters import (ADAPTERS, DORA_M, LORA_A, LORA_B, LORA_SCALE,
                                       TOKEN_INDICES, TOKEN_ROWS)


def column_norms(e_VD, a_Vr, b_rD, s) -> jax.Array:
  """||E + s A B|| over the vocabulary, per column (D,), in float32, without forming the
  (V, D) sum: ||E_d||^2 + 2 s (E^T A)_d . B_d + s^2 B_d^T (A^T A) B_d."""
  e, a, b = (x.astype(jnp.float32) for x in (e_VD, a_Vr, b_rD))
  sq = (jnp.sum(jnp.square(e), axis=0) + 2.0 * s * jnp.sum((e.T @ a) * b.T, axis=1)
        + jnp.square(s) * jnp.sum(b * ((a.T @ a) @ b), axis=0))
  return jnp.sqrt(jnp.maximum(sq, 0.0))


class TokenEmbed(nn.Embed):
  """`nn.Embed` (params `embedding` (V, D)) with two optional adapters:
  - rows `token_indices` replaced by the leaf `token_rows` (n, D) (trainable tokens, peft's
    `TrainableTokens`): the lookup reads them, and so does `attend` (a tied LM head), whose
    logits for those tokens are the hidden states times the replaced rows;
  - LoRA on the lookup, `lora_a` (V, r), `lora_b` (r, D), `lora_scale` (): `+ (s A_t) B`
    (peft's `Embedding`; untied heads only, so `attend` ignores it); with DoRA's `dora_m` (D,)
    the sum is scaled per feature by m / n, n the norm over the vocabulary of each column of
    E + s A B (stop-gradient), as peft's `DoraEmbeddingLayer`.
  Without the leaves it is `nn.Embed`. `pad_id` (HF's padding_idx): the rows read for that id
  (of the table, of `lora_a`, of `token_rows`) pass no gradient, as torch's
  `nn.Embedding(padding_idx)` (B of the LoRA still gets its gradient there, as in peft)."""
  pad_id: int | None = None

  def _gathered(self, inputs, rows):
    """Rows looked up for `inputs`, with no gradient where the id is `pad_id`."""
    if self.pad_id is None:
      return rows
    return jnp.where((inputs == self.pad_id)[..., None], jax.lax.stop_gradient(rows), rows)

  def _rows(self):
    if not self.has_variable(ADAPTERS, TOKEN_ROWS):
      return None
    return self.get_variable(ADAPTERS, TOKEN_ROWS), self.get_variable(ADAPTERS, TOKEN_INDICES)

  def __call__(self, inputs):
    out = self._gathered(inputs, super().__call__(inputs))
    lora = self.has_variable(ADAPTERS, LORA_A)
    if lora:
      a_Vr, b_rD = self.get_variable(ADAPTERS, LORA_A), self.get_variable(ADAPTERS, LORA_B)
      s = self.get_variable(ADAPTERS, LORA_SCALE)
      low = (s * self._gathered(inputs, jnp.take(a_Vr, inputs, axis=0))).astype(out.dtype)
      out = out + low @ b_rD.astype(out.dtype)
      if self.has_variable(ADAPTERS, DORA_M):
        m_D = self.get_variable(ADAPTERS, DORA_M)
        n_D = jax.lax.stop_gradient(column_norms(self.embedding, a_Vr, b_rD, s))
        out = out * (m_D / n_D).astype(out.dtype)
    rows = self._rows()
    if rows is None:
      return out
    if lora:
      raise ValueError("llm/embed holds both LoRA factors and trainable token rows; use one")
    rows_nD, idx_n = rows
    slot_V = jnp.full((self.num_embeddings,), -1, jnp.int32).at[idx_n].set(
        jnp.arange(idx_n.shape[0], dtype=jnp.int32))
    slot = slot_V[inputs]
    new = self._gathered(inputs, jnp.take(rows_nD, jnp.maximum(slot, 0), axis=0))
    return jnp.where((slot >= 0)[..., None], new.astype(out.dtype), out)

  def attend(self, query):
    out = super().attend(query)
    rows = self._rows()
    if rows is None:
      return out
    rows_nD, idx_n = rows
    dt = out.dtype
    return out.at[..., idx_n].set(jnp.dot(query.astype(dt), rows_nD.astype(dt).T))
