"""The post-hoc step of a recipe: WiSE-FT, DARE or TIES on the tuned model, swept and selected.

After training, the tuned method is folded into its base weights, `theta_ft = method.merge(
variables)`, and one weight-space step (docs/methods.md §6.1, 6.3; `tuning/merging.py`) maps
(theta0, theta_ft) to base params, once per swept value of its parameter:
  wise_ft (6.1, alpha): `(1 - alpha) theta0 + alpha theta_ft` (per-module `alphas` rules pass
                        through unchanged; only the default alpha is swept)
  dare    (6.3, p):     `theta0 + lam * tau_tilde`, tau = theta_ft - theta0, tau_tilde =
                        `(m * tau) / (1 - p)` (`m * tau` with rescale=False), m drawn as task 0
                        of `merging.dare_merge(..., key=jax.random.key(seed))`
  ties    (6.3, k):     `merging.ties_merge(theta0, [tau], k, lam, scope)`: with one task vector,
                        `theta0 + lam * trim_k(tau)` (sign election and mean are the identity)
`run` scores every candidate with the caller's evaluator and keeps the best one by a trade-off
metric (`eval/selection.py`, docs/methods.md §8), ties to the candidate listed first.

Config (`c.posthoc`, a ConfigDict or dict; missing keys take these defaults, unknown keys are an
error): name none | wise_ft | dare | ties; sweep (values of the step's parameter, empty = its
single default); alpha 0.5; alphas (); p 0.9; rescale True; k 0.2; lam 1.0; scope "global";
seed 0.

Mergeability [choice]: `check(cfg, method)` uses the methods' `mergeable` flags (Compose walked);
`check(cfg, method, variables)` also runs `jax.eval_shape(method.merge, variables)` (no FLOPs),
which catches variable-dependent refusals (BitFit's added biases). `candidates` and `run` check
with the variables. theta0 is always passed in: full / selective tuning and PiSSA change
`variables["params"]`. Candidates are produced lazily, and `run` holds one candidate tree at a
time (the chosen one is recomputed unless it was the last scored).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mllm_tune.posthoc import merging
from mllm_tune import pytree
from mllm_tune.tuning.api import Compose, Method, MethodError, label

Params = dict
ScoreFn = Callable[[Params], Mapping[str, Any]]

DEFAULTS: dict[str, Any] = {"name": "none", "sweep": (), "alpha": 0.5, "alphas": (), "p": 0.9,
                            "rescale": True, "k": 0.2, "lam": 1.0, "scope": "global", "seed": 0}
PARAMS = {"wise_ft": "alpha", "dare": "p", "ties": "k"}  # step -> its swept parameter
NAMES = ("none",) + tuple(PARAMS)


class PosthocError(ValueError):
  """A post-hoc step that does not apply: unknown name, bad values, non-mergeable method,
  missing selection metric."""


# ----------------------------------------------------------------------------- config
def _options(cfg) -> dict:
  """The config as a plain dict with defaults filled in; names and keys checked."""
  d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  unknown = sorted(set(d) - set(DEFAULTS))
  if unknown:
    raise PosthocError(f"posthoc config has unknown key(s) {unknown}; keys: {sorted(DEFAULTS)}")
  o = {**DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
  if o["name"] not in NAMES:
    raise PosthocError(f"unknown post-hoc step {o['name']!r}; known: {', '.join(NAMES)}")
  o["sweep"] = tuple(o["sweep"])
  o["alphas"] = tuple(tuple(r) for r in o["alphas"])
  return o


def _number(name: str, what: str, value: Any) -> float:
  try:
    return float(value)
  except (TypeError, ValueError):
    raise PosthocError(f"post-hoc step '{name}': {what} must be a number, got {value!r}") from None


def _check_value(name: str, value: Any) -> float:
  v = _number(name, PARAMS[name], value)
  ok = {"wise_ft": math.isfinite(v),  # WiSE-FT may extrapolate: any finite alpha
        "dare": 0.0 <= v < 1.0, "ties": 0.0 < v <= 1.0}[name]
  if not ok:
    rng = {"wise_ft": "finite", "dare": "in [0, 1)", "ties": "in (0, 1]"}[name]
    raise PosthocError(f"post-hoc step '{name}': {PARAMS[name]} must be {rng}, got {value!r}")
  return v


def sweep_values(cfg) -> tuple[float, ...]:
  """The swept values of the step's parameter (validated): `sweep`, or the single default.
  Empty for name 'none'."""
  o = _options(cfg)
  name = o["name"]
  if name == "none":
    return ()
  return tuple(_check_value(name, v) for v in (o["sweep"] or (o[PARAMS[name]],)))


def _unmergeable(method: Method) -> list[str]:
  if isinstance(method, Compose):
    return [n for m in method.methods for n in _unmergeable(m)]
  return [] if method.mergeable else [label(method)]


def _refusal(name: str, method: str, why: str) -> PosthocError:
  return PosthocError(f"post-hoc step '{name}' works on base weights; method '{method}' adds "
                      f"modules that do not merge into them ({why})")


def check(cfg, method: Method, variables: dict | None = None) -> None:
  """PosthocError unless the step applies: known name and keys, parameter values in range (alpha
  finite, p in [0, 1), k in (0, 1]), finite lam, scope global | tensor, and a method that merges
  into base weights. With `variables` (arrays or ShapeDtypeStructs) the merge is traced
  abstractly and `alphas` rules are matched against `variables["params"]`. Name 'none' only
  checks the keys."""
  o = _options(cfg)
  name = o["name"]
  if name == "none":
    return
  sweep_values(o)
  _check_value(name, o[PARAMS[name]])
  if not math.isfinite(_number(name, "lam", o["lam"])):
    raise PosthocError(f"post-hoc step '{name}': lam must be finite, got {o['lam']!r}")
  if o["scope"] not in ("global", "tensor"):
    raise PosthocError(f"post-hoc step '{name}': scope must be 'global' or 'tensor', got "
                       f"{o['scope']!r}")
  if not isinstance(o["seed"], (int, np.integer)) or isinstance(o["seed"], bool):
    raise PosthocError(f"post-hoc step '{name}': seed must be an int, got {o['seed']!r}")
  for rule in o["alphas"]:
    if (len(rule) != 2 or not isinstance(rule[0], str)
        or not math.isfinite(_number(name, "an alphas rule's alpha", rule[1]))):
      raise PosthocError(f"post-hoc step '{name}': alphas rules are (regex, finite alpha) pairs, "
                         f"got {rule!r}")
  bad = _unmergeable(method)
  if bad:
    where = f", composed in '{label(method)}'" if isinstance(method, Compose) else ""
    raise _refusal(name, bad[0], f"its class sets mergeable = False{where}")
  if variables is None:
    return
  try:
    jax.eval_shape(method.merge, variables)
  except MethodError as e:
    raise _refusal(name, label(method), f"MethodError: {e}") from e
  if name == "wise_ft" and o["alphas"]:
    try:
      merging.alpha_per_leaf(variables["params"], o["alpha"], o["alphas"])
    except ValueError as e:
      raise PosthocError(f"post-hoc step 'wise_ft': {e}") from e


# ----------------------------------------------------------------------------- candidates
def _merged(name: str, method: Method, variables: dict, theta0: Params) -> Params:
  """theta_ft = method.merge(variables), checked to have theta0's paths and shapes."""
  try:
    theta_ft = method.merge(variables)
  except MethodError as e:
    raise _refusal(name, label(method), f"MethodError: {e}") from e
  a, b = pytree.flatten(theta0), pytree.flatten(theta_ft)
  bad = sorted(set(a) ^ set(b)) or [p for p in sorted(a) if np.shape(a[p]) != np.shape(b[p])]
  if bad:
    raise PosthocError(f"post-hoc step '{name}': theta0 and the merged tuned params differ at "
                       f"{bad[:3]} (missing/extra paths or shapes); pass the pretrained params")
  return theta_ft


