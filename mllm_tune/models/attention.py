"""Scaled dot-product attention with grouped KV heads, three implementations (`attention_impl`)
and a rule that picks one per call site ("auto", the default):

  "lse"    (default) our custom-VJP attention: the forward saves only q, k, v, the output and the
           per-row softmax statistics (max and sum, i.e. the logsumexp); the backward recomputes
           the probabilities from them and uses FlashAttention-2's identity
           `rowsum(dP * P) = rowsum(dO * O)`, so no (B, N, T, S) tensor is stored between the
           passes and the softmax backward reduces over the head dimension instead of over keys.
           The math is FlashAttention's without the tiling (XLA sees whole (T, S) blocks), which
           is what XLA:CPU and small sequence lengths want. Inside, heads come first
           (q (B, K, G, T, H), k/v (B, K, S, H)): batched (T, H) x (H, S) products need no
           transposed copy of a (T, S) block on XLA:CPU, and the backward computes dV and dK
           transposed for the same reason. With `causal=True` (the LLM's training and prefill
           calls) the queries run in up to 4 blocks, each against the keys up to its end
           (`causal_blocks`), which skips 3/8 of the (T, S) work at T = 512. On one CPU
           device, calls whose score tensor exceeds `GROUP_BYTES` run one (batch, KV head)
           group at a time (`lse_groups`), so each group's (T, S) blocks stay in cache.
  "xla"    `jax.nn.dot_product_attention(implementation="xla")` (saves the probabilities).
  "cudnn"  `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN's fused flash
           attention on NVIDIA GPUs (bf16/fp16 inputs).

  "auto"   `choose_attention` decides at trace time, per call site (each tower, each shape):
           cuDNN where the backend takes the shape and dtype, "lse" everywhere else. The choice
           for each site is logged once (logger `mllm_tune.attention`).

All three take `q (B, T, N, H)`, `k, v (B, S, K, H)` with N = K * groups, and a boolean mask
(B, T, S) (True = attend), scale 1/sqrt(H), logits and softmax in float32, keys and values cast
to the query's dtype. A fully masked query row (padding) attends uniformly to all keys, or to
its causal block's keys (finite garbage, never NaN), and sends no gradient to q or k, as in
`jax.nn.dot_product_attention`.
"""
from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mllm_tune.models.config import ATTENTION_IMPLS

_log = logging.getLogger("mllm_tune.attention")

# jax.nn.dot_product_attention's fill value for masked logits (finite, so a fully masked row
# gives a uniform softmax instead of NaN)
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


class AttentionChoice(NamedTuple):
  implementation: str  # "lse" | "xla" | "cudnn"
  reason: str


def choose_attention(requested: str, *, platform: str, dtype, head_dim: int, q_len: int,
                     kv_len: int, training: bool, max_head_dim: int = 128) -> AttentionChoice:
  """Which implementation runs one attention call: a pure function of the backend and shapes.

  `requested` "lse" / "xla" are taken as they are. "cudnn" and "auto" ask whether cuDNN's
  fused flash attention (through `jax.nn.dot_product_attention`) takes the call: `platform`
  "cuda" (an NVIDIA GPU), bf16/fp16 inputs, a head dim that is a multiple of 8 and at most
  `max_head_dim` (256 on Hopper and later, 128 before), and, when the call may be
  differentiated (`training`), even query and key lengths (JAX's cuDNN backward rule rejects odd
  ones, e.g. CLIP ViT's 197 or 577 tokens). "auto" falls back to "lse" where cuDNN does not take
  the call; an explicit "cudnn" that cannot run raises a ValueError naming the reason."""
  if requested not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {requested!r}")
  if requested in ("lse", "xla"):
    return AttentionChoice(requested, "requested")
  why_not = None
  dt = jnp.dtype(dtype)
  if platform != "cuda":
    why_not = f"platform {platform} (cuDNN needs an NVIDIA GPU)"
  elif dt not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    why_not = f"dtype {dt.name} (cuDNN flash attention takes bf16/fp16)"
  elif head_dim % 8 or head_dim > max_head_dim:
    why_not = f"head dim {head_dim} (cuDNN: a multiple of 8, at most {max_head_dim})"
  elif training and (q_len % 2 or kv_len % 2):
    why_not = f"odd length (Q {q_len}, KV {kv_len}) in a differentiable call"
  if why_not is None:
    return AttentionChoice("cudnn", "supported" if requested == "auto" else "requested")
  if requested == "cudnn":
    raise ValueError(f"attention_impl 'cudnn' cannot run this call: {why_not}; use "
                     "attention_impl 'auto' (cuDNN where it runs, 'lse' elsewhere)")
  return AttentionChoice("lse", f"cuDNN not taken: {why_not}")


