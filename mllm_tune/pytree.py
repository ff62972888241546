"""Params as "a/b/c" paths: flatten / unflatten, stacked <-> logical layer paths, path selectors,
and the trainable / frozen partition.

Path selectors: ordered `(regex, value)` lists matched with `re.fullmatch` on logical paths.

Storage keeps transformer blocks stacked (`llm/layers/attn/q_proj/kernel`, leading axis L); users
and selectors see *logical* paths with the layer spelled out (`llm/layers_3/attn/q_proj/kernel`),
so `llm/layers_(2[4-9]|3[01])/.*` picks the last 8 of 32 blocks. A per-layer match on a stacked
leaf becomes a boolean vector over axis 0. Patterns are anchored (`fullmatch`) on full paths, so
`llm/.*` never reaches `vision/...` and `q_proj` alone matches nothing (peft's suffix matching
put LoRA on LLaVA's frozen CLIP tower; here that needs an explicit `.*q_proj`).

A pattern that matches nothing raises `SelectorError` naming it and the closest real paths; a
pattern whose alternative `(a|b)` matches nothing while the rest does (`mlp/(fc1|fc2)` on a
tower that names them otherwise) is logged as a warning (`dead_alternatives`).
"""
from __future__ import annotations

import difflib
import logging
import re
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

STACKED_ROOTS = ("llm", "vision", "text")  # `<root>/layers/...` leaves: leading layer axis
# ("text": the CLIP text tower of models/clip.py; LLaVA has no such root)


log = logging.getLogger(__name__)
_WARNED: set = set()  # (what, pattern, dead alternatives) already logged


class SelectorError(ValueError):
  """A selector pattern is invalid or matches no parameter."""


class Leaf(NamedTuple):
  path: str                 # storage path, e.g. llm/layers/attn/q_proj/kernel
  num_layers: int | None    # L for stacked leaves, else None
  shape: tuple[int, ...]


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  """Nested dict -> {"a/b/c": leaf}."""
  out = {}
  for k, v in tree.items():
    p = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, dict):
      out.update(flatten(v, p))
    else:
      out[p] = v
  return out


def unflatten(flat: dict[str, Any]) -> dict:
  out: dict = {}
  for p, v in flat.items():
    node = out
    *parents, last = p.split("/")
    for k in parents:
      node = node.setdefault(k, {})
    node[last] = v
  return out


def is_stacked(path: str) -> bool:
  parts = path.split("/")
  return len(parts) > 2 and parts[0] in STACKED_ROOTS and parts[1] == "layers"


def leaves(tree: dict) -> list[Leaf]:
  out = []
  for p, x in flatten(tree).items():
    shape = tuple(np.shape(x))
    out.append(Leaf(p, shape[0] if is_stacked(p) else None, shape))
  return out


def logical_path(path: str, layer: int | None) -> str:
  if layer is None:
    return path
  root, _, rest = path.split("/", 2)
  return f"{root}/layers_{layer}/{rest}"


def logical_paths(leaf: Leaf) -> Iterator[tuple[str, int | None]]:
  if leaf.num_layers is None:
    yield leaf.path, None
  else:
    for i in range(leaf.num_layers):
      yield logical_path(leaf.path, i), i


def _compile(pattern: str) -> re.Pattern:
  try:
    return re.compile(pattern)
  except re.error as e:
    raise SelectorError(f"selector regex {pattern!r} is invalid: {e}") from e


def _nearby(pattern: str, candidates: Sequence[str], n: int = 5) -> list[str]:
  close = difflib.get_close_matches(pattern, candidates, n=n, cutoff=0.3)
  return close or list(candidates[:n])


def is_kernel(leaf: Leaf) -> bool:
  """A Linear kernel: `.../kernel` of rank 2 (3 when stacked)."""
  return leaf.path.endswith("/kernel") and len(leaf.shape) == (3 if leaf.num_layers else 2)


def is_expert_path(path: str) -> bool:
  """A mixture-of-experts weight stack's path (`.../mlp/experts_gate_up`, models/moe.py)."""
  return path.rsplit("/", 1)[-1].startswith("experts_")


def is_expert_tensor(leaf: Leaf) -> bool:
  """A mixture-of-experts weight stack: `.../experts_<name>` (E, d_in, d_out) ((L, E, ..) when
  stacked), E Linear kernels in one tensor."""
  return is_expert_path(leaf.path) and len(leaf.shape) == (4 if leaf.num_layers else 3)


TOKEN_EMBEDDING = "llm/embed/embedding"


