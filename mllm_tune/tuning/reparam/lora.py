"""LoRA and its reparameterization relatives: rsLoRA, DoRA, PiSSA (docs/methods.md §4.1-4.4).

`y = x K0 + b + s * drop(x) A B` with `A (d_in, r)`, `B (r, d_out)`, `s = alpha / r` (rsLoRA:
`alpha / sqrt(r)`). Init as peft/microsoft: A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (kaiming_uniform,
a=sqrt(5), on torch's (r, d_in)), B = 0; `init_a="gaussian"`: A ~ N(0, 1/r^2). Targets are
anchored regexes on logical module paths (`llm/layers_3/attn/q_proj`). On stacked layers the
adapters are stacked too; layers a target does not cover get A = B = 0, scale 0, and a frozen mask.
peft names: `lora_A.weight = A^T`, `lora_B.weight = B^T`, DoRA `lora_magnitude_vector = m`.
`lora_bias=True` (peft's option of that name: lora_B with a bias b, init 0) adds `s * b` to the
output (Linear targets of LoRA / rsLoRA only, not with DoRA); a merge adds `s * b` to the base
bias and is refused for a layer without one (as peft refuses it).
The LLM's token embedding (target `llm/embed`, LoRA / rsLoRA / DoRA, untied LM heads) is a
(V, D) kernel on one-hot inputs: `e(t) = E_t + s A_t B` with `A (V, r)`, `B (r, D)`, init as
peft's `Embedding` (A = 0, B ~ N(0, 1)), no dropout; peft names `lora_embedding_A = A^T`,
`lora_embedding_B = B^T` (`models.embed.TokenEmbed` reads them). DoRA there is peft's
`DoraEmbeddingLayer`: `e(t) = (m / n) * (E_t + s A_t B)`, m (D,) initialised to the norms of E's
columns over the vocabulary, n the same norms of E + s A B (stop-gradient); the merged table is
the kernel formula with d_in = V.

Per-module ranks and alphas (peft `rank_pattern` / `alpha_pattern`): ordered `(regex, value)`
pairs on logical module paths, first match wins, the rest take `rank` / `alpha`. A stacked leaf
holds the largest rank of its targeted layers; a layer with a smaller rank r_l has columns of A
and rows of B past r_l that start at zero and are masked out of training (A's stay zero, so they
add nothing), and scale alpha_l / r_l (alpha_l / sqrt(r_l) with rsLoRA).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mllm_tune.models.adapters import (DORA_M, LORA_A, LORA_B, LORA_BIAS, LORA_DROPOUT,
                                       LORA_SCALE, PISSA_A0, PISSA_B0)
from mllm_tune import pytree
from mllm_tune.tuning.api import Method, MethodError, register

log = logging.getLogger(__name__)
DEFAULT_TARGETS = r"llm/layers_\d+/attn/(q|v)_proj"
ALL_LLM_LINEARS = r"llm/layers_\d+/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"


def resolve_targets(params: dict, targets, what: str = "LoRA target",
                    experts: bool = False, embeddings: bool = False) -> dict[str, np.ndarray]:
  r"""{kernel storage path: bool per layer (L,) or shape () } for every matched Linear kernel
  (and, with `experts`, every mixture-of-experts weight stack matched by a pattern that spells
  `experts`, named by its own path: `llm/layers_\d+/mlp/experts_(gate_up|down)`; with
  `embeddings`, the LLM's token embedding `llm/embed/embedding` for a pattern that spells
  `embed`, e.g. `llm/embed`)."""
  patterns = [targets] if isinstance(targets, str) else list(targets)
  if not patterns:
    raise MethodError(f"{what}s are empty")
  try:
    found = pytree.match_layers(params, [(p, True) for p in patterns], default=False, what=what,
                                module_level=True, expert_tensors=experts,
                                embeddings=embeddings)
  except pytree.SelectorError as e:
    flat = pytree.flatten(params)
    if (any("lm_head" in p for p in patterns) and "llm/lm_head/kernel" not in flat
        and "llm/embed/embedding" in flat):
      raise MethodError(f"{what} {patterns}: this model's LM head is tied to the input "
                        "embeddings (tie_word_embeddings), so there is no separate "
                        "llm/lm_head kernel to adapt") from e
    raise
  return {p: np.asarray(v, bool) for p, v in found.items() if np.any(v)}


class TargetLayout(NamedTuple):
  """One adapted kernel: per-layer flags, ranks and alphas ((L,) or ()), 0 where untargeted."""
  flags: np.ndarray
  ranks: np.ndarray
  alphas: np.ndarray

  @property
  def leaf_rank(self) -> int:
    return int(np.max(self.ranks))


def _pairs(pattern, what: str, cast) -> tuple[tuple[str, float], ...]:
  """`rank_pattern` / `alpha_pattern` as ordered (regex, value) pairs (a dict keeps its order)."""
  items = pattern.items() if isinstance(pattern, dict) else pattern
  try:
    out = tuple((str(p), cast(v)) for p, v in items)
  except (TypeError, ValueError):
    raise MethodError(f"LoRA {what} must be (regex, value) pairs, got {pattern!r}") from None
  return out


def adapter_path(kernel_path: str, leaf: str) -> str:
  """Where an adapter leaf of a kernel lives: beside it (`.../q_proj/lora_a` for
  `.../q_proj/kernel`, `llm/embed/lora_a` for the token embedding); an expert stack's under its
  own name (`.../experts_down/lora_a`)."""
  if kernel_path.endswith("/kernel") or kernel_path == pytree.TOKEN_EMBEDDING:
    return kernel_path.rsplit("/", 1)[0] + "/" + leaf
  return kernel_path + "/" + leaf


def per_layer(values: np.ndarray, ndim: int, trailing: int = 0) -> np.ndarray:
  """Per-layer values (L,) (or a scalar) shaped to broadcast against a stacked leaf of rank
  `ndim` whose last `trailing` axes the values already carry ((L, r) rank masks: trailing 1)."""
  shape = np.shape(values)
  if len(shape) == trailing:
    return values
  lead = shape[:len(shape) - trailing]
  return values.reshape(lead + (1,) * (ndim - len(shape)) + shape[len(lead):])


def _layer_scalar(flags: np.ndarray, value: float) -> np.ndarray:
  """Per-layer constant (L,) (0 where the layer is not targeted) or a scalar."""
  return np.where(flags, np.float32(value), np.float32(0.0)).astype(np.float32)


def get_leaf(tree: dict, path: str):
  for k in path.split("/"):
    tree = tree[k]
  return tree


@register("lora", "reparameterization")
@dataclasses.dataclass(frozen=True)
class LoRA(Method):
  rank: int = 8
  alpha: float = 8.0
  dropout: float = 0.0
  targets: str | tuple[str, ...] = DEFAULT_TARGETS
  init_a: str = "kaiming"  # kaiming (peft default) | gaussian (paper)
  use_rslora: bool = False
  use_dora: bool = False
  rank_pattern: tuple = ()   # ((module regex, rank), ...): peft rank_pattern
  alpha_pattern: tuple = ()  # ((module regex, alpha), ...): peft alpha_pattern
  lora_bias: bool = False    # peft lora_bias: a trained output bias s * b beside B
  patterns_supported: ClassVar[bool] = True
  bias_supported: ClassVar[bool] = True
  experts_supported: ClassVar[bool] = True  # LoRA per expert on MoE weight stacks
  embeddings_supported: ClassVar[bool] = True  # LoRA on the token embedding (`llm/embed`)

  def __post_init__(self):
    object.__setattr__(self, "rank_pattern", _pairs(self.rank_pattern, "rank_pattern", int))
    object.__setattr__(self, "alpha_pattern", _pairs(self.alpha_pattern, "alpha_pattern", float))
    if (self.rank_pattern or self.alpha_pattern) and not self.patterns_supported:
      raise MethodError(f"{self.name}: rank_pattern / alpha_pattern are not supported (one "
                        "rank and alpha for every target)")
    if any(r < 1 for _, r in self.rank_pattern):
      raise MethodError(f"{self.name}: rank_pattern ranks must be >= 1, got {self.rank_pattern}")
    if self.rank < 1:
      raise MethodError(f"{self.name}: rank must be >= 1, got {self.rank}")
    if not 0.0 <= self.dropout < 1.0:
      raise MethodError(f"{self.name}: dropout must be in [0, 1), got {self.dropout}")
    if self.init_a not in ("kaiming", "gaussian"):
      raise MethodError(f"{self.name}: init_a must be 'kaiming' or 'gaussian'")
    if self.lora_bias and (self.use_dora or not self.bias_supported):
      raise MethodError(f"{self.name}: lora_bias is supported for plain LoRA / rsLoRA only")

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

  def layout(self, params: dict) -> dict[str, TargetLayout]:
    """{kernel storage path: TargetLayout} of every adapted kernel (patterns resolved)."""
    targets = resolve_targets(params, self.targets, experts=True, embeddings=True)
    experts = sorted(p for p in targets if pytree.is_expert_path(p))
    if experts and (self.use_dora or not self.experts_supported):
      raise MethodError(f"{self.name}: targets {self.targets!r} reach the mixture-of-experts "
                        f"weight stacks {experts}; only plain LoRA / rsLoRA adapt those (one "
                        "A, B pair per expert, as PEFT's target_parameters)")
    if self.lora_bias and (experts or pytree.TOKEN_EMBEDDING in targets):
      raise MethodError(f"{self.name}: lora_bias applies to Linear targets; targets "
                        f"{self.targets!r} reach "
                        f"{experts[:2] or [pytree.TOKEN_EMBEDDING]} (peft has no bias there)")
    if pytree.TOKEN_EMBEDDING in targets:
      if not self.embeddings_supported:
        raise MethodError(f"{self.name}: targets {self.targets!r} reach the token embedding "
                          "llm/embed; only LoRA, rsLoRA and DoRA adapt it")
      if "llm/lm_head/kernel" not in pytree.flatten(params):
        raise MethodError(
            f"{self.name}: targets {self.targets!r} reach the token embedding llm/embed, but "
            "this model ties its LM head to it (tie_word_embeddings): LoRA would adapt the "
            "lookup only (as peft does without ensure_weight_tying) while a merge would change "
            "the head too. Use trainable_tokens, or a base with an untied head")
    per = {}
    for key, pattern in (("rank", self.rank_pattern), ("alpha", self.alpha_pattern)):
      per[key] = (pytree.match_layers(params, list(pattern), default=None,
                                      what=f"LoRA {key}_pattern", module_level=True,
                                      expert_tensors=True, embeddings=True)
                  if pattern else {})
    out = {}
    for path, flags in targets.items():
      def values(key, default):
        got = per[key].get(path, None)
        got = [got] if flags.ndim == 0 else (got if got is not None else [None] * flags.size)
        vals = np.asarray([default if v is None else v for v in got], np.float64)
        return np.where(flags, vals.reshape(flags.shape), 0.0)
      out[path] = TargetLayout(flags, values("rank", self.rank).astype(np.int64),
                               values("alpha", self.alpha).astype(np.float32))
    return out

  def layer_scales(self, lay: TargetLayout) -> np.ndarray:
    """Per-layer scale alpha_l / r_l (rsLoRA: / sqrt(r_l)), 0 where not targeted."""
    r = np.maximum(lay.ranks, 1).astype(np.float64)
    s = lay.alphas / (np.sqrt(r) if self.use_rslora else r)
    return np.where(lay.flags, s, 0.0).astype(np.float32)

  def _init_a(self, rng, shape, d_in, ranks):
    if self.init_a == "gaussian":
      r = jnp.asarray(per_layer(np.maximum(ranks, 1).astype(np.float32), len(shape)))
      return jax.random.normal(rng, shape, jnp.float32) / r
    bound = 1.0 / math.sqrt(d_in)
    return jax.random.uniform(rng, shape, jnp.float32, -bound, bound)

  def init(self, rng, params):
    out = {}
    flat = pytree.flatten(params)
    no_bias = sorted(p.rsplit("/", 1)[0] for p in self.layout(params)
                     if self.lora_bias and p.rsplit("/", 1)[0] + "/bias" not in flat)
    if no_bias:  # as peft warns
      log.warning("%s: lora_bias on layers without a bias (%s%s): they train and run, but a "
                  "merge into base weights will be refused", self.name, ", ".join(no_bias[:4]),
                  " ..." if len(no_bias) > 4 else "")
    for i, (path, lay) in enumerate(sorted(self.layout(params).items())):
      k0 = get_leaf(params, path)
      *lead, d_in, d_out = k0.shape
      r = lay.leaf_rank
      if path == pytree.TOKEN_EMBEDDING:  # peft's Embedding: A = 0, B ~ N(0, 1)
        out[adapter_path(path, LORA_A)] = jnp.zeros((d_in, r), jnp.float32)
        out[adapter_path(path, LORA_B)] = jax.random.normal(jax.random.fold_in(rng, i),
                                                            (r, d_out), jnp.float32)
        out[adapter_path(path, LORA_SCALE)] = jnp.asarray(self.layer_scales(lay))
        if self.use_dora:  # ||E|| over the vocabulary per feature (A = 0: E + s A B = E)
          out[adapter_path(path, DORA_M)] = jnp.linalg.norm(jnp.asarray(k0, jnp.float32), axis=0)
        continue
      a = self._init_a(jax.random.fold_in(rng, i), (*lead, d_in, r), d_in, lay.ranks)
      # columns past each layer's rank (and untargeted layers) are zero
      cols = np.arange(r) < (lay.ranks[..., None] if lay.ranks.ndim else lay.ranks)
      a = a * jnp.asarray(per_layer(cols, a.ndim, trailing=1), a.dtype)
      out[adapter_path(path, LORA_A)] = a
      out[adapter_path(path, LORA_B)] = jnp.zeros((*lead, r, d_out), jnp.float32)
      out[adapter_path(path, LORA_SCALE)] = jnp.asarray(self.layer_scales(lay))
      flags = lay.flags
      if self.dropout:
        out[adapter_path(path, LORA_DROPOUT)] = jnp.asarray(_layer_scalar(flags, self.dropout))
      if self.use_dora:
        m = jnp.linalg.norm(jnp.asarray(k0, jnp.float32), axis=-2)
        out[adapter_path(path, DORA_M)] = m
      if self.lora_bias:
        out[adapter_path(path, LORA_BIAS)] = jnp.zeros((*lead, d_out), jnp.float32)
    return pytree.unflatten(out)

  def trainable(self, variables):
    mask = super().trainable(variables)
    flat = pytree.flatten(mask)
    adapters = pytree.flatten(variables.get("adapters", {}))
    for path, lay in self.layout(variables["params"]).items():
      r = lay.leaf_rank
      # per-layer ranks below the leaf's: mask the padding (A columns, B rows past r_l)
      cols = (np.arange(r) < lay.ranks[..., None]) if lay.flags.ndim else None
      padded = cols is not None and not np.array_equal(cols, np.repeat(lay.flags[:, None], r, 1))
      for leaf in (LORA_A, LORA_B, DORA_M, LORA_BIAS):
        key = "adapters/" + adapter_path(path, leaf)
        if key not in flat:
          continue
        nd = np.ndim(adapters[adapter_path(path, leaf)])
        if padded and leaf in (LORA_A, LORA_B):
          m = per_layer(cols, nd - 1, trailing=1)      # (L, .., r)
          flat[key] = m[..., None, :] if leaf == LORA_A else m[..., :, None]
        else:
          flat[key] = pytree.layer_mask(lay.flags, nd)
    return pytree.unflatten(flat)

  def merge(self, variables):
    return self._merged(variables, strict=True)

  def weight_view(self, variables):
    """`merge`, with `lora_bias` left out on layers that have no bias (not refused)."""
    return self._merged(variables, strict=False) if self.lora_bias else self.merge(variables)

  def _merged(self, variables, strict: bool):
    params = pytree.flatten(variables["params"])
    adapters = pytree.flatten(variables.get("adapters", {}))
    for path in resolve_targets(variables["params"], self.targets, experts=True,
                                embeddings=True):
      k0 = jnp.asarray(params[path], jnp.float32)
      a, b = adapters[adapter_path(path, LORA_A)], adapters[adapter_path(path, LORA_B)]
      s = jnp.asarray(per_layer(adapters[adapter_path(path, LORA_SCALE)], k0.ndim), jnp.float32)
      merged = k0 + s * jnp.matmul(a, b)
      m = adapters.get(adapter_path(path, DORA_M))
      if m is not None:
        merged = merged * (m / jnp.linalg.norm(merged, axis=-2))[..., None, :]
      params[path] = merged.astype(params[path].dtype)
      b_lora = adapters.get(adapter_path(path, LORA_BIAS))
      if b_lora is not None:
        bias = path.rsplit("/", 1)[0] + "/bias"
        if bias not in params and not strict:
          continue
        if bias not in params:
          raise MethodError(f"{self.name}: lora_bias on {path.rsplit('/', 1)[0]}, whose layer "
                            "has no bias to merge it into (peft cannot merge it either)")
        b0 = jnp.asarray(params[bias], jnp.float32)
        s_b = jnp.asarray(per_layer(adapters[adapter_path(path, LORA_SCALE)], b0.ndim),
                          jnp.float32)
        params[bias] = (b0 + s_b * b_lora).astype(params[bias].dtype)
    return pytree.unflatten(params)


@register("rslora", "reparameterization")
@dataclasses.dataclass(frozen=True)
class RSLoRA(LoRA):
  """rsLoRA: LoRA with the rank-stable scale `alpha / sqrt(r)` (peft `use_rslora`)."""
  use_rslora: bool = True


@register("dora", "reparameterization")
@dataclasses.dataclass(frozen=True)
class DoRA(LoRA):
  """DoRA: magnitude `m` (init ||K0[:, j]||) times the normalized LoRA-updated direction."""
  use_dora: bool = True


@register("pissa", "reparameterization")
@dataclasses.dataclass(frozen=True)
class PiSSA(LoRA):
  """PiSSA: A, B from the top-r singular triplets of K0 (SVD); the base becomes the residual
  `K_res = K0 - s A B`, so the model is unchanged at init. Official recipe alpha = r.
  The initial factors are kept as constants (`pissa_a0`, `pissa_b0`) so `pissa_to_lora` can
  express the tuned model as a plain LoRA on the original K0 (peft's
  `path_initial_model_for_weight_conversion`): `A' = [A | A0]`, `B' = [B ; -B0]`, r' = 2r,
  alpha' = 2 alpha (alpha sqrt(2) with rsLoRA)."""
  alpha: float = 8.0
  patterns_supported: ClassVar[bool] = False
  experts_supported: ClassVar[bool] = False
  embeddings_supported: ClassVar[bool] = False
  bias_supported: ClassVar[bool] = False

  def init_variables(self, rng, params):
    adapters = pytree.flatten(self.init(rng, params))
    flat = pytree.flatten(params)
    r, s = self.rank, self.scale
    for path, flags in resolve_targets(params, self.targets).items():
      k0 = np.asarray(flat[path], np.float32)
      stacked = k0 if flags.ndim else k0[None]
      fl = flags if flags.ndim else flags[None]
      a_all, b_all, res_all = [], [], []
      for k, on in zip(stacked, fl):
        # torch W0 = K0^T = U S Vh  =>  K0 = Vh^T S U^T
        u, sv, vh = np.linalg.svd(k.T.astype(np.float64), full_matrices=False)
        sr = np.sqrt(sv[:r] / s)
        a = (vh[:r].T * sr) if on else np.zeros((k.shape[0], r))      # (d_in, r)
        b = (sr[:, None] * u[:, :r].T) if on else np.zeros((r, k.shape[1]))  # (r, d_out)
        a_all.append(a)
        b_all.append(b)
        res_all.append(k - s * (a @ b))
      cast = lambda x: np.asarray(x if flags.ndim else x[0], np.float32)
      for leaf, const, vals in ((LORA_A, PISSA_A0, a_all), (LORA_B, PISSA_B0, b_all)):
        adapters[adapter_path(path, leaf)] = jnp.asarray(cast(np.stack(vals)))
        # the initial factors (constants) let `pissa_to_lora` express the result on K0
        adapters[adapter_path(path, const)] = jnp.asarray(cast(np.stack(vals)))
      flat[path] = jnp.asarray(cast(np.stack(res_all)), flat[path].dtype)
    return {"params": pytree.unflatten(flat), "adapters": pytree.unflatten(adapters)}