@functools.lru_cache(maxsize=None)
def backend_facts() -> tuple[str, int]:
  """(platform, max cuDNN head dim) of the default backend: "cuda" for NVIDIA GPUs."""
  dev = jax.devices()[0]
  if dev.platform != "gpu" or "cuda" not in getattr(dev.client, "platform_version", "").lower():
    return dev.platform, 128
  major = int(str(getattr(dev, "compute_capability", "0")).split(".")[0])
  return "cuda", 256 if major >= 9 else 128


# "lse" on one CPU device: score tensors (B, N, T, S) in float32 above this size run per group
GROUP_BYTES = 64 * 2**20


def lse_groups(platform: str, devices: int, b: int, n: int, t: int, s: int,
               group_bytes: int | None = None) -> bool:
  """Whether the "lse" attention runs its (batch, KV head) groups one after another
  (`jax.lax.map`) instead of in one batched call: on a single CPU device, when the float32
  score tensor (B, N, T, S) exceeds `group_bytes` (default `GROUP_BYTES`). A group's (G, T, S)
  blocks then stay in the core's cache through the softmax's element-wise passes instead of
  going to memory and back: forward + backward of a causal layer (B 4, N 8, 4 KV heads, head
  dim 64) took 13% less time at T = 1024 (128 MiB of scores) and 21% less at 2048, and 12%
  more at 512 (32 MiB), where the loop's per-group cost wins. Accelerators and meshes keep the
  batched call (a loop over a sharded axis would gather it)."""
  limit = GROUP_BYTES if group_bytes is None else group_bytes
  return platform == "cpu" and devices == 1 and b * n > 1 and 4 * b * n * t * s > limit


