"""Selective tuning by path: regex freezing, BitFit, LayerNorm tuning (docs/methods.md §2.1-2.3).

These methods train slices of the *base* params in place (no adapters, except BitFit's
`extra_bias` on bias-free layers), so `trainable(variables)` is the whole method: a mask built
from ordered `(regex, value)` rules `re.fullmatch`ed on logical paths (`llm/layers_3/attn/q_proj/
kernel`, see `pytree.py`), first match wins. A per-layer match on a stacked leaf becomes an
`(L, 1, ..)` bool array. Patterns that match nothing raise `pytree.SelectorError` naming the
regex and the nearest real paths.

Registry names: `freeze` (full fine-tuning is `freeze()` / `freeze(preset="full")`), `bitfit`,
`ln_tuning`. The other selective methods live beside this module in `tuning/selective/`:
`hft.py`, `spider.py`, `grad_topk.py` and `model_tailor.py`; the mask helpers they share are in
`tuning/masks.py`.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from mllm_tune.models.adapters import EXTRA_BIAS
from mllm_tune.models import build_model
from mllm_tune import pytree
from mllm_tune.tuning.api import Method, MethodError, register
from mllm_tune.tuning.masks import (ALL_LLM_LINEARS, Patterns, as_patterns, last_k_layers_regex,
                                    rules_mask, variables_mask)

# docs/methods.md §2.1: trainable regexes of the freezing presets (`llm_last_k` is built per model).
# The connector is the projector and, on anyres models (LLaVA-NeXT / OneVision), `image_newline`.
CONNECTOR = r"projector/.*|image_newline"
FREEZE_PRESETS: dict[str, tuple[str, ...]] = {
    "full": (r".*",),
    "projector": (CONNECTOR,),
    "llm": (rf"llm/layers_\d+/.*|{CONNECTOR}",),
    "llm_last_k": (),
    "vision": (r"vision/.*",),
    "attn_only": (r"llm/layers_\d+/attn/.*",),
}
# docs/methods.md §2.3: LLM norm scales; `ln_paper` adds what peft's LN_TUNING default for llava
# trains.
LLM_NORMS = r"llm/layers_\d+/(input_norm|post_attn_norm)/scale|llm/final_norm/scale"
LN_PRESETS: dict[str, tuple[str, ...]] = {
    "ln_only": (LLM_NORMS,),
    "ln_paper": (LLM_NORMS, r"projector/.*", r"llm/embed/embedding", r"llm/lm_head/kernel"),
}
# ----------------------------------------------------------------------------- freeze
@register("freeze", "selective")
@dataclasses.dataclass(frozen=True)
class Freeze(Method):
  """Regex freezing (docs/methods.md §2.1): train the leaves matching `targets` (or a `preset`),
  except those matching `frozen` (checked first). Default: everything = full fine-tuning.

  preset: full | projector | llm | llm_last_k (last `k` blocks) | vision | attn_only
  (`projector` and `llm` include `image_newline` on anyres models).
  Trainable count = sum of matched leaf sizes. Merge: the params themselves (mergeable).
  """
  default_preset: ClassVar[str] = "full"  # used when neither preset nor targets is given
  preset: str | None = None
  targets: Patterns | None = None
  frozen: Patterns = ()
  k: int = 12

  def __post_init__(self):
    if self.preset is not None and self.preset not in FREEZE_PRESETS:
      raise MethodError(f"{self.name}: unknown preset {self.preset!r}; presets: "
                        f"{sorted(FREEZE_PRESETS)}")
    if self.preset is not None and as_patterns(self.targets):
      raise MethodError(f"{self.name}: give either preset={self.preset!r} or targets, not both")

  def target_patterns(self, params: dict) -> tuple[str, ...]:
    if as_patterns(self.targets):
      return as_patterns(self.targets)
    preset = self.preset or self.default_preset
    if preset == "llm_last_k":
      return (last_k_layers_regex(params, self.k),)
    return FREEZE_PRESETS[preset]

  def params_mask(self, params: dict) -> dict:
    rules = [(p, False) for p in as_patterns(self.frozen)]
    rules += [(p, True) for p in self.target_patterns(params)]
    return rules_mask(params, rules, what=f"{self.name} target")

  def trainable(self, variables):
    return variables_mask(variables, self.params_mask(variables["params"]))


# ----------------------------------------------------------------------------- BitFit
def bias_free_linears(params: dict, targets: Patterns) -> dict[str, np.ndarray]:
  """{kernel storage path: per-layer bool flags} of matched Linear modules without a `bias`."""
  found = pytree.match_layers(params, [(p, True) for p in as_patterns(targets)], default=False,
                              what="BitFit missing-bias target", module_level=True)
  flat = pytree.flatten(params)
  out = {}
  for path, flags in found.items():
    if np.any(flags) and path[:-len("kernel")] + "bias" not in flat:
      out[path] = np.asarray(flags, bool)
  return out


@register("bitfit", "selective")
@dataclasses.dataclass(frozen=True)
class BitFit(Method):
  """BitFit (docs/methods.md §2.2): train bias leaves only (`targets`, default every `.*/bias`).

  `add_missing_bias=True` [choice] adds zero `extra_bias (d_out,)` adapters (applied by
  `layers.Linear`) to bias-free Linears matching the module regex `missing_bias_targets` (default
  all LLM block projections), so Llama-family LLMs have biases to train; zero init leaves the
  logits unchanged. Trainable count = sum of d_out over the trained biases. `merge` folds nothing
  when biases were only trained in place; with `extra_bias` leaves it refuses (the model would
  need new bias parameters): use `merge_with_model(model, variables)`.
  """
  targets: Patterns = r".*/bias"
  add_missing_bias: bool = False
  missing_bias_targets: Patterns = ALL_LLM_LINEARS

  def init(self, rng, params):
    del rng
    if not self.add_missing_bias:
      return {}
    out = {}
    for path, flags in bias_free_linears(params, self.missing_bias_targets).items():
      shape = np.shape(pytree.flatten(params)[path])
      *lead, _, d_out = shape
      out[path[:-len("kernel")] + EXTRA_BIAS] = jnp.zeros((*lead, d_out), jnp.float32)
    return pytree.unflatten(out)

  def extra_bias_mask(self, params: dict) -> dict:
    """{adapter path of each added `extra_bias`: its per-layer mask}."""
    if not self.add_missing_bias:
      return {}
    out = {}
    for path, flags in bias_free_linears(params, self.missing_bias_targets).items():
      shape = np.shape(pytree.flatten(params)[path])
      bias_shape = shape[:-2] + shape[-1:]
      out[path[:-len("kernel")] + EXTRA_BIAS] = pytree.layer_values_to_mask(
          flags.tolist(), bias_shape)
    return out

  def trainable(self, variables):
    params = variables["params"]
    extra = self.extra_bias_mask(params)
    if extra and not any(p.endswith("/bias") for p in pytree.flatten(params)):
      params_mask = pytree.unflatten({p: False for p in pytree.flatten(params)})
    else:  # the bias regexes must match something
      params_mask = rules_mask(params, [(p, True) for p in as_patterns(self.targets)],
                               what=f"{self.name} target")
    return variables_mask(variables, params_mask, extra)

  def merge(self, variables):
    if any(p.endswith(f"/{EXTRA_BIAS}") for p in pytree.flatten(variables.get("adapters", {}))):
      raise MethodError(
          "bitfit with add_missing_bias adds bias parameters the model does not have, so "
          "merge() cannot fold them into the same model; use "
          "mllm_tune.tuning.selective.by_path.merge_with_model(model, variables) -> "
          "(model, params), "
          "which also sets the config flags (Llama attention_bias / mlp_bias)")
    return variables["params"]


ATTN_QKV = ("q_proj", "k_proj", "v_proj")


def merge_with_model(model, variables: dict):
  """BitFit merge that may add biases: -> (model with bias config flags, params).

  Every `extra_bias` becomes the `bias` leaf of its Linear. The HF config must be able to hold
  the new biases (docs/methods.md §2.2): Llama's `attention_bias` covers q/k/v/o together and
  `mlp_bias`
  gate/up/down, so sibling projections get zero biases; Qwen2 (q/k/v only) and Mistral (none)
  cannot hold more and raise. Vision and projector Linears always have biases.
  """
  cfg = model.config
  llm = cfg.llm
  params = pytree.flatten(variables["params"])
  extra = {p[:-len(EXTRA_BIAS)] + "bias": jnp.asarray(x)
           for p, x in pytree.flatten(variables.get("adapters", {})).items()
           if p.endswith(f"/{EXTRA_BIAS}")}
  unexpected = sorted(p for p in extra if not p.startswith("llm/layers/"))
  if unexpected:
    raise MethodError(f"bitfit merge: extra biases outside the LLM blocks {unexpected} have no "
                      "place in a Hugging Face config")
  new_bias = lambda names: any(f"llm/layers/{g}/{n}/bias" in extra
                               for g in ("attn", "mlp") for n in names)
  want_qkv = llm.qkv_bias or new_bias(ATTN_QKV)
  want_o = llm.o_bias or new_bias(("o_proj",))
  want_mlp = llm.mlp_bias or new_bias(("gate_proj", "up_proj", "down_proj"))
  if llm.model_type == "llama":
    want_qkv = want_o = want_qkv or want_o  # one `attention_bias` flag for all four
  else:
    cannot = [n for n, new, old in (("o_proj", want_o, llm.o_bias),
                                    ("mlp", want_mlp, llm.mlp_bias),
                                    ("q/k/v_proj", want_qkv, llm.qkv_bias)) if new and not old]
    if cannot:
      raise MethodError(f"bitfit merge: a {llm.model_type} config.json cannot hold {cannot} "
                        "biases (only Llama has attention_bias / mlp_bias); keep the bitfit "
                        "adapters unmerged or restrict missing_bias_targets")
  groups = []
  if want_qkv:
    groups += [("attn", n) for n in ATTN_QKV]
  if want_o:
    groups.append(("attn", "o_proj"))
  if want_mlp:
    groups += [("mlp", n) for n in ("gate_proj", "up_proj", "down_proj")]
  for g, n in groups:
    kernel = params[f"llm/layers/{g}/{n}/kernel"]
    bias_path = f"llm/layers/{g}/{n}/bias"
    zero = jnp.zeros(kernel.shape[:1] + kernel.shape[-1:], kernel.dtype)
    params[bias_path] = (params.get(bias_path, zero) + extra.get(bias_path, 0.0)).astype(
        kernel.dtype)
  new_llm = dataclasses.replace(llm, qkv_bias=want_qkv, o_bias=want_o, mlp_bias=want_mlp)
  return build_model(dataclasses.replace(cfg, llm=new_llm)), pytree.unflatten(params)


# ----------------------------------------------------------------------------- LN tuning
@register("ln_tuning", "selective")
@dataclasses.dataclass(frozen=True)
class LNTuning(Method):
  """LayerNorm tuning (docs/methods.md §2.3, Zhao et al. 2023; peft LN_TUNING): train the LLM norm
  scales.

  preset `ln_only`: `(2L+1)·d` params (block input/post-attention norms + final norm);
  `ln_paper`: also the projector, input embeddings and LM head (peft's llava default).
  `targets` (regexes on logical leaf paths) replaces the preset when given. Merge is exact (the
  norms are trained in place). PEFT export/import: `selective_peft.py`.
  """
  preset: str = "ln_only"
  targets: Patterns = ()

  def __post_init__(self):
    if not as_patterns(self.targets) and self.preset not in LN_PRESETS:
      raise MethodError(f"{self.name}: unknown preset {self.preset!r}; presets: "
                        f"{sorted(LN_PRESETS)} (or give targets)")

  def target_patterns(self) -> tuple[str, ...]:
    return as_patterns(self.targets) or LN_PRESETS[self.preset]

  def trainable(self, variables):
    params = variables["params"]
    patterns = list(self.target_patterns())
    if not as_patterns(self.targets):  # presets: optional parts (tied lm_head) may be absent
      present = set(pytree.flatten(params))
      patterns = [p for p in patterns if p != r"llm/lm_head/kernel" or "llm/lm_head/kernel"
                  in present]
    return variables_mask(variables, rules_mask(params, [(p, True) for p in patterns],
                                                what=f"{self.name} target"))
