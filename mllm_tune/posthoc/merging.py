"""Post-hoc weight-space methods (docs/methods.md §6.1, 6.3): WiSE-FT, task arithmetic, TIES, DARE.

All functions take and return nested param dicts (the `params` tree of a model; stacked blocks keep
their leading layer axis L). Arithmetic runs in float32 (float64 stays float64) and results are
cast back to theta0's leaf dtype, so shapes and dtypes of theta0 are preserved. Trees whose paths
or shapes differ raise ValueError naming the first offending path.

- WiSE-FT (Wortsman et al. 2022, eq. 1): `theta_a = (1 - a) theta0 + a theta_ft`; per-module
  alphas are ordered `(regex, alpha)` rules on logical paths (`pytree.match_layers`).
- Task arithmetic (Ilharco et al. 2023): `tau_k = theta_k - theta0`, `theta0 + lam sum_k tau_k`.
- TIES (Yadav et al. 2023, Alg. 1): trim each tau_k to its top-k fraction by |tau|, elect
  `gamma = sign(sum_k tau_hat_k)`, disjoint mean over the tasks whose sign agrees (0 if none),
  `theta0 + lam tau_m`.
- DARE (Yu et al. 2024, eq. 2): `tau_tilde = (m * tau) / (1 - p)`, `m ~ Bernoulli(1 - p)`, then
  any of the merges above.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mllm_tune import pytree
from mllm_tune.tuning.api import Compose, Method, label

Params = dict
AlphaRules = Sequence[tuple[str, float]]


# ----------------------------------------------------------------------------- tree helpers
def _dtype(x) -> np.dtype:
  return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


def _compute_dtype(dtype) -> np.dtype:
  """float32 for half/float32 leaves, float64 for float64 (with jax x64 on)."""
  return np.dtype(jnp.promote_types(dtype, jnp.float32))


def _flat_like(ref: dict, tree: dict, what: str, name: str) -> dict:
  """Flatten `tree`, checking it has exactly `ref`'s paths and shapes (ValueError otherwise)."""
  a, b = pytree.flatten(ref), pytree.flatten(tree)
  missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
  if missing or extra:
    raise ValueError(f"{what}: {name} does not match theta0's parameter tree: missing paths "
                     f"{missing[:5]}, unexpected paths {extra[:5]}")
  for p, x in a.items():
    if np.shape(x) != np.shape(b[p]):
      raise ValueError(f"{what}: shape mismatch at '{p}': theta0 {np.shape(x)} vs {name} "
                       f"{np.shape(b[p])}")
    if not jnp.issubdtype(_dtype(b[p]), jnp.floating):
      raise ValueError(f"{what}: leaf '{p}' of {name} has non-float dtype {_dtype(b[p])}")
  return b


def _check_float_tree(flat: dict, what: str) -> None:
  for p, x in flat.items():
    if not jnp.issubdtype(_dtype(x), jnp.floating):
      raise ValueError(f"{what}: leaf '{p}' of theta0 has non-float dtype {_dtype(x)}")


def _check_finite(value: float, what: str) -> float:
  v = float(value)
  if not np.isfinite(v):
    raise ValueError(f"{what} must be finite, got {value}")
  return v


def _add_delta(x0, delta, lam: float):
  """`x0 + lam * delta` in the compute dtype, cast back to x0's dtype."""
  ct = _compute_dtype(_dtype(x0))
  y = jnp.asarray(x0, ct) + jnp.asarray(lam, ct) * jnp.asarray(delta, ct)
  return y.astype(_dtype(x0))


# ----------------------------------------------------------------------------- WiSE-FT
def alpha_per_leaf(params: Params, alpha: float, alphas: AlphaRules | None = None) -> dict:
  """{storage path: a}, a a float or an (L, 1, ..) float64 array when layers of a stacked leaf
  get different alphas. Rules are `re.fullmatch`ed on logical paths (`llm/layers_3/mlp/.*`),
  first match wins, unmatched leaves get `alpha`; a rule matching nothing raises SelectorError
  (a ValueError) naming it."""
  alpha = _check_finite(alpha, "wise_ft: alpha")
  rules = [(p, _check_finite(a, f"wise_ft: alpha of rule {p!r}")) for p, a in (alphas or ())]
  try:
    resolved = pytree.match_layers(params, rules, default=alpha, what="parameter")
  except pytree.SelectorError as e:
    raise pytree.SelectorError(f"wise_ft alphas: {e}") from e
  shapes = {leaf.path: leaf.shape for leaf in pytree.leaves(params)}
  out: dict = {}
  for path, v in resolved.items():
    if isinstance(v, list):
      arr = np.asarray(v, np.float64)
      v = float(arr[0]) if np.all(arr == arr[0]) else arr.reshape(
          (-1,) + (1,) * (len(shapes[path]) - 1))
    out[path] = v
  return out