def match_layers(tree: dict, rules: Sequence[tuple[str, Any]], default: Any = None,
                 what: str = "parameter", require_match: bool = True,
                 module_level: bool = False, expert_tensors: bool = False,
                 embeddings: bool = False) -> dict[str, list[Any] | Any]:
  """Resolve ordered `(regex, value)` rules on every leaf (first match wins).

  Returns {storage_path: value} for unstacked leaves and {storage_path: [value per layer]} for
  stacked ones. With `module_level`, patterns match the module path (leaf name dropped, e.g.
  `llm/layers_3/attn/q_proj`) of 2-D kernels only, as LoRA-style `targets` do; with
  `expert_tensors` too, a mixture-of-experts weight stack is a target of its own, named by its
  full path (`llm/layers_3/mlp/experts_gate_up`), for the patterns that spell `experts` (so a
  broad `llm/.*` keeps meaning the Linear modules, as peft's target_modules do); with
  `embeddings`, the LLM's token embedding table is a module (`llm/embed`) for the patterns that
  spell `embed`.
  """
  compiled = [(_compile(p), p, v) for p, v in rules]
  hits = {p: 0 for _, p, _ in compiled}
  out: dict[str, Any] = {}
  candidates: list[str] = []
  for leaf in leaves(tree):
    expert = module_level and expert_tensors and is_expert_tensor(leaf)
    embedding = module_level and embeddings and leaf.path == TOKEN_EMBEDDING
    if module_level and not (expert or embedding or is_kernel(leaf)):
      continue
    values = []
    for lp, _ in logical_paths(leaf):
      name = lp.rsplit("/", 1)[0] if module_level and not expert else lp
      candidates.append(name)
      value = default
      for rx, p, v in compiled:
        if (expert and "experts" not in p) or (embedding and "embed" not in p):
          continue
        if rx.fullmatch(name):
          hits[p] += 1
          value = v
          break
      values.append(value)
    out[leaf.path] = values if leaf.num_layers is not None else values[0]
  if require_match:
    for _, p, _ in compiled:
      if hits[p] == 0:
        uniq = sorted(set(candidates))
        raise SelectorError(
            f"{what} selector {p!r} matches no {'module' if module_level else what} path "
            f"(patterns are re.fullmatch'ed on logical paths like 'llm/layers_0/attn/q_proj"
            f"{'' if module_level else '/kernel'}'); nearby paths: {_nearby(p, uniq)}")
      dead = dead_alternatives(p, sorted(set(candidates)))
      if dead and (what, p, tuple(dead)) not in _WARNED:  # once per process, not per call
        _WARNED.add((what, p, tuple(dead)))
        log.warning("%s selector %r: its alternative(s) %s match no %s path (the rest of the "
                    "pattern does); a misspelt name? nearby paths: %s", what, p,
                    ", ".join(map(repr, dead)), "module" if module_level else what,
                    _nearby(dead[0], sorted(set(candidates))))
  return out


def _alternations(pattern: str) -> list[tuple[int, int, list[tuple[int, int]]]]:
  """Every group of `pattern` with alternatives, and the pattern itself when it has top-level
  ones: (content start, content end, [(start, end) of each alternative]). Lookaround groups
  are left out; escapes and character classes are skipped."""
  out, stack = [], [[0, [], False]]  # per open group: content start, its '|' positions, skip
  i, n = 0, len(pattern)
  while i < n:
    c = pattern[i]
    if c == "\\":
      i += 2
      continue
    if c == "[":  # a class: up to its closing ']' (a ']' right after '[' or '[^' is literal)
      j = i + 1 + (pattern[i + 1:i + 2] == "^")
      j += pattern[j:j + 1] == "]"
      while j < n and pattern[j] != "]":
        j += 2 if pattern[j] == "\\" else 1
      i = j + 1
      continue
    if c == "(":
      start, skip = i + 1, False
      if pattern.startswith("?", start):
        m = re.match(r"\?(:|P<\w+>|[=!]|<[=!]|[aiLmsux-]+:)", pattern[start:])
        skip = m is None or m.group(1) in ("=", "!", "<=", "<!")
        start += len(m.group(0)) if m else 1
      stack.append([start, [], skip])
    elif c == ")" and len(stack) > 1:
      start, bars, skip = stack.pop()
      if bars and not skip:
        out.append((start, i, _spans(start, i, bars)))
    elif c == "|":
      stack[-1][1].append(i)
    i += 1
  if stack[0][1]:
    out.append((0, n, _spans(0, n, stack[0][1])))
  return out


