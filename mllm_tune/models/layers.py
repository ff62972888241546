"""Building blocks shared by the LLM and the vision towers.

`Linear` is the one place where tuning methods attach to the model (DESIGN.md section 4): it reads
whatever adapter leaves sit beside its kernel in the `adapters` collection and applies them, so
model code never branches on method names. Supported adapter leaves (all optional):

  lora_a (d_in, r), lora_b (r, d_out), lora_scale ()  ->  y += (s * (drop(x) @ A)) @ B
  lora_dropout ()                                     ->  dropout rate on the LoRA input, active
                                                          only when a 'dropout' rng is passed
  dora_m (d_out,)                                     ->  DoRA magnitude (peft's forward, below)
  vera_a (d_in, r), vera_b (r, d_out), vera_d (r,), vera_bvec (d_out,)
                                                      ->  y += (((drop(x) @ A) * d) @ B) * bvec
  ia3_in (d_in,)                                      ->  x  *= ia3_in     (before the matmul)
  ia3_out (d_out,)                                    ->  y  *= ia3_out    (after bias)
  extra_bias (d_out,)                                 ->  y  += extra_bias (BitFit on bias-free
                                                          layers)
  bottleneck_down (d_out, m), bottleneck_down_bias (m,), bottleneck_up (m, d_out),
  bottleneck_up_bias (d_out,)                         ->  y  += gelu(y Wdn + bdn) Wup + bup
                                                          (Houlsby adapter on the output, last;
                                                          METHODS.md 3.1)

Other modules read their own hooks (all optional, keyed by leaf name): `parallel_adapter` below
(FFN-level, METHODS.md 3.2), attention prefixes and LLaMA-Adapter prompts in `llm.Attention`,
prompt embeddings and prefix key/values in `llm.LLM`, visual prompts in `vision.VisionTower`.

The low-rank path is computed as `(s x A) B` (scalings on the rank-r side, so the backward pass
makes no extra pass over a (.., d_out) tensor); `A B` is materialized only for DoRA's weight norm.
DoRA follows peft: with x~ = drop(x), n = ||K0 + s A B|| per output column (stop-gradient),
`y = x K0 + b + (m/n - 1) * (x~ K0) + (m/n) * s (x~ A) B`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from mllm_tune.models.fused_ops import ACTIVATIONS, rms_norm

ADAPTERS = "adapters"


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
    x = x_BxI.reshape(-1, d_in).astype(dt)
    if self.has_variable(ADAPTERS, "ia3_in"):
      x = x * self.get_variable(ADAPTERS, "ia3_in").astype(dt)
    y = jnp.matmul(x, kernel.astype(dt))
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), dtype_of(self.param_dtype))
      y = y + bias.astype(dt)
    if self.has_variable(ADAPTERS, "extra_bias"):
      y = y + self.get_variable(ADAPTERS, "extra_bias").astype(dt)
    if self.has_variable(ADAPTERS, "lora_a"):
      y = y + self._lora(x, kernel.astype(dt), dt)
    if self.has_variable(ADAPTERS, "vera_a"):
      xd = self._dropout(x)
      get = lambda n: self.get_variable(ADAPTERS, n).astype(dt)
      # the (r,) and (d_out,) scalings go on the small factors, not on (.., d_out) outputs
      y = y + jnp.matmul(jnp.matmul(xd, get("vera_a")) * get("vera_d"),
                         get("vera_b") * get("vera_bvec"))
    if self.has_variable(ADAPTERS, "ia3_out"):
      y = y * self.get_variable(ADAPTERS, "ia3_out").astype(dt)
    if self.has_variable(ADAPTERS, "bottleneck_down"):
      y = y + self._bottleneck(y, dt)
    return y.reshape(*x_BxI.shape[:-1], self.features)

  def _bottleneck(self, y, dt):
    """Houlsby adapter delta `gelu(y Wdn + bdn) Wup + bup` (METHODS.md 3.1; exact-erf GELU)."""
    get = lambda n: self.get_variable(ADAPTERS, n).astype(dt)
    h = jax.nn.gelu(jnp.matmul(y, get("bottleneck_down")) + get("bottleneck_down_bias"),
                    approximate=False)
    return jnp.matmul(h, get("bottleneck_up")) + get("bottleneck_up_bias")

  def _adapter(self, name, default=None):
    return self.get_variable(ADAPTERS, name) if self.has_variable(ADAPTERS, name) else default

  def _dropout(self, x):
    rate = self._adapter("lora_dropout")
    if rate is None or not self.has_rng("dropout"):
      return x
    rate = jnp.asarray(rate, jnp.float32)
    keep = jax.random.uniform(self.make_rng("dropout"), x.shape) >= rate
    return jnp.where(keep, x / (1.0 - rate).astype(x.dtype), jnp.zeros_like(x))

  def _lora(self, x, k0, dt):
    a = self.get_variable(ADAPTERS, "lora_a").astype(dt)
    b = self.get_variable(ADAPTERS, "lora_b").astype(dt)
    scale = jnp.asarray(self._adapter("lora_scale", 1.0), dt)
    xd = self._dropout(x)
    delta = jnp.matmul(jnp.matmul(xd, a) * scale, b)  # scale the rank-r side (cheaper)
    m = self._adapter("dora_m")
    if m is None:
      return delta
    norm = jax.lax.stop_gradient(jnp.linalg.norm(
        (k0 + scale * jnp.matmul(a, b)).astype(jnp.float32), axis=0)).astype(dt)
    ratio = m.astype(dt) / norm
    return (ratio - 1.0) * jnp.matmul(xd, k0) + ratio * delta


def parallel_adapter(module: nn.Module, x_BxD: jax.Array, y_BxD: jax.Array) -> jax.Array:
  """FFN-level hook: `y + s * relu(x Wdn) Wup` when `parallel_down (D, m)`, `parallel_up (m, D)`
  and `parallel_scale ()` sit in `module`'s adapters (METHODS.md 3.2; x is the FFN input)."""
  if not module.has_variable(ADAPTERS, "parallel_down"):
    return y_BxD
  get = lambda n: module.get_variable(ADAPTERS, n).astype(y_BxD.dtype)
  h = jax.nn.relu(jnp.matmul(x_BxD.astype(y_BxD.dtype), get("parallel_down")))
  return y_BxD + get("parallel_scale") * jnp.matmul(h, get("parallel_up"))


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