def _lerp(x0, x1, a):
  """`(1 - a) x0 + a x1` (this form is bit-exact at a = 0 and a = 1), in x0's dtype."""
  ct = _compute_dtype(_dtype(x0))
  a = jnp.asarray(a, ct)
  y = (1 - a) * jnp.asarray(x0, ct) + a * jnp.asarray(x1, ct)
  return y.astype(_dtype(x0))


def wise_ft(theta0: Params, theta_ft: Params, alpha: float = 0.5,
            alphas: AlphaRules | None = None) -> Params:
  """WiSE-FT (Wortsman et al. 2022, eq. 1): `(1 - a) theta0 + a theta_ft` per leaf.

  `alpha` is the default a; `alphas` an ordered `(regex, a)` list on logical paths (first match
  wins; a layer-specific a on a stacked (L, ..) leaf becomes a per-layer (L, 1, ..) vector).
  a = 0 / 1 return theta0 / theta_ft bit for bit (up to the sign of zeros); a outside [0, 1]
  extrapolates. Output dtypes are theta0's.
  """
  flat0 = pytree.flatten(theta0)
  _check_float_tree(flat0, "wise_ft")
  flat1 = _flat_like(theta0, theta_ft, "wise_ft", "theta_ft")
  a = alpha_per_leaf(theta0, alpha, alphas)
  return pytree.unflatten({p: _lerp(x, flat1[p], a[p]) for p, x in flat0.items()})


def _rewrites_base(method: Method) -> bool:
  """True when `init_variables` replaces the base weights (PiSSA's residual): then
  `variables["params"]` is not theta0."""
  if isinstance(method, Compose):
    return any(_rewrites_base(m) for m in method.methods)
  return type(method).rebase is not Method.rebase


def wise_ft_method(method: Method, variables: dict, alpha: float = 0.5,
                   alphas: AlphaRules | None = None, theta0: Params | None = None) -> Params:
  """WiSE-FT between theta0 and a tuned method's merged weights `method.merge(variables)`.

  theta0 defaults to `variables["params"]`, right for methods that leave the base untouched
  (LoRA, DoRA, IA3, ...: interpolating then equals scaling the folded-in delta by a). Methods that
  train base weights (full / selective tuning) or rewrite them (PiSSA) need the pretrained
  `theta0=` and raise ValueError without it; non-mergeable methods raise MethodError.
  """
  if theta0 is None:
    name = label(method)
    if _rewrites_base(method):
      raise ValueError(f"wise_ft: method '{name}' rewrites the base weights at init; pass "
                       "theta0= (the pretrained params)")
    mask = pytree.flatten(method.trainable(variables).get("params", {}))
    trained = sorted(p for p, m in mask.items() if pytree.mask_any(m))
    if trained:
      raise ValueError(f"wise_ft: method '{name}' trains base weights ({trained[:3]}...), so "
                       "variables['params'] is not theta0; pass theta0= (the pretrained params)")
    theta0 = variables["params"]
  return wise_ft(theta0, method.merge(variables), alpha, alphas)


# ----------------------------------------------------------------------------- task vectors
def task_vectors(theta0: Params, thetas: Sequence[Params]) -> list[Params]:
  """`tau_k = theta_k - theta0` per leaf (Ilharco et al. 2023), float32 (float64 kept)."""
  flat0 = pytree.flatten(theta0)
  _check_float_tree(flat0, "task_vectors")
  out = []
  for i, theta in enumerate(thetas):
    flat = _flat_like(theta0, theta, "task_vectors", f"thetas[{i}]")
    out.append(pytree.unflatten({
        p: jnp.asarray(flat[p], _compute_dtype(_dtype(x))) - jnp.asarray(
            x, _compute_dtype(_dtype(x))) for p, x in flat0.items()}))
  return out


def _flat_taus(theta0: Params, taus: Sequence[Params], what: str) -> list[dict]:
  if isinstance(taus, dict) or len(taus) == 0:
    raise ValueError(f"{what}: taus must be a non-empty list of task-vector trees")
  _check_float_tree(pytree.flatten(theta0), what)
  return [_flat_like(theta0, t, what, f"taus[{i}]") for i, t in enumerate(taus)]


def task_arithmetic(theta0: Params, taus: Sequence[Params], lam: float = 1.0) -> Params:
  """Task arithmetic (Ilharco et al. 2023): `theta0 + lam * sum_k tau_k`, theta0's dtypes."""
  lam = _check_finite(lam, "task_arithmetic: lam")
  flats = _flat_taus(theta0, taus, "task_arithmetic")
  flat0 = pytree.flatten(theta0)
  out = {}
  for p, x in flat0.items():
    ct = _compute_dtype(_dtype(x))
    out[p] = _add_delta(x, sum(jnp.asarray(f[p], ct) for f in flats), lam)
  return pytree.unflatten(out)


