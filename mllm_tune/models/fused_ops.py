"""RMSNorm and the gated MLP activation with hand-written VJPs that keep few residuals.

Left to autodiff, `RMSNorm` saves a float32 copy of its input and the normalized activations
(1.5x a bf16 input's bytes beside the input itself) and `silu(gate) * up` saves the gate, its
sigmoid, the activation and `up` (four (B, T, F) tensors). These versions save only what the
backward cannot cheaply recompute:

  rms_norm(x, scale, eps, dtype)   residuals: x (its own dtype), 1/rms (B, T, 1) float32, scale
  gated_act(gate, up, act)         residuals: gate and up

The forward values are bit-identical to the plain formulas (same float32 statistics, same
casts). The backward computes in float32 and rounds once to each input's dtype, so its results
may differ from autodiff's bf16 chains in the last bit. Reverse mode only (`jax.custom_vjp`).
With one shared input view for q/k/v and for gate/up (llm.py), what a training step of the
1.5B benchmark model keeps per layer and 2048-token sample fell from 263 MB to 140 MB
(`jax.ad_checkpoint.print_saved_residuals`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


# ----------------------------------------------------------------------------- RMSNorm
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def rms_norm(x_BxD: jax.Array, scale_D: jax.Array, eps: float, dtype) -> jax.Array:
  """`scale * (x / sqrt(mean(x^2) + eps))`, statistics in float32, result in `dtype` (HF's
  LlamaRMSNorm: normalize in float32, cast, then multiply by the weight)."""
  return _rms_fwd(x_BxD, scale_D, eps, dtype)[0]


def _rms_fwd(x_BxD, scale_D, eps, dtype):
  x = x_BxD.astype(jnp.float32)
  inv_rms = jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  y = scale_D.astype(dtype) * (x * inv_rms).astype(dtype)
  return y, (x_BxD, inv_rms, scale_D)


def _rms_bwd(eps, dtype, res, dy_BxD):
  x_BxD, inv_rms, scale_D = res
  x = x_BxD.astype(jnp.float32)
  n = (x * inv_rms).astype(dtype)                      # the normalized value the forward used
  dy = dy_BxD.astype(jnp.float32)
  dscale = jnp.sum((dy * n.astype(jnp.float32)).reshape(-1, x.shape[-1]), axis=0)
  dn = (dy_BxD.astype(dtype) * scale_D.astype(dtype)).astype(jnp.float32)
  nf = x * inv_rms
  dx = inv_rms * (dn - nf * jnp.mean(dn * nf, axis=-1, keepdims=True))
  return dx.astype(x_BxD.dtype), dscale.astype(scale_D.dtype)


rms_norm.defvjp(lambda x, s, eps, dt: _rms_fwd(x, s, eps, dt), _rms_bwd)


# ----------------------------------------------------------------------------- gated MLP
# HF `ACT2FN` names -> JAX functions (exact formulas, not approximations)
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
}


def _silu_and_grad(g):
  sig = jax.nn.sigmoid(g)
  return g * sig, sig * (1.0 + g * (1.0 - sig))


def _gelu_tanh_and_grad(g):
  c = 0.7978845608028654  # sqrt(2 / pi)
  inner = c * (g + 0.044715 * g ** 3)
  t = jnp.tanh(inner)
  return 0.5 * g * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * c * (
      1.0 + 3 * 0.044715 * g * g)


def _gelu_and_grad(g):
  return (jax.nn.gelu(g, approximate=False),
          0.5 * (1.0 + jax.lax.erf(g * 0.7071067811865476))
          + g * jnp.exp(-0.5 * g * g) * 0.3989422804014327)


# activations whose derivative is written out; `gated_act` takes only these
GATED_ACTS = {"silu": _silu_and_grad, "gelu_pytorch_tanh": _gelu_tanh_and_grad,
              "gelu_new": _gelu_tanh_and_grad, "gelu": _gelu_and_grad}


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def gated_act(gate_BxF: jax.Array, up_BxF: jax.Array, act: str) -> jax.Array:
  """`act(gate) * up` (Llama/Qwen2/Mistral MLP), computed in the inputs' dtype as the plain
  formula; the backward recomputes act(gate) and its derivative from `gate`."""
  return ACTIVATIONS[act](gate_BxF) * up_BxF


def _gated_fwd(gate_BxF, up_BxF, act):
  return ACTIVATIONS[act](gate_BxF) * up_BxF, (gate_BxF, up_BxF)


def _gated_bwd(act, res, dy_BxF):
  gate, up = res
  a, da = GATED_ACTS[act](gate.astype(jnp.float32))
  dy = dy_BxF.astype(jnp.float32)
  return (dy * up.astype(jnp.float32) * da).astype(gate.dtype), (dy * a).astype(up.dtype)


gated_act.defvjp(_gated_fwd, _gated_bwd)