def _per_group(fn, q_BKGTH, k_BKSH, v_BKSH, mask_BTS):
  """`fn` (an "lse" attention on (B, K, G, T, H) / (B, K, S, H) / (B, T, S)) on one (batch,
  KV head) group at a time, in a `lax.map`; same values, same gradients."""
  b, kv, g, t, h = q_BKGTH.shape
  s = k_BKSH.shape[2]

  def one(args):
    q_GTH, k_SH, v_SH, i = args
    m_1TS = jax.lax.dynamic_index_in_dim(mask_BTS, i // kv, keepdims=True)
    return fn(q_GTH[None, None], k_SH[None, None], v_SH[None, None], m_1TS)[0, 0]
  o = jax.lax.map(one, (q_BKGTH.reshape(b * kv, g, t, h), k_BKSH.reshape(b * kv, s, h),
                        v_BKSH.reshape(b * kv, s, h), jnp.arange(b * kv)))
  return o.reshape(b, kv, g, t, h)


_LOGGED: set = set()


def resolve_attention(requested: str, site: str, q_BTNH: jax.Array, k_BSKH: jax.Array,
                      training: bool) -> str:
  """`choose_attention` for this call's backend and shapes; logs each site's choice once."""
  if requested in ("lse", "xla"):
    return requested
  platform, max_head_dim = backend_facts()
  choice = choose_attention(requested, platform=platform, dtype=q_BTNH.dtype,
                            head_dim=q_BTNH.shape[-1], q_len=q_BTNH.shape[1],
                            kv_len=k_BSKH.shape[1], training=training,
                            max_head_dim=max_head_dim)
  key = (site, choice, q_BTNH.shape[1], k_BSKH.shape[1])
  if key not in _LOGGED:
    _LOGGED.add(key)
    _log.info("attention %s (Q %d, KV %d, head dim %d, %s): %s (%s)", site, q_BTNH.shape[1],
              k_BSKH.shape[1], q_BTNH.shape[-1], jnp.dtype(q_BTNH.dtype).name,
              choice.implementation, choice.reason)
  return choice.implementation


def attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
              mask_BTS: jax.Array | None, implementation: str = "lse", *, site: str = "attention",
              training: bool = True, causal: bool = False) -> jax.Array:
  """Attention output (B, T, N, H). `implementation` is one of ATTENTION_IMPLS ("auto" is
  resolved here by `choose_attention`); `site` names the call site in the log, `training`
  says whether the call may be differentiated (False only on KV-cache decoding). `causal`
  promises that `mask_BTS` hides every key s > t (T == S): the fused kernels (cuDNN, and
  XLA's) then skip the upper triangle instead of reading it from the mask; the result is the
  same."""
  k_BSKH = k_BSKH.astype(q_BTNH.dtype)
  v_BSKH = v_BSKH.astype(q_BTNH.dtype)
  implementation = resolve_attention(implementation, site, q_BTNH, k_BSKH, training)
  if implementation == "lse":
    b, t, n, h = q_BTNH.shape
    kv = k_BSKH.shape[2]
    # heads-major inside (batched (T, H) x (H, S) products): transposing q, k, v and the
    # output is cheaper than XLA:CPU's transposed copies of (T, S) blocks otherwise
    q_BKGTH = q_BTNH.reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4)
    k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)
    if mask_BTS is None:
      mask_BTS = jnp.ones((b, t, k_BSKH.shape[1]), bool)
    s = k_BSKH.shape[1]
    if causal and t == s:
      fn = functools.partial(_causal_attention, blocks=causal_blocks(t))
    else:
      fn = _lse_attention
    if lse_groups(backend_facts()[0], jax.device_count(), b, n, t, s):
      o_BKGTH = _per_group(fn, q_BKGTH, k_BKSH, v_BKSH, mask_BTS)
    else:
      o_BKGTH = fn(q_BKGTH, k_BKSH, v_BKSH, mask_BTS)
    return o_BKGTH.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
  mask = None if mask_BTS is None else mask_BTS[:, None, :, :]
  is_causal = causal and q_BTNH.shape[1] == k_BSKH.shape[1]
  return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask, is_causal=is_causal,
                                      implementation=implementation)


