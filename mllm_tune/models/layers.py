"""Building blocks shared by the LLM and the vision towers.

`Linear` is the one place where tuning methods attach to a matmul (docs/design.md §4): after
`x @ kernel + bias` it asks `adapters.py` to apply whatever adapter leaves sit beside its kernel in
the `adapters` collection, so model code never branches on method names. The leaf names, their
shapes, owners and math are the table in `adapters.py`; other modules read their own hooks from it
too (`adapters.parallel_adapter` in the FFNs, LLaMA-Adapter prompts in `llm.Attention`, prompt
embeddings and prefix key/values in `llm.LLM`, visual prompts in `vision.VisionTower`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from mllm_tune.models import adapters
from mllm_tune.models.fused_ops import ACTIVATIONS, rms_norm


def dtype_of(name: str):
  return jnp.dtype(name)


def activation(name: str):
  """HF `ACT2FN` names -> JAX functions (exact formulas, not approximations)."""
  if name not in ACTIVATIONS:
    raise ValueError(f"activation '{name}' is not supported (supported: {sorted(ACTIVATIONS)})")
  return ACTIVATIONS[name]


def default_kernel_init():
  """Init for kernels (d_in, d_out): N(0, 0.02), HF's `initializer_range` default."""
  return nn.initializers.normal(0.02)


class Linear(nn.Module):
  """`y = x @ kernel + bias`, kernel (d_in, d_out), plus any adapter found beside it."""
  features: int
  use_bias: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x_BxI: jax.Array) -> jax.Array:
    d_in = x_BxI.shape[-1]
    dt = dtype_of(self.dtype)
    kernel = self.param("kernel", default_kernel_init(), (d_in, self.features),
                        dtype_of(self.param_dtype))
    # Flattened to rows (N, d_in): the weight gradients then contract one row axis, which
    # XLA:CPU feeds to its GEMM without a transposed copy of the (N, d_out) output gradient
    # (with (B, T) it copies it once per kernel and adapter factor).
    x = adapters.scale_input(self, x_BxI.reshape(-1, d_in).astype(dt), dt)
    k = kernel.astype(dt)
    y = jnp.matmul(x, k)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), dtype_of(self.param_dtype))
      y = y + bias.astype(dt)
    y = adapters.apply_linear(self, x, y, k, dt)
    return y.reshape(*x_BxI.shape[:-1], self.features)


class RMSNorm(nn.Module):
  """Llama RMSNorm: `x / sqrt(mean(x^2) + eps) * scale`, statistics in float32 (as HF); a
  custom VJP keeps only x and 1/rms for the backward (`fused_ops.rms_norm`)."""
  eps: float = 1e-6
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x_BxD: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, (x_BxD.shape[-1],),
                       dtype_of(self.param_dtype))
    return rms_norm(x_BxD, scale, self.eps, dtype_of(self.dtype))


class LayerNorm(nn.Module):
  """LayerNorm with `scale` and `bias`, statistics in float32."""
  eps: float = 1e-5
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x_BxD: jax.Array) -> jax.Array:
    d = x_BxD.shape[-1]
    pdt = dtype_of(self.param_dtype)
    scale = self.param("scale", nn.initializers.ones, (d,), pdt)
    bias = self.param("bias", nn.initializers.zeros, (d,), pdt)
    x = x_BxD.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32) + bias.astype(
        jnp.float32)
    return y.astype(dtype_of(self.dtype))
