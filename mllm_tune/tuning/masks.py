"""Mask helpers shared by method families: patterns, rule lists -> masks over `{"params",
"adapters"}`, the LLM's layer count and named target regexes (logical paths, see `pytree.py`)."""
from __future__ import annotations

from typing import Sequence

from mllm_tune import pytree
from mllm_tune.tuning.api import MethodError

Patterns = str | tuple[str, ...]
ALL_LLM_LINEARS = r"llm/layers_\d+/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"


def as_patterns(patterns: Patterns | None) -> tuple[str, ...]:
  """`"a"` / `("a", "b")` / `None` / `""` -> a tuple of regexes (empty for None or "")."""
  if patterns is None or patterns == "":
    return ()
  return (patterns,) if isinstance(patterns, str) else tuple(patterns)


def num_llm_layers(params: dict) -> int:
  for leaf in pytree.leaves(params):
    if leaf.path.startswith("llm/layers/"):
      return int(leaf.num_layers)
  raise MethodError("these params have no stacked LLM blocks (llm/layers/...)")


def last_k_layers_regex(params: dict, k: int) -> str:
  """`llm/layers_(i|..|L-1)/.*`: the last k LLM blocks (docs/methods.md §2.1 `llm_last_k`)."""
  n = num_llm_layers(params)
  if not 1 <= k <= n:
    raise MethodError(f"preset llm_last_k: k={k} (config key 'method.k') must be in [1, {n}]: "
                      f"the model has {n} LLM blocks")
  return r"llm/layers_(" + "|".join(str(i) for i in range(n - k, n)) + r")/.*"


def rules_mask(params: dict, rules: Sequence[tuple[str, bool]], what: str) -> dict:
  """Params mask from ordered `(regex, trainable)` rules (first match wins, default frozen)."""
  resolved = pytree.match_layers(params, list(rules), default=False, what=what)
  shapes = {leaf.path: leaf.shape for leaf in pytree.leaves(params)}
  return pytree.unflatten({p: pytree.layer_values_to_mask(v, shapes[p])
                           for p, v in resolved.items()})


def variables_mask(variables: dict, params_mask: dict, adapters_mask: dict | None = None) -> dict:
  """Full mask over `{"params", "adapters"}`: the given params mask, adapters frozen unless set."""
  adapters = pytree.flatten(variables.get("adapters", {}))
  flat_a = {p: False for p in adapters}
  flat_a.update(pytree.flatten(adapters_mask or {}))
  return {"params": params_mask, "adapters": pytree.unflatten(flat_a)}