def _apply(o: dict, value: float, theta0: Params, theta_ft: Params) -> Params:
  """One candidate: the step with its parameter set to `value`."""
  name = o["name"]
  try:
    if name == "wise_ft":
      return merging.wise_ft(theta0, theta_ft, value, o["alphas"])
    tau = merging.task_vectors(theta0, [theta_ft])[0]
    if name == "ties":
      return merging.ties_merge(theta0, [tau], value, o["lam"], o["scope"])
    key = jax.random.fold_in(jax.random.key(int(o["seed"])), 0)  # task 0 of dare_merge
    if o["rescale"]:
      tau = merging.dare(tau, value, key)
    else:
      keep = pytree.flatten(merging.dare_mask(tau, value, key))
      tau = pytree.unflatten({p: jnp.where(keep[p], x, 0).astype(x.dtype)
                              for p, x in pytree.flatten(tau).items()})
    return merging.task_arithmetic(theta0, [tau], o["lam"])
  except ValueError as e:  # e.g. non-float leaves, alphas rules matching nothing
    raise PosthocError(f"post-hoc step '{name}': {e}") from e


def _lazy(o: dict, values: tuple[float, ...], theta0: Params,
          theta_ft: Params) -> Iterator[tuple[float, Params]]:
  for v in values:
    yield v, _apply(o, v, theta0, theta_ft)


