"""The Method contract, the registry, composition, and the trainable/frozen partition.

A tuning method is a frozen dataclass registered by name (`get("lora", rank=8)`); it works on
*variables* `{"params": base, "adapters": added}` (adapters mirror the path of the layer they attach
to, e.g. `llm/layers/attn/q_proj/lora_a`, stacked like their layer):

  init_variables(rng, params) -> variables      # adds adapters (may rewrite base, e.g. PiSSA)
  trainable(variables) -> mask                  # same tree; leaves True/False or bool arrays
  transform(variables, inner) -> optax.GradientTransformation   # wraps the user's optimizer
  loss_terms(variables, batch, logits) -> {name: scalar}        # terms needing forward outputs
                                                # (logits=None unless `needs_logits`)
  merge(variables) -> params                    # fold into base weights (mergeable methods)
  export_peft / import_peft                     # where PEFT has the method (tuning/peft/)

Leaf masks: a leaf is trained when its mask has any True; whole-leaf-frozen leaves are split off
before `jax.grad` (`partition`) and hold no optimizer state. Partial masks (per-layer vectors
(L, 1, ..) or element arrays) are applied as the **last** link of the optimizer chain, so masked
entries move by exactly 0 (after weight decay too).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mllm_tune import pytree, registry

log = logging.getLogger(__name__)

Variables = dict  # {"params": ..., "adapters": ...}
REGISTRY: dict[str, type["Method"]] = {}


class MethodError(ValueError):
  """Bad method name, config, composition or merge request."""


def register(name: str, family: str):
  """Class decorator naming a method; `register_module` (called for the one list of method
  modules in `tuning/__init__.py`) puts it in the registry."""
  def deco(cls):
    cls.family = family
    return registry.mark(cls, name)
  return deco


def register_module(module) -> None:
  """Registers every Method class `module` defines with `@register` (by its registry name)."""
  registry.collect(module, REGISTRY, MethodError, "tuning method")


def get(name: str, **cfg) -> "Method":
  """`get("lora", rank=8, alpha=16, targets=r"llm/.*/(q|v)_proj")` -> a Method."""
  return registry.instantiate(REGISTRY, name, cfg, MethodError, "tuning method")


def from_config(cfg) -> "Method":
  """A `configs/methods/<name>.py` ConfigDict (or dict) -> Method; `methods` lists compose."""
  d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  if "methods" in d:
    return compose(*(from_config(m) for m in d["methods"]))
  if "name" not in d:
    raise MethodError("method config needs a 'name' field")
  name = d.pop("name")
  return get(name, **{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def names(family: str | None = None) -> list[str]:
  return sorted(n for n, c in REGISTRY.items() if family is None or c.family == family)


def label(m: "Method") -> str:
  return m.name or type(m).__name__


def _false_like(tree: dict) -> dict:
  return jax.tree.map(lambda _: False, tree)


@dataclasses.dataclass(frozen=True)
class Method:
  """Base class: trains nothing, adds nothing, merges trivially."""
  name: ClassVar[str] = ""
  family: ClassVar[str] = ""
  mergeable: ClassVar[bool] = True
  # how to use a method that never trains (a post-hoc one): said when training it is refused
  untrained_hint: ClassVar[str] = "check its targets/selectors"

  def init(self, rng: jax.Array, params: dict) -> dict:
    """Adapters this method adds (may be empty)."""
    del rng, params
    return {}

  def init_variables(self, rng: jax.Array, params: dict) -> Variables:
    return {"params": params, "adapters": self.init(rng, params)}

  def rebase(self, variables: Variables) -> Variables:
    """Saved adapters + the *original* base -> the variables training used. Identity except for
    methods whose `init_variables` rewrites the base (PiSSA's residual)."""
    return variables

  def trainable(self, variables: Variables) -> dict:
    return {"params": _false_like(variables["params"]),
            "adapters": _false_like(variables.get("adapters", {}))}

  def transform(self, variables: Variables,
                inner: optax.GradientTransformation) -> optax.GradientTransformation:
    del variables
    return inner

  def loss_terms(self, variables: Variables, batch: dict, logits: jax.Array | None) -> dict:
    del variables, batch, logits
    return {}

  @property
  def needs_logits(self) -> bool:
    """Whether `loss_terms` reads `logits`. When False the training step computes the
    cross-entropy chunk by chunk and passes `logits=None`. Default: True iff the class overrides
    `loss_terms` (a subclass that ignores them says `needs_logits: ClassVar[bool] = False`)."""
    return type(self).loss_terms is not Method.loss_terms

  def merge(self, variables: Variables) -> dict:
    """Base params with this method folded in (adapters dropped)."""
    if not self.mergeable:
      raise MethodError(f"method '{self.name}' adds modules that cannot be folded into the base "
                        "weights; export its adapters instead")
    return variables["params"]

  def weight_view(self, variables: Variables) -> dict:
    """The base params with this method folded in as far as the weights can hold it: what the
    penalties pull (`penalties.api`). `merge`, except where a merge is refused for a part that
    has no base weight to fold into (LoRA's `lora_bias` on a layer without a bias: left out)."""
    return self.merge(variables)


# ----------------------------------------------------------------------------- partition
def partition(variables: Variables, mask: dict) -> tuple[dict, dict]:
  """Split into (trainable, frozen) nested dicts; a leaf is trainable if any mask entry is."""
  try:
    return pytree.partition(variables, mask)
  except pytree.SelectorError as e:
    raise MethodError(str(e)) from None


combine = pytree.combine


def partial_masks(mask: dict, trainable: dict) -> dict:
  """Masks for the trainable partition's leaves: None (whole leaf) or a bool array."""
  flat_m = pytree.flatten(mask)
  out = {}
  for p, x in pytree.flatten(trainable).items():
    m = flat_m[p]
    out[p] = None if isinstance(m, (bool, np.bool_)) or np.all(m) else np.asarray(m, bool)
  return out


def mask_updates(masks_by_path: dict[str, np.ndarray | None]) -> optax.GradientTransformation:
  """Zero the updates of masked-out entries (last link of the chain)."""
  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    flat = pytree.flatten(updates)
    for p, m in masks_by_path.items():
      if m is not None and p in flat:
        flat[p] = jnp.where(jnp.asarray(m), flat[p], jnp.zeros_like(flat[p]))
    return pytree.unflatten(flat), state

  return optax.GradientTransformation(init, update)


def build_optimizer(method: "Method", variables: Variables, mask: dict, trainable: dict,
                    optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
  """Partial masks on the gradients (so clipping and moments never see frozen entries),
  `method.transform` around the user optimizer, then the same masks on the updates (so weight
  decay cannot move them either)."""
  pm = partial_masks(mask, trainable)
  return optax.chain(mask_updates(pm), method.transform(variables, optimizer), mask_updates(pm))


# ----------------------------------------------------------------------------- composition
@dataclasses.dataclass(frozen=True)
class Compose(Method):
  """Several methods on disjoint leaves, e.g. LoRA on the LLM + full tuning of the projector."""
  methods: tuple = ()

  def __post_init__(self):
    if not self.methods:
      raise MethodError("compose() needs at least one method")

  def init_variables(self, rng, params):
    adapters: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for i, m in enumerate(self.methods):
      v = m.init_variables(jax.random.fold_in(rng, i), params)
      params = v["params"]
      for p, x in pytree.flatten(v.get("adapters", {})).items():
        if p in adapters:
          raise MethodError(f"methods '{owner[p]}' and '{label(m)}' both add adapter leaf "
                            f"'{p}'")
        adapters[p], owner[p] = x, label(m)
    return {"params": params, "adapters": pytree.unflatten(adapters)}

  def trainable(self, variables):
    flat_masks = [pytree.flatten(m.trainable(variables)) for m in self.methods]
    out = {}
    for p in flat_masks[0]:
      claimed = [(label(m), fm[p]) for m, fm in zip(self.methods, flat_masks)
                 if pytree.mask_any(fm.get(p, False))]
      if len(claimed) > 1:
        raise MethodError(f"leaf '{p}' is trained by more than one method "
                          f"({', '.join(n for n, _ in claimed)}); compositions must be disjoint")
      out[p] = claimed[0][1] if claimed else False
    return pytree.unflatten(out)

  def transform(self, variables, inner):
    for m in reversed(self.methods):
      inner = m.transform(variables, inner)
    return inner

  @property
  def needs_logits(self) -> bool:
    return any(m.needs_logits for m in self.methods)

  def loss_terms(self, variables, batch, logits):
    out = {}
    for m in self.methods:
      for k, v in m.loss_terms(variables, batch, logits).items():
        out[f"{label(m)}/{k}" if k in out else k] = v
    return out

  def rebase(self, variables):
    for m in self.methods:
      variables = m.rebase(variables)
    return variables

  def merge(self, variables):
    params = variables["params"]
    for m in self.methods:
      params = m.merge({"params": params, "adapters": variables.get("adapters", {})})
    return params

  def weight_view(self, variables):
    params = variables["params"]
    for m in self.methods:
      params = m.weight_view({"params": params, "adapters": variables.get("adapters", {})})
    return params


def compose(*methods: Method) -> Compose:
  return Compose(methods=tuple(methods))


# ----------------------------------------------------------------------------- reporting
def trainable_table(variables: Variables, mask: dict) -> tuple[str, int, int]:
  """Markdown table of trained leaves: (table, trainable count, base param count)."""
  flat_m = pytree.flatten(mask)
  total = sum(int(np.prod(np.shape(x), dtype=np.int64))
              for x in pytree.flatten(variables["params"]).values())
  rows, n_train = [], 0
  for p, x in pytree.flatten(variables).items():
    n = pytree.mask_count(flat_m[p], tuple(np.shape(x)))
    if n:
      rows.append(f"| {p} | {tuple(np.shape(x))} | {n:,} | {100 * n / max(total, 1):.4f}% |")
      n_train += n
  head = "| path | shape | trainable | % of model |\n|---|---|---|---|"
  foot = f"| **total** | | **{n_train:,}** | **{100 * n_train / max(total, 1):.4f}%** |"
  return "\n".join([head, *rows, foot]), n_train, total


def log_trainable(method: Method, variables: Variables, mask: dict) -> int:
  table, n, total = trainable_table(variables, mask)
  log.info("method %s trains %s of %s base parameters:\n%s", label(method),
           f"{n:,}", f"{total:,}", table)
  if n == 0:
    raise trains_nothing(method)
  return n


def trains_nothing(method: Method) -> MethodError:
  """The refusal of a method whose mask selects nothing, with its `untrained_hint`."""
  hint = getattr(method, "untrained_hint", Method.untrained_hint)  # duck-typed methods too
  return MethodError(f"method '{label(method)}' trains nothing: {hint}")