# ----------------------------------------------------------------------------- TIES
@jax.jit
def _row_counts(tau_RX: jax.Array, thresh_R: jax.Array) -> jax.Array:
  """(R,) int32: entries of each row with |tau| >= its threshold."""
  return jnp.sum(jnp.abs(tau_RX) >= thresh_R[:, None].astype(tau_RX.dtype), axis=1,
                 dtype=jnp.int32)


def _rows(path: str, x) -> jax.Array:
  """A leaf as (R, X): one row per layer for stacked leaves, else one row."""
  x = jnp.asarray(x)
  r = x.shape[0] if pytree.is_stacked(path) and x.ndim > 1 else 1
  return x.reshape(r, -1)


def _total_count(rows: list[jax.Array], t_1: np.ndarray) -> np.ndarray:
  """(1,) int64: entries of all `rows` leaves with |tau| >= t_1[0] (summed on the host: a model
  can hold more than 2^31 entries)."""
  return np.array([sum(int(np.sum(np.asarray(_row_counts(r, jnp.full((r.shape[0],), t_1[0])),
                                             np.int64))) for r in rows)])


def _bisect(count_fn, n_keep: np.ndarray, dtype: np.dtype) -> np.ndarray:
  """Per entry of `n_keep`, the largest t >= 0 with `count_fn(t) >= n_keep`, i.e. the exact
  n_keep-th largest |tau| of its group: bisection on IEEE bit patterns (monotone for x >= 0), so
  nothing is concatenated or sorted. `count_fn` maps thresholds shaped like n_keep to counts."""
  bits_t = {4: np.int32, 8: np.int64}[dtype.itemsize]
  lo = np.zeros(n_keep.shape, np.int64)  # count(|tau| >= 0) = all entries >= n_keep
  hi = np.full(n_keep.shape, np.array(np.inf, dtype).view(bits_t), np.int64)  # count = 0
  while np.any(hi - lo > 1):
    mid = lo + (hi - lo) // 2
    ok = count_fn(mid.astype(bits_t).view(dtype)) >= n_keep
    lo, hi = np.where(ok, mid, lo), np.where(ok, hi, mid)
  return lo.astype(bits_t).view(dtype)


def ties_trim(taus: Sequence[Params], k: float = 0.2, scope: str = "global") -> list[Params]:
  """TIES step 1: keep the top-k fraction of each tau_k by |tau| (ties at the threshold kept,
  as the paper's `topk_values_mask`), zero the rest.

  `scope="global"` (the paper's code): one threshold per task over its whole flattened vector,
  keeping `max(1, int(k * n))` entries. `scope="tensor"` (peft `add_weighted_adapter`, which
  prunes each weight separately): one threshold per tensor, per layer for stacked leaves.
  """
  k = float(k)
  if not 0.0 < k <= 1.0:
    raise ValueError(f"ties: k (fraction kept) must be in (0, 1], got {k}")
  if scope not in ("global", "tensor"):
    raise ValueError(f"ties: scope must be 'global' or 'tensor', got {scope!r}")
  out = []
  for i, tau in enumerate(taus):
    flat = pytree.flatten(tau)
    for p, x in flat.items():
      if not bool(jnp.all(jnp.isfinite(jnp.asarray(x)))):
        raise ValueError(f"ties: taus[{i}] has non-finite values at '{p}'")
    dtype = _compute_dtype(jnp.result_type(*[_dtype(x) for x in flat.values()]))
    rows = {p: _rows(p, x).astype(dtype) for p, x in flat.items()}
    if scope == "global":
      n = sum(r.size for r in rows.values())
      t = _bisect(functools.partial(_total_count, list(rows.values())),
                  np.array([max(1, int(k * n))]), dtype)[0]
      thr = {p: np.full((r.shape[0],), t, dtype) for p, r in rows.items()}
    else:
      thr = {}
      for p, r in rows.items():
        n_keep = np.full((r.shape[0],), max(1, int(k * r.shape[1])))
        thr[p] = _bisect(lambda t, r=r: np.asarray(_row_counts(r, jnp.asarray(t)), np.int64),
                         n_keep, dtype)
    trimmed = {}
    for p, x in flat.items():
      r, t = rows[p], jnp.asarray(thr[p]).reshape(-1, 1)
      trimmed[p] = jnp.where(jnp.abs(r) >= t, r, 0).reshape(np.shape(x)).astype(_dtype(x))
    out.append(pytree.unflatten(trimmed))
  return out


