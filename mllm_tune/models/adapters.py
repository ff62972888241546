"""The adapter-leaf table and the math of each adapter kind.

Tuning methods add leaves to a separate `adapters` collection that mirrors the path of the layer
they attach to (`llm/layers/attn/q_proj/lora_a`, stacked like their layer); model modules read
them by the names below, and tuning methods write them by the same names (import the constants,
never spell a leaf name as a string). A leaf the model does not know is silently "no adapter",
which is why every name lives here once, with its owner.

Beside a `Linear` kernel (d_in, d_out), applied by `apply_linear` in this order:
  ia3_in (d_in,)                                      x  *= ia3_in     (before the matmul)
  extra_bias (d_out,)                                 y  += extra_bias (BitFit, bias-free layers)
  lora_a (d_in, r), lora_b (r, d_out), lora_scale ()  y  += (s * (drop(x) @ A)) @ B
  lora_bias (d_out,)                                  y  += s * lora_bias (peft's lora_bias:
                                                      lora_B's bias; not with DoRA)
  lora_dropout ()                                     dropout rate on the LoRA / VeRA input,
                                                      active only when a 'dropout' rng is passed
  dora_m (d_out,)                                     DoRA magnitude (peft's forward, below)
  vera_a (d_in, r), vera_b (r, d_out), vera_d (r,), vera_bvec (d_out,)
                                                      y  += (((drop(x) @ A) * d) @ B) * bvec
  ia3_out (d_out,)                                    y  *= ia3_out    (after bias)
  bottleneck_down (d_out, m), bottleneck_down_bias (m,), bottleneck_up (m, d_out),
  bottleneck_up_bias (d_out,)                         y  += gelu(y Wdn + bdn) Wup + bup
                                                      (Houlsby adapter on the output, last)
Beside a mixture-of-experts weight stack (E, d_in, d_out) (`moe.MoEMLP`'s experts_gate_up,
experts_down), under the stack's own name (`mlp/experts_down/lora_a`): lora_a (E, d_in, r),
lora_b (E, r, d_out), lora_scale (), lora_dropout (): expert e's rows get
(s * (drop(x) @ A_e)) @ B_e.
In an FFN (`parallel_adapter`): parallel_down (D, m), parallel_up (m, D), parallel_scale ().
In `llm.Attention`: adaption_prompt (p, D) with adaption_gate or adaption_gate_tanh (H,).
In `llm.LLM` (under `llm/`): prompt_embeddings (n, D); prefix_k, prefix_v (L, n, K*H) or the
reparameterized prefix_embedding, prefix_mlp_{w1,b1,w2,b2}.
In `embed.TokenEmbed` (under `llm/embed/`): token_rows (n, D) and token_indices (n,) int32: rows
token_indices of the embedding table read as token_rows (trainable tokens); a tied LM head reads
the same rows. lora_a (V, r), lora_b (r, D), lora_scale (): e(t) += (s * A[t]) @ B (LoRA on the
lookup; untied heads only); dora_m (D,): DoRA's magnitude, e(t) *= m / ||E + s A B||_columns.
In `vision.VisionTower` (under `vision/`): prompt_tokens (p, D) or deep_prompt_tokens (L, p, D),
prompt_dropout ().
Not read by the model: pissa_a0, pissa_b0 (PiSSA's initial factors, kept to rebase).

The low-rank path is computed as `(s x A) B` (scalings on the rank-r side, so the backward pass
makes no extra pass over a (.., d_out) tensor); `A B` is materialized only for DoRA's weight norm.
DoRA follows peft: with x~ = drop(x), n = ||K0 + s A B|| per output column (stop-gradient),
`y = x K0 + b + (m/n - 1) * (x~ K0) + (m/n) * s (x~ A) B`.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

ADAPTERS = "adapters"  # the collection

LORA_A, LORA_B, LORA_SCALE, LORA_DROPOUT, DORA_M = (
    "lora_a", "lora_b", "lora_scale", "lora_dropout", "dora_m")
LORA_BIAS = "lora_bias"
PISSA_A0, PISSA_B0 = "pissa_a0", "pissa_b0"
VERA_A, VERA_B, VERA_D, VERA_BVEC = "vera_a", "vera_b", "vera_d", "vera_bvec"
IA3_IN, IA3_OUT = "ia3_in", "ia3_out"
EXTRA_BIAS = "extra_bias"
BOTTLENECK_DOWN, BOTTLENECK_DOWN_BIAS, BOTTLENECK_UP, BOTTLENECK_UP_BIAS = (
    "bottleneck_down", "bottleneck_down_bias", "bottleneck_up", "bottleneck_up_bias")
PARALLEL_DOWN, PARALLEL_UP, PARALLEL_SCALE = "parallel_down", "parallel_up", "parallel_scale"
ADAPTION_PROMPT, ADAPTION_GATE, ADAPTION_GATE_TANH = (
    "adaption_prompt", "adaption_gate", "adaption_gate_tanh")
PROMPT_EMBEDDINGS = "prompt_embeddings"
PREFIX_K, PREFIX_V = "prefix_k", "prefix_v"
PREFIX_EMBEDDING = "prefix_embedding"
PREFIX_MLP_W1, PREFIX_MLP_B1, PREFIX_MLP_W2, PREFIX_MLP_B2 = (
    "prefix_mlp_w1", "prefix_mlp_b1", "prefix_mlp_w2", "prefix_mlp_b2")
PREFIX_MLP_LEAVES = (PREFIX_EMBEDDING, PREFIX_MLP_W1, PREFIX_MLP_B1, PREFIX_MLP_W2, PREFIX_MLP_B2)
TOKEN_ROWS, TOKEN_INDICES = "token_rows", "token_indices"
PROMPT_TOKENS, DEEP_PROMPT_TOKENS, PROMPT_DROPOUT = (
    "prompt_tokens", "deep_prompt_tokens", "prompt_dropout")


class Leaf(NamedTuple):
  reader: str           # the model code that reads it (None: kept for the method only)
  shape: str            # per layer, with Linear's d_in / d_out or the module's widths
  methods: tuple        # registry names of the methods that write it


_L = "layers.Linear"
_LM = "layers.Linear, moe.MoEMLP (expert stacks), embed.TokenEmbed"
LEAVES: dict[str, Leaf] = {
    LORA_A: Leaf(_LM, "(d_in, r)", ("lora", "rslora", "dora", "pissa", "lorasculpt")),
    LORA_B: Leaf(_LM, "(r, d_out)", ("lora", "rslora", "dora", "pissa", "lorasculpt")),
    LORA_SCALE: Leaf(_L + ", embed.TokenEmbed", "()",
                     ("lora", "rslora", "dora", "pissa", "lorasculpt")),
    LORA_DROPOUT: Leaf(_L, "()", ("lora", "rslora", "dora", "pissa", "lorasculpt", "vera")),
    LORA_BIAS: Leaf(_L, "(d_out,)", ("lora", "rslora")),
    DORA_M: Leaf(_L + ", embed.TokenEmbed", "(d_out,)", ("dora",)),
    PISSA_A0: Leaf(None, "(d_in, r)", ("pissa",)),
    PISSA_B0: Leaf(None, "(r, d_out)", ("pissa",)),
    VERA_A: Leaf(_L, "(d_in, r)", ("vera",)),
    VERA_B: Leaf(_L, "(r, d_out)", ("vera",)),
    VERA_D: Leaf(_L, "(r,)", ("vera",)),
    VERA_BVEC: Leaf(_L, "(d_out,)", ("vera",)),
    IA3_IN: Leaf(_L, "(d_in,)", ("ia3",)),
    IA3_OUT: Leaf(_L, "(d_out,)", ("ia3",)),
    EXTRA_BIAS: Leaf(_L, "(d_out,)", ("bitfit",)),
    BOTTLENECK_DOWN: Leaf(_L, "(d_out, m)", ("adapter",)),
    BOTTLENECK_DOWN_BIAS: Leaf(_L, "(m,)", ("adapter",)),
    BOTTLENECK_UP: Leaf(_L, "(m, d_out)", ("adapter",)),
    BOTTLENECK_UP_BIAS: Leaf(_L, "(d_out,)", ("adapter",)),
    PARALLEL_DOWN: Leaf("parallel_adapter (llm.MLP, vision.VisionMLP)", "(D, m)",
                        ("parallel_adapter",)),
    PARALLEL_UP: Leaf("parallel_adapter", "(m, D)", ("parallel_adapter",)),
    PARALLEL_SCALE: Leaf("parallel_adapter", "()", ("parallel_adapter",)),
    ADAPTION_PROMPT: Leaf("llm.Attention", "(p, D)", ("llama_adapter",)),
    ADAPTION_GATE: Leaf("llm.Attention", "(H,)", ("llama_adapter",)),
    ADAPTION_GATE_TANH: Leaf("llm.Attention", "(H,)", ("llama_adapter",)),
    PROMPT_EMBEDDINGS: Leaf("llm.LLM", "(n, D)", ("prompt_tuning",)),
    PREFIX_K: Leaf("llm.LLM", "(L, n, K*H)", ("prefix_tuning",)),
    PREFIX_V: Leaf("llm.LLM", "(L, n, K*H)", ("prefix_tuning",)),
    PREFIX_EMBEDDING: Leaf("llm.LLM", "(n, t)", ("prefix_tuning",)),
    PREFIX_MLP_W1: Leaf("llm.LLM", "(t, h)", ("prefix_tuning",)),
    PREFIX_MLP_B1: Leaf("llm.LLM", "(h,)", ("prefix_tuning",)),
    PREFIX_MLP_W2: Leaf("llm.LLM", "(h, 2 L t)", ("prefix_tuning",)),
    PREFIX_MLP_B2: Leaf("llm.LLM", "(2 L t,)", ("prefix_tuning",)),
    TOKEN_ROWS: Leaf("embed.TokenEmbed", "(n, D)", ("trainable_tokens",)),
    TOKEN_INDICES: Leaf("embed.TokenEmbed", "(n,) int32", ("trainable_tokens",)),
    PROMPT_TOKENS: Leaf("vision.VisionTower", "(p, D)", ("vpt",)),
    DEEP_PROMPT_TOKENS: Leaf("vision.VisionTower", "(L, p, D)", ("vpt",)),
    PROMPT_DROPOUT: Leaf("vision.VisionTower", "()", ("vpt",)),
}


# ----------------------------------------------------------------------------- reading leaves
def get(module, name: str, default=None):
  """The adapter leaf `name` of `module` (a Flax module), or `default` when it has none."""
  return module.get_variable(ADAPTERS, name) if module.has_variable(ADAPTERS, name) else default


def dropout(module, x, rate):
  """Inverted dropout of `x` at `rate` (a leaf value); identity without a rate or 'dropout' rng."""
  if rate is None or not module.has_rng("dropout"):
    return x
  return dropout_with_key(module.make_rng("dropout"), x, rate)


def dropout_with_key(key, x, rate):
  """Inverted dropout of `x` at `rate` with the PRNG key `key`."""
  rate = jnp.asarray(rate, jnp.float32)
  keep = jax.random.uniform(key, x.shape) >= rate
  return jnp.where(keep, x / (1.0 - rate).astype(x.dtype), jnp.zeros_like(x))


# ----------------------------------------------------------------------------- Linear
def scale_input(module, x, dt):
  """IA3 on the input (`x * ia3_in`), before the matmul."""
  if module.has_variable(ADAPTERS, IA3_IN):
    x = x * module.get_variable(ADAPTERS, IA3_IN).astype(dt)
  return x


def apply_linear(module, x, y, kernel, dt):
  """Every adapter beside a Linear's kernel, on its (input-scaled) rows `x` (N, d_in) and its
  output `y = x @ kernel + bias` (N, d_out), in the order of the table above."""
  if module.has_variable(ADAPTERS, EXTRA_BIAS):
    y = y + module.get_variable(ADAPTERS, EXTRA_BIAS).astype(dt)
  if module.has_variable(ADAPTERS, LORA_A):
    y = y + lora_delta(module, x, kernel, dt)
  if module.has_variable(ADAPTERS, VERA_A):
    y = y + vera_delta(module, x, dt)
  if module.has_variable(ADAPTERS, IA3_OUT):
    y = y * module.get_variable(ADAPTERS, IA3_OUT).astype(dt)
  if module.has_variable(ADAPTERS, BOTTLENECK_DOWN):
    y = y + bottleneck_delta(module, y, dt)
  return y


def lora_delta(module, x, k0, dt):
  """LoRA `(s * (drop(x) @ A)) @ B`, or DoRA's full correction when `dora_m` is present."""
  a = module.get_variable(ADAPTERS, LORA_A).astype(dt)
  b = module.get_variable(ADAPTERS, LORA_B).astype(dt)
  scale = jnp.asarray(get(module, LORA_SCALE, 1.0), dt)
  xd = dropout(module, x, get(module, LORA_DROPOUT))
  delta = jnp.matmul(jnp.matmul(xd, a) * scale, b)  # scale the rank-r side (cheaper)
  m = get(module, DORA_M)
  if m is None:
    bias = get(module, LORA_BIAS)
    return delta if bias is None else delta + scale * bias.astype(dt)
  norm = jax.lax.stop_gradient(jnp.linalg.norm(
      (k0 + scale * jnp.matmul(a, b)).astype(jnp.float32), axis=0)).astype(dt)
  ratio = m.astype(dt) / norm
  return (ratio - 1.0) * jnp.matmul(xd, k0) + ratio * delta


