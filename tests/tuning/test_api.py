"""The Method contract: registry, selectors, composition, partition, bad input."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re

import jax
import numpy as np
import optax
import pytest

import mllm_tune as mt
from mllm_tune.tuning.peft import export_peft, import_peft
from mllm_tune.models import build_model, init_params
from mllm_tune.models.config import LLMConfig, LlavaConfig, VisionConfig
from mllm_tune import pytree as select
from mllm_tune.tuning.api import Method, MethodError
from mllm_tune.pytree import SelectorError


def _llava():
  cfg = LlavaConfig(
      vision=VisionConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                          image_size=28, patch_size=14),
      llm=LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3,
                    num_heads=4, num_kv_heads=2, head_dim=8), image_token_id=63)
  model = build_model(cfg)
  return model, init_params(model, jax.random.key(0))


@dataclasses.dataclass(frozen=True)
class TrainRegex(Method):
  """Test double: fully trains the leaves matching `pattern`."""
  pattern: str = "projector/.*"

  def trainable(self, variables):
    mask = super().trainable(variables)
    mask["params"] = select.bool_mask(variables["params"], self.pattern)
    return mask


def test_unknown_method_and_option_are_clear_errors():
  with pytest.raises(MethodError, match=r"unknown tuning method 'lorax'; known: .*dora.*lora"):
    mt.tuning.get("lorax")
  with pytest.raises(MethodError, match=r"method 'lora' has no option\(s\) \['rnk'\]"):
    mt.tuning.get("lora", rnk=4)


def test_regex_matching_nothing_names_it_and_lists_nearby_paths():
  model, params = _llava()
  method = mt.tuning.get("lora", targets=r"llm/layers_\d+/attn/qproj")
  with pytest.raises(SelectorError, match=r"qproj.*nearby paths: \['llm/layers_\d/attn/q_proj"):
    method.init_variables(jax.random.key(0), params)


def test_an_alternative_matching_nothing_is_warned_while_the_rest_trains(caplog):
  """`(qkv|proj)`-style alternatives: the pattern as a whole matches, so it is no error, but a
  misspelt alternative would silently leave modules untrained: warned by name."""
  model, params = _llava()
  pattern = r"vision/layers_\d+/(attn/(q|k|v|o)_proj|mlp/(fc_in|fc2))"
  with caplog.at_level(logging.WARNING, logger="mllm_tune"):
    v = mt.tuning.get("lora", targets=pattern).init_variables(jax.random.key(0), params)
  assert re.search(r"LoRA target selector .*: its alternative\(s\) 'o', 'fc_in' match no module "
                   r"path \(the rest of the pattern does\)", caplog.text)
  assert sorted(v["adapters"]["vision"]["layers"]["mlp"]) == ["fc2"]
  assert sorted(v["adapters"]["vision"]["layers"]["attn"]) == ["k_proj", "q_proj", "v_proj"]
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="mllm_tune"):
    mt.tuning.get("lora", targets=r"vision/layers_\d+/(attn/(q|k|v|out)_proj|mlp/fc(1|2))"
                  ).init_variables(jax.random.key(0), params)
  assert "match no" not in caplog.text


@pytest.mark.parametrize("pattern,dead", [
    (r"a/(b|c)/d", ["c"]),
    (r"a/(b|x/(c|d))/d", ["x/(c|d)"]),            # the outermost dead alternative only
    (r"a/(b|(?:c|e))/d", ["c"]),
    (r"a/(b|e/(d|q))", ["b", "q"]),               # each reduced with its enclosing alternative
    (r"a/[(|]?(b|c)/d", ["c"]),                   # '(' and '|' in a class are no group
    (r"a\(?/?(b|c)/d", ["c"]),                    # nor escaped ones
    (r"(?=a)(a|z)/.*", ["z"]),                    # a lookahead's own group is not split
    (r"a/b/d|z/.*", ["z/.*"]),                    # top-level alternatives
    (r"a/(b|c)?/?d", []),                         # an optional group: 'a/d' matches either way
])
def test_dead_alternatives_of_a_pattern(pattern, dead):
  assert select.dead_alternatives(pattern, ["a/b/d", "a/e/d", "a/d"]) == dead


def test_suffix_style_target_does_not_reach_the_vision_tower():
  model, params = _llava()
  with pytest.raises(SelectorError, match="q_proj"):
    mt.tuning.get("lora", targets="q_proj").init_variables(jax.random.key(0), params)
  v = mt.tuning.get("lora", targets=r"llm/.*/q_proj").init_variables(jax.random.key(0), params)
  assert "vision" not in v["adapters"] and "q_proj" in v["adapters"]["llm"]["layers"]["attn"]
  v = mt.tuning.get("lora", targets=r".*q_proj").init_variables(jax.random.key(0), params)
  assert "q_proj" in v["adapters"]["vision"]["layers"]["attn"]  # explicit opt-in only


def test_per_layer_selection_becomes_a_layer_mask():
  model, params = _llava()
  mask = select.bool_mask(params, r"llm/layers_(1|2)/mlp/.*")
  m = mask["llm"]["layers"]["mlp"]["up_proj"]["kernel"]
  assert m.shape == (3, 1, 1) and m[:, 0, 0].tolist() == [False, True, True]
  assert mask["llm"]["layers"]["attn"]["q_proj"]["kernel"] is False


def test_composition_trains_disjoint_parts_and_frozen_leaves_have_no_state():
  model, params = _llava()
  method = mt.tuning.compose(mt.tuning.get("lora", rank=2, targets=r"llm/.*/(q|v)_proj"),
                             TrainRegex("projector/.*"))
  v = method.init_variables(jax.random.key(0), params)
  mask = method.trainable(v)
  train, frozen = mt.tuning.partition(v, mask)
  assert set(select.flatten(train)) == (
      {f"adapters/llm/layers/attn/{m}/lora_{x}" for m in ("q_proj", "v_proj") for x in "ab"}
      | {f"params/projector/linear_{i}/{x}" for i in (1, 2) for x in ("kernel", "bias")})
  opt = mt.tuning.build_optimizer(method, v, mask, train, optax.adam(1e-3))
  state_paths = {"/".join(str(getattr(k, "key", k)) for k in p)
                 for p, _ in jax.tree_util.tree_flatten_with_path(opt.init(train))[0]}
  assert not any("vision" in p or "embed" in p for p in state_paths)
  assert any("projector" in p for p in state_paths)
  table, n, total = mt.tuning.trainable_table(v, mask)
  proj = sum(x.size for x in jax.tree.leaves(params["projector"]))
  assert n == proj + 3 * 2 * ((32 + 32) + (32 + 16)) and "projector/linear_1/kernel" in table


def test_overlapping_compositions_are_rejected():
  model, params = _llava()
  both = mt.tuning.compose(TrainRegex("projector/.*"), TrainRegex(r"projector/linear_1/.*"))
  v = both.init_variables(jax.random.key(0), params)
  with pytest.raises(MethodError, match=r"leaf 'params/projector/linear_1/(bias|kernel)' is "
                                        r"trained by more than one method \(TrainRegex, "
                                        r"TrainRegex\)"):
    both.trainable(v)
  twice = mt.tuning.compose(mt.tuning.get("lora", targets=r"llm/.*/q_proj"),
                            mt.tuning.get("dora", targets=r"llm/.*/q_proj"))
  with pytest.raises(MethodError, match="both add adapter leaf 'llm/layers/attn/q_proj/lora_a'"):
    twice.init_variables(jax.random.key(0), params)


def test_peft_adapter_with_other_base_shapes_and_unknown_type_are_rejected(tmp_path):
  model, params = _llava()
  method = mt.tuning.get("lora", rank=2, targets=r"llm/.*/q_proj")
  v = method.init_variables(jax.random.key(0), params)
  out = str(tmp_path / "a")
  export_peft(out, model, method, v)
  cfg2 = dataclasses.replace(model.config, llm=dataclasses.replace(model.config.llm,
                                                                   hidden_size=48, head_dim=12))
  model2 = build_model(cfg2)
  params2 = init_params(model2, jax.random.key(0))
  with pytest.raises(Exception, match=r"lora_A\.weight.*has shape \[\d+, 2\] but the base model "
                                      r"implies \[48, 2\]"):
    import_peft(out, model2, params2)
  with open(os.path.join(out, "adapter_config.json")) as f:
    cfg = json.load(f)
  cfg["peft_type"] = "OFT"
  with open(os.path.join(out, "adapter_config.json"), "w") as f:
    json.dump(cfg, f)
  with pytest.raises(MethodError, match=r"peft_type 'OFT' is not supported \(supported: .*LORA"):
    import_peft(out, model, params)


def test_methods_without_peft_counterpart_refuse_export(tmp_path):
  model, params = _llava()
  with pytest.raises(MethodError, match=r"no PEFT counterpart .* use the merged model "
                     r"\(mllm-tune export --merged\) or the native checkpoint"):
    export_peft(str(tmp_path / "x"), model, TrainRegex(), {"params": params, "adapters": {}})
  # a bottleneck adapter cannot be merged either: only the native format is offered
  adapter = mt.tuning.get("adapter")
  variables = adapter.init_variables(jax.random.key(0), params)
  with pytest.raises(MethodError, match=r"no PEFT counterpart .* use the native checkpoint "
                     r"\(mllm-tune export --native\): its modules cannot be folded"):
    export_peft(str(tmp_path / "x"), model, adapter, variables)


def test_bad_method_options_are_rejected():
  with pytest.raises(MethodError, match="rank must be >= 1"):
    mt.tuning.get("lora", rank=0)
  with pytest.raises(MethodError, match="rho must be in"):
    mt.tuning.get("lorasculpt", rho=0.0)
  assert np.isclose(mt.tuning.get("rslora", rank=16, alpha=8).scale, 2.0)


@pytest.mark.parametrize("name", ["lora", "rslora", "dora", "pissa", "vera", "lorasculpt"])
def test_method_configs_build_their_method(name):
  import importlib
  cfg = importlib.import_module(f"configs.methods.{name}").get_config()
  method = mt.tuning.from_config(cfg)
  assert method.name == name and method.rank == cfg.rank