def candidates(cfg, method: Method, variables: dict,
               theta0: Params) -> Iterator[tuple[float, Params]]:
  """Lazily, `(value, params)` per swept value: the step applied to (theta0, method.merge(
  variables)); params is a base params tree (no adapters) with theta0's paths and dtypes.
  Checks (and merges) eagerly; `list(...)` for all at once."""
  o = _options(cfg)
  if o["name"] == "none":
    raise PosthocError("posthoc.name is 'none': there is no post-hoc step to apply")
  check(o, method, variables)
  return _lazy(o, sweep_values(o), theta0, _merged(o["name"], method, variables, theta0))


# ----------------------------------------------------------------------------- selection
def _scalar(key: str, v: Any) -> Any:
  if isinstance(v, (str, bool)):
    return v
  a = np.asarray(v)
  if a.size != 1 or a.dtype.kind not in "biuf":
    raise PosthocError(f"score_fn returned a non-scalar metric '{key}' (shape {a.shape}, "
                       f"dtype {a.dtype})")
  x = a.reshape(()).item()
  return x if isinstance(x, (bool, int)) else float(x)


def _metrics(m: Mapping[str, Any]) -> dict:
  """JSON-ready copy of an evaluator's metrics (python floats / ints / bools / strings)."""
  return {str(k): _scalar(str(k), v) for k, v in dict(m).items()}


def _score(m: dict, metric: str, what: str) -> float:
  if metric not in m:
    raise PosthocError(f"selection metric '{metric}' is not in the metrics of {what}; "
                       f"score_fn returned {sorted(m)[:12]}")
  return float(m[metric])


def run(cfg, method: Method, variables: dict, theta0: Params, score_fn: ScoreFn,
        metric: str = "tradeoff/O", mode: str = "max") -> tuple[Params, dict]:
  """Score every candidate with `score_fn(params) -> metrics` and keep the best by `metric`
  (`mode` max | min; non-finite scores never win; ties: the candidate listed first).

  Returns (chosen params, record): record = {name, param, chosen, select: {metric, mode},
  candidates: [{value, metrics}], before: metrics of theta_ft, after: the chosen candidate's
  metrics, config}, JSON-serialisable. score_fn is called len(sweep) + 1 times.
  """
  o = _options(cfg)
  name = o["name"]
  if name == "none":
    raise PosthocError("posthoc.name is 'none': there is no post-hoc step to run")
  if mode not in ("max", "min"):
    raise PosthocError(f"selection mode must be 'max' or 'min', got {mode!r}")
  check(o, method, variables)
  values = sweep_values(o)
  theta_ft = _merged(name, method, variables, theta0)
  before = _metrics(score_fn(theta_ft))
  _score(before, metric, "theta_ft (before the step)")
  rows, best, best_score, params = [], None, None, None
  for i, (v, params) in enumerate(_lazy(o, values, theta0, theta_ft)):
    m = _metrics(score_fn(params))
    s = _score(m, metric, f"candidate {PARAMS[name]}={v}")
    rows.append({"value": float(v), "metrics": m})
    if math.isfinite(s) and (best is None or (s > best_score if mode == "max" else s < best_score)):
      best, best_score = i, s
    if i < len(values) - 1:
      params = None  # only one candidate tree alive at a time
  if best is None:
    raise PosthocError(f"no candidate of post-hoc step '{name}' has a finite '{metric}'")
  if best != len(values) - 1:
    params = _apply(o, values[best], theta0, theta_ft)
  record = {"name": name, "param": PARAMS[name], "chosen": float(values[best]),
            "select": {"metric": metric, "mode": mode}, "candidates": rows, "before": before,
            "after": dict(rows[best]["metrics"]),
            "config": {**o, "sweep": list(values),  # sweep: the values actually swept
                       "alphas": [list(r) for r in o["alphas"]], "seed": int(o["seed"])}}
  return params, record


__all__ = ["PosthocError", "DEFAULTS", "PARAMS", "NAMES", "sweep_values", "check", "candidates",
           "run"]