def vera_delta(module, x, dt):
  """VeRA `(((drop(x) @ A) * d) @ B) * bvec`, the scalings on the small factors."""
  xd = dropout(module, x, get(module, LORA_DROPOUT))
  leaf = lambda n: module.get_variable(ADAPTERS, n).astype(dt)
  return jnp.matmul(jnp.matmul(xd, leaf(VERA_A)) * leaf(VERA_D), leaf(VERA_B) * leaf(VERA_BVEC))


def bottleneck_delta(module, y, dt):
  """Houlsby adapter delta `gelu(y Wdn + bdn) Wup + bup` (docs/methods.md §3.1; exact-erf GELU)."""
  leaf = lambda n: module.get_variable(ADAPTERS, n).astype(dt)
  h = jax.nn.gelu(jnp.matmul(y, leaf(BOTTLENECK_DOWN)) + leaf(BOTTLENECK_DOWN_BIAS),
                  approximate=False)
  return jnp.matmul(h, leaf(BOTTLENECK_UP)) + leaf(BOTTLENECK_UP_BIAS)


# ----------------------------------------------------------------------------- FFN
def parallel_adapter(module, x_BxD: jax.Array, y_BxD: jax.Array) -> jax.Array:
  """FFN-level hook: `y + s * relu(x Wdn) Wup` when `parallel_down (D, m)`, `parallel_up (m, D)`
  and `parallel_scale ()` sit in `module`'s adapters (docs/methods.md §3.2; x is the FFN input)."""
  if not module.has_variable(ADAPTERS, PARALLEL_DOWN):
    return y_BxD
  leaf = lambda n: module.get_variable(ADAPTERS, n).astype(y_BxD.dtype)
  h = jax.nn.relu(jnp.matmul(x_BxD.astype(y_BxD.dtype), leaf(PARALLEL_DOWN)))
  return y_BxD + leaf(PARALLEL_SCALE) * jnp.matmul(h, leaf(PARALLEL_UP))