def _pissa_rebase(method, variables: dict) -> dict:
  """Original K0 + saved adapters -> residual base `K0 - s A0 B0` (the variables of training)."""
  flat_p = pytree.flatten(variables["params"])
  ad = pytree.flatten(variables["adapters"])
  for path in resolve_targets(variables["params"], method.targets):
    get = lambda leaf: jnp.asarray(ad[adapter_path(path, leaf)], jnp.float32)
    s = get(LORA_SCALE)
    s = s[..., None, None] if s.ndim else s
    res = jnp.asarray(flat_p[path], jnp.float32) - s * jnp.matmul(get(PISSA_A0),
                                                                 get(PISSA_B0))
    flat_p[path] = res.astype(flat_p[path].dtype)
  return {**variables, "params": pytree.unflatten(flat_p)}


PiSSA.rebase = _pissa_rebase


def pissa_to_lora(method: PiSSA, variables: dict) -> tuple[LoRA, dict]:
  """PiSSA (adapters on K_res) -> an equivalent plain LoRA on the original base K0 (adapter
  leaves of other methods composed beside it are kept)."""
  flat_p = pytree.flatten(variables["params"])
  ad = pytree.flatten(variables["adapters"])
  paths = resolve_targets(variables["params"], method.targets)
  own = {adapter_path(p, leaf) for p in paths
         for leaf in (LORA_A, LORA_B, LORA_SCALE, LORA_DROPOUT, PISSA_A0, PISSA_B0)}
  out = {p: x for p, x in ad.items() if p not in own}
  lora = LoRA(rank=2 * method.rank,
              alpha=method.alpha * (math.sqrt(2) if method.use_rslora else 2),
              dropout=method.dropout, targets=method.targets, use_rslora=method.use_rslora)
  for path in paths:
    get = lambda leaf: jnp.asarray(ad[adapter_path(path, leaf)], jnp.float32)
    out[adapter_path(path, LORA_A)] = jnp.concatenate([get(LORA_A), get(PISSA_A0)], -1)
    out[adapter_path(path, LORA_B)] = jnp.concatenate([get(LORA_B), -get(PISSA_B0)], -2)
    out[adapter_path(path, LORA_SCALE)] = get(LORA_SCALE)
    s = get(LORA_SCALE)
    s = s[..., None, None] if s.ndim else s
    k0 = jnp.asarray(flat_p[path], jnp.float32) + s * jnp.matmul(get(PISSA_A0), get(PISSA_B0))
    flat_p[path] = k0.astype(flat_p[path].dtype)
  return lora, {"params": pytree.unflatten(flat_p), "adapters": pytree.unflatten(out)}
