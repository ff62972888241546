"""`models.fused_ops`: RMSNorm and the gated MLP activation with hand-written VJPs, against
float64 NumPy formulas (values and gradients, float32 and bf16), and what they keep for the
backward (the reason they exist)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_tune.models.fused_ops import ACTIVATIONS, GATED_ACTS, gated_act, rms_norm


def _np_rms(x, w, eps, dy):
  r = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
  n = x * r
  dn = dy * w
  dx = r * (dn - n * (dn * n).mean(-1, keepdims=True))
  return w * n, dx, (dy * n).reshape(-1, x.shape[-1]).sum(0)


_ERF = np.vectorize(math.erf)
_NP_ACTS = {  # value, derivative (float64)
    "silu": (lambda g: g / (1 + np.exp(-g)),
             lambda g: (1 / (1 + np.exp(-g))) * (1 + g * (1 - 1 / (1 + np.exp(-g))))),
    "gelu": (lambda g: 0.5 * g * (1 + _ERF(g / np.sqrt(2))),
             lambda g: 0.5 * (1 + _ERF(g / np.sqrt(2))) + g * np.exp(-g * g / 2)
             / np.sqrt(2 * np.pi)),
}
_NP_ACTS["gelu_pytorch_tanh"] = (
    lambda g: 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3))),
    None)  # derivative by central differences below


def _np_act_grad(name, g):
  f, df = _NP_ACTS[name]
  if df is not None:
    return df(g)
  h = 1e-6
  return (f(g + h) - f(g - h)) / (2 * h)


@pytest.mark.parametrize("dtype, tol", [("float32", 2e-6), ("bfloat16", 2e-2)])
def test_rms_norm_value_and_gradients_match_float64(dtype, tol):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 16)).astype(np.float32) * 3
  w = (1 + 0.1 * rng.normal(size=(16,))).astype(np.float32)
  dy = rng.normal(size=x.shape).astype(np.float32)
  dt = jnp.dtype(dtype)
  xj, wj = jnp.asarray(x, dt), jnp.asarray(w, dt)
  y, vjp = jax.vjp(lambda a, b: rms_norm(a, b, 1e-6, dt), xj, wj)
  dx, dw = vjp(jnp.asarray(dy, dt))
  f64 = lambda a: np.asarray(jnp.asarray(a, dt).astype(jnp.float32), np.float64)
  want_y, want_dx, want_dw = _np_rms(f64(x), f64(w), 1e-6, f64(dy))
  assert y.dtype == dx.dtype == dw.dtype == dt
  for got, want in ((y, want_y), (dx, want_dx), (dw, want_dw)):
    err = np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()
    assert err < tol, err


def test_rms_norm_forward_is_bit_identical_to_the_plain_formula():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(3, 7, 32)), jnp.bfloat16)
  w = jnp.asarray(1 + rng.normal(size=(32,)), jnp.float32)
  xf = x.astype(jnp.float32)
  plain = w.astype(jnp.bfloat16) * (xf * jax.lax.rsqrt((xf * xf).mean(-1, keepdims=True)
                                                       + 1e-5)).astype(jnp.bfloat16)
  assert np.array_equal(np.asarray(rms_norm(x, w, 1e-5, jnp.bfloat16), np.float32),
                        np.asarray(plain, np.float32))


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_gated_act_value_and_gradients_match_float64(act, dtype, tol):
  assert act in GATED_ACTS
  rng = np.random.default_rng(2)
  g, u, dy = (rng.normal(size=(4, 24)).astype(np.float32) * 2 for _ in range(3))
  dt = jnp.dtype(dtype)
  y, vjp = jax.vjp(lambda a, b: gated_act(a, b, act), jnp.asarray(g, dt), jnp.asarray(u, dt))
  dg, du = vjp(jnp.asarray(dy, dt))
  f64 = lambda a: np.asarray(jnp.asarray(a, dt).astype(jnp.float32), np.float64)
  g64, u64, dy64 = f64(g), f64(u), f64(dy)
  f = _NP_ACTS[act][0]
  want = {"y": f(g64) * u64, "dg": dy64 * u64 * _np_act_grad(act, g64), "du": dy64 * f(g64)}
  for name, got in (("y", y), ("dg", dg), ("du", du)):
    assert got.dtype == dt
    err = np.abs(np.asarray(got, np.float64) - want[name]).max() / np.abs(want[name]).max()
    assert err < tol, (name, err)
  plain = ACTIVATIONS[act](jnp.asarray(g, dt)) * jnp.asarray(u, dt)
  assert np.array_equal(np.asarray(y, np.float32), np.asarray(plain, np.float32))


def _residual_bytes(fn, *args):
  """Bytes of the residuals `jax.vjp` keeps for `fn` (what a training step stores)."""
  _, vjp = jax.vjp(fn, *args)
  arrays = [x for x in jax.tree.leaves(vjp) if hasattr(x, "nbytes")]
  return sum(x.nbytes for x in {id(a): a for a in arrays}.values())


def test_fused_ops_keep_fewer_residuals_than_autodiff():
  """bf16 (256, 512): RMSNorm keeps x + 1/rms (autodiff: a float32 copy of x and the
  normalized bf16 value too); the gated activation keeps gate and up (autodiff: four tensors)."""
  x = jnp.ones((256, 512), jnp.bfloat16)
  w = jnp.ones((512,), jnp.bfloat16)
  plain_rms = lambda a, b: b * (a.astype(jnp.float32) * jax.lax.rsqrt(
      (a.astype(jnp.float32) ** 2).mean(-1, keepdims=True) + 1e-6)).astype(jnp.bfloat16)
  lean = _residual_bytes(lambda a, b: rms_norm(a, b, 1e-6, jnp.bfloat16), x, w)
  assert lean <= x.nbytes + 256 * 4 + w.nbytes
  assert _residual_bytes(plain_rms, x, w) >= 2 * x.nbytes + lean - x.nbytes
  up = jnp.full((256, 512), 2.0, jnp.bfloat16)
  lean = _residual_bytes(lambda a, b: gated_act(a, b, "silu"), x, up)
  assert lean == 2 * x.nbytes
  assert _residual_bytes(lambda a, b: jax.nn.silu(a) * b, x, up) >= 3 * x.nbytes