@jax.jit
def _disjoint_mean(tau_K: jax.Array) -> jax.Array:
  """TIES steps 2-3 on stacked trimmed tasks (K, ...): elect gamma = sign(sum_k), mean over the
  non-zero entries whose sign equals gamma (0 where none, including where gamma = 0)."""
  gamma = jnp.sign(jnp.sum(tau_K, axis=0))
  agree = (jnp.sign(tau_K) == gamma) & (tau_K != 0)
  total = jnp.sum(jnp.where(agree, tau_K, 0), axis=0)
  count = jnp.sum(agree, axis=0)
  return jnp.where(count > 0, total / jnp.maximum(count, 1).astype(tau_K.dtype), 0)


def ties_task_vector(taus: Sequence[Params], k: float = 0.2, scope: str = "global") -> Params:
  """The merged TIES task vector tau_m (trim, elect sign, disjoint mean); see `ties_trim`.

  [choice] An entry whose trimmed sum is exactly 0 elects gamma = 0 and merges to 0 (docs/methods.md
  §6.3); the paper's code gives it the majority sign instead, peft gives it +1.
  """
  if isinstance(taus, dict) or len(taus) == 0:
    raise ValueError("ties: taus must be a non-empty list of task-vector trees")
  flats = [_flat_like(taus[0], t, "ties", f"taus[{i}]") for i, t in enumerate(taus)]
  trimmed = [pytree.flatten(t) for t in ties_trim(taus, k, scope)]
  return pytree.unflatten({p: _disjoint_mean(jnp.stack([t[p] for t in trimmed]))
                           for p in flats[0]})


def ties_merge(theta0: Params, taus: Sequence[Params], k: float = 0.2, lam: float = 1.0,
               scope: str = "global") -> Params:
  """TIES-merging (Yadav et al. 2023): `theta0 + lam * tau_m`, tau_m from `ties_task_vector`
  (k = 0.2 keeps the top 20% of each tau_k by |tau|; lam = 1 without a validation set)."""
  lam = _check_finite(lam, "ties: lam")
  _flat_taus(theta0, taus, "ties")
  flat_m = pytree.flatten(ties_task_vector(taus, k, scope))
  return pytree.unflatten({p: _add_delta(x, flat_m[p], lam)
                           for p, x in pytree.flatten(theta0).items()})


# ----------------------------------------------------------------------------- DARE
def _check_p(p: float) -> float:
  p = float(p)
  if not 0.0 <= p < 1.0:
    raise ValueError(f"dare: drop rate p must be in [0, 1), got {p}")
  return p


def dare_mask(tau: Params, p: float, key: jax.Array) -> Params:
  """Keep masks m ~ Bernoulli(1 - p) (bool, True = kept), one per leaf; the leaf at sorted-path
  index i draws with `jax.random.fold_in(key, i)`. Traceable in `key` (vmap over keys)."""
  p = _check_p(p)
  flat = pytree.flatten(tau)
  return pytree.unflatten({path: jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - p,
                                                      np.shape(flat[path]))
                           for i, path in enumerate(sorted(flat))})


def dare(tau: Params, p: float, key: jax.Array) -> Params:
  """DARE (Yu et al. 2024, eq. 2): `(m * tau) / (1 - p)` with `m = dare_mask(tau, p, key)`, so
  E[tau_tilde] = tau; p = 0 returns tau unchanged. Shapes and dtypes of tau are kept."""
  p = _check_p(p)
  flat = pytree.flatten(tau)
  if p == 0.0:
    return pytree.unflatten({path: jnp.asarray(x) for path, x in flat.items()})
  masks = pytree.flatten(dare_mask(tau, p, key))
  out = {}
  for path, x in flat.items():
    x = jnp.asarray(x)
    out[path] = (jnp.where(masks[path], x, 0) / jnp.asarray(1.0 - p, x.dtype)).astype(x.dtype)
  return pytree.unflatten(out)


MERGES = {"task_arithmetic": task_arithmetic, "ties": ties_merge}


def dare_merge(theta0: Params, taus: Sequence[Params], p: float = 0.9,
               key: jax.Array | None = None, merge: str = "task_arithmetic",
               **merge_kwargs) -> Params:
  """DARE then a merge: task k is sparsified with `fold_in(key, k)`, then `MERGES[merge]`
  (task_arithmetic: `lam`; ties: `k`, `lam`, `scope`) runs on the rescaled task vectors."""
  if merge not in MERGES:
    raise ValueError(f"dare: merge must be one of {sorted(MERGES)}, got {merge!r}")
  p = _check_p(p)
  if key is None:
    key = jax.random.key(0)
  _flat_taus(theta0, taus, "dare")
  dropped = [dare(t, p, jax.random.fold_in(key, i)) for i, t in enumerate(taus)]
  return MERGES[merge](theta0, dropped, **merge_kwargs)


__all__ = ["alpha_per_leaf", "wise_ft", "wise_ft_method", "task_vectors", "task_arithmetic",
           "ties_trim", "ties_task_vector", "ties_merge", "dare_mask", "dare", "dare_merge",
           "MERGES"]