def causal_blocks(t: int, rows: int = 128, max_blocks: int = 4) -> list[tuple[int, int]]:
  """Query blocks [a, b) of a causal (T, T) attention: block [a, b) needs the keys [0, b) only
  (every later key is masked for all its rows), so n blocks do (n + 1) / 2n of the full (T, T)
  work: 3/4 for 2 blocks, 5/8 for 4. One block per `rows` query rows, at most `max_blocks`
  (each block is one more set of matmuls and fusions; on a 2-core CPU 4 blocks of T = 512 were
  faster than 2 or 8)."""
  n = max(1, min(max_blocks, t // rows))
  size = -(-t // n)
  return [(a, min(a + size, t)) for a in range(0, t, size)]


def _causal_attention(q_BKGTH, k_BKSH, v_BKSH, mask_BTS, blocks):
  """`_lse_attention` for a mask inside the causal triangle, one query block of `blocks` at a
  time against the keys up to the block's end. A fully masked query row then attends uniformly
  to its block's keys instead of all keys (still finite garbage, still no gradient to q, k)."""
  outs = [_lse_attention(q_BKGTH[:, :, :, a:b], k_BKSH[:, :, :b], v_BKSH[:, :, :b],
                         mask_BTS[:, a:b, :b]) for a, b in blocks]
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)


def _scores(q_BKGTH, k_BKSH, mask_BTS):
  scale = q_BKGTH.shape[-1] ** -0.5
  s_BKGTS = jnp.einsum("bkgth,bksh->bkgts", q_BKGTH, k_BKSH,
                       preferred_element_type=jnp.float32) * scale
  return jnp.where(mask_BTS[:, None, None], s_BKGTS, _MASKED)


def _forward(q_BKGTH, k_BKSH, v_BKSH, mask_BTS):
  s_BKGTS = _scores(q_BKGTH, k_BKSH, mask_BTS)
  m_BKGT = jnp.max(s_BKGTS, axis=-1)
  e_BKGTS = jnp.exp(s_BKGTS - m_BKGT[..., None])
  l_BKGT = jnp.sum(e_BKGTS, axis=-1)
  p_BKGTS = (e_BKGTS / l_BKGT[..., None]).astype(v_BKSH.dtype)
  o_BKGTH = jnp.einsum("bkgts,bksh->bkgth", p_BKGTS, v_BKSH)
  return o_BKGTH, (m_BKGT, l_BKGT)


@jax.custom_vjp
def _lse_attention(q_BKGTH, k_BKSH, v_BKSH, mask_BTS):
  return _forward(q_BKGTH, k_BKSH, v_BKSH, mask_BTS)[0]


def _lse_fwd(q_BKGTH, k_BKSH, v_BKSH, mask_BTS):
  o_BKGTH, stats = _forward(q_BKGTH, k_BKSH, v_BKSH, mask_BTS)
  return o_BKGTH, (q_BKGTH, k_BKSH, v_BKSH, mask_BTS, o_BKGTH, stats)


def _lse_bwd(res, do_BKGTH):
  q_BKGTH, k_BKSH, v_BKSH, mask_BTS, o_BKGTH, (m_BKGT, l_BKGT) = res
  dt = q_BKGTH.dtype
  scale = q_BKGTH.shape[-1] ** -0.5
  # exp(s - m) / l rather than exp(s - logsumexp): in a fully masked row every s is the fill
  # value, which float32 cannot tell apart from fill + log(S)
  p_BKGTS = jnp.exp(_scores(q_BKGTH, k_BKSH, mask_BTS) - m_BKGT[..., None]) / l_BKGT[..., None]
  do_BKGTH = do_BKGTH.astype(dt)
  # dv and dk contract over the query rows: computed transposed (dO^T P, Q^T dS) so the big
  # (T, S) operand is the matmul's right-hand side as it is laid out (XLA:CPU otherwise copies
  # a transposed (S, T) block); only the small (H, S) results are transposed
  dv_BKSH = jnp.einsum("bkgth,bkgts->bkhs", do_BKGTH, p_BKGTS.astype(dt)).swapaxes(-1, -2)
  dp_BKGTS = jnp.einsum("bkgth,bksh->bkgts", do_BKGTH, v_BKSH,
                        preferred_element_type=jnp.float32)
  delta_BKGT = jnp.sum(do_BKGTH.astype(jnp.float32) * o_BKGTH.astype(jnp.float32), axis=-1)
  ds_BKGTS = p_BKGTS * (dp_BKGTS - delta_BKGT[..., None])
  ds_BKGTS = (jnp.where(mask_BTS[:, None, None], ds_BKGTS, 0.0) * scale).astype(dt)
  dq_BKGTH = jnp.einsum("bkgts,bksh->bkgth", ds_BKGTS, k_BKSH)
  dk_BKSH = jnp.einsum("bkgth,bkgts->bkhs", q_BKGTH, ds_BKGTS).swapaxes(-1, -2)
  return dq_BKGTH, dk_BKSH, dv_BKSH, None


_lse_attention.defvjp(_lse_fwd, _lse_bwd)