def _spans(start: int, end: int, bars: list[int]) -> list[tuple[int, int]]:
  edges = [start - 1] + bars + [end]
  return [(a + 1, b) for a, b in zip(edges, edges[1:])]


def dead_alternatives(pattern: str, names: Sequence[str]) -> list[str]:
  """The alternatives of `pattern`'s `(a|b|..)` groups that no name fullmatches when the group
  is reduced to them (outermost only: a dead alternative's own inner ones are not listed),
  given that the whole pattern matches some name. E.g. `vision/(attn/qkv|mlp/(fc1|fc2))` on
  a tower without fc1 / fc2 -> ['mlp/(fc1|fc2)']."""
  groups = sorted(_alternations(pattern))  # outer groups first
  dead: list[tuple[int, int]] = []
  for _, _, spans in groups:
    for a, b in spans:
      if any(x <= a and b <= y for x, y in dead):
        continue
      # every group around this alternative (its own included) reduced to the alternative
      # holding it: the other alternatives and their bars are cut out
      cut = [r for start, end, alts in groups if start <= a and b <= end
             for x, y in alts if x <= a and b <= y for r in ((start, x), (y, end))]
      keep = "".join(ch for i, ch in enumerate(pattern)
                     if not any(lo <= i < hi for lo, hi in cut))
      try:
        rx = re.compile(keep)
      except re.error:  # e.g. a backreference to a group of another alternative
        continue
      if not any(rx.fullmatch(name) for name in names):
        dead.append((a, b))
  return [pattern[a:b] for a, b in sorted(dead)]


def bool_mask(tree: dict, patterns: Sequence[str] | str, what: str = "trainable",
              require_match: bool = True) -> dict:
  """Leaf mask tree: True / False / a (L, 1, ..) bool array for per-layer matches."""
  if isinstance(patterns, str):
    patterns = [patterns]
  resolved = match_layers(tree, [(p, True) for p in patterns], default=False, what=what,
                          require_match=require_match)
  shapes = {leaf.path: leaf.shape for leaf in leaves(tree)}
  return unflatten({p: layer_values_to_mask(v, shapes[p]) for p, v in resolved.items()})


def layer_mask(flags: np.ndarray, ndim: int):
  """Mask of a leaf of rank `ndim` from per-layer flags (L,) (or () for an unstacked leaf):
  True/False when uniform, else an (L, 1, ...) bool array."""
  flags = np.asarray(flags, bool)
  if flags.ndim == 0 or flags.all() or not flags.any():
    return bool(np.all(flags))
  return flags.reshape((-1,) + (1,) * (ndim - 1))


def layer_values_to_mask(values, shape: tuple[int, ...]):
  """A per-layer list of bools (or one bool) -> `layer_mask` for a leaf of `shape`."""
  if not isinstance(values, list):
    return bool(values)
  return layer_mask(np.asarray(values, bool), len(shape))


def mask_any(m) -> bool:
  return bool(np.any(m))


def mask_count(m, shape: tuple[int, ...]) -> int:
  """Number of trainable elements a leaf mask selects."""
  if isinstance(m, (bool, np.bool_)):
    return int(np.prod(shape, dtype=np.int64)) if m else 0
  m = np.asarray(m, bool)
  m = m.reshape((1,) * (len(shape) - m.ndim) + m.shape)
  repeat = int(np.prod([s for s, k in zip(shape, m.shape) if k == 1 and s != 1],
                       dtype=np.int64))  # broadcast dims, without materializing them
  return int(m.sum()) * repeat


def partition(variables: dict, mask: dict) -> tuple[dict, dict]:
  """Split into (trainable, frozen) nested dicts; a leaf is trainable if any mask entry is."""
  flat_v, flat_m = flatten(variables), flatten(mask)
  missing = set(flat_v) - set(flat_m)
  if missing:
    raise SelectorError(f"mask has no entry for {sorted(missing)[:5]}")
  train = {p: x for p, x in flat_v.items() if mask_any(flat_m[p])}
  frozen = {p: x for p, x in flat_v.items() if not mask_any(flat_m[p])}
  return unflatten(train), unflatten(frozen)


def combine(trainable: dict, frozen: dict) -> dict:
  """Inverse of `partition`: one variables tree (with an `adapters` collection, maybe empty)."""
  flat = flatten(frozen)
  flat.update(flatten(trainable))
  out = unflatten(flat)
  out.setdefault("adapters", {})
  return out
