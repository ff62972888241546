"""PEFT's `target_parameters` LoRA on a mixture-of-experts stack against our per-expert
factors: peft's own `ParamWrapper.get_delta_weight` (float64) equals `s A_e B_e` of the factors
`experts.from_peft` reads (transposed to transformers' (E, out, in)), `to_peft` inverts it, and
the key nesting of one and of two wrapped parameters is the one `tensor_module` predicts."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

from mllm_tune.tuning.api import MethodError
from mllm_tune.tuning.peft import experts

E, D, F, R = 3, 5, 4, 2


class Experts(torch.nn.Module):
  """transformers' layout (Qwen3VLMoeTextExperts): gate_up (E, 2F, D), down (E, D, F)."""

  def __init__(self):
    super().__init__()
    self.gate_up_proj = torch.nn.Parameter(torch.zeros(E, 2 * F, D, dtype=torch.float64))
    self.down_proj = torch.nn.Parameter(torch.zeros(E, D, F, dtype=torch.float64))


class Block(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.experts = Experts()


def _peft(targets: list[str]):
  model = inject_adapter_in_model(
      LoraConfig(r=R, lora_alpha=3 * R, target_parameters=targets), Block())
  torch.manual_seed(0)
  with torch.no_grad():
    for n, p in model.named_parameters():
      if "lora_" in n:
        p.normal_()
  return model


@pytest.mark.parametrize("targets", [["experts.gate_up_proj"],
                                     ["experts.gate_up_proj", "experts.down_proj"]])
def test_factors_and_key_nesting_match_peft(targets):
  model = _peft(targets)
  state = {k: v.numpy() for k, v in get_peft_model_state_dict(model).items()}
  targeted = set(targets)
  wrapper = model.experts
  for name in ("experts.down_proj", "experts.gate_up_proj"):
    if name not in targeted:
      continue
    module = experts.tensor_module(name, targeted)
    while wrapper.parameter_name != name.rsplit(".", 1)[1]:
      wrapper = wrapper.base_layer  # the outer wrapper holds the later parameter
    lora_a, lora_b = state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"]
    a, b = experts.from_peft(lora_a, lora_b, E)
    with torch.no_grad():
      want = wrapper.get_delta_weight("default").numpy()       # (E, out, in)
    np.testing.assert_allclose(3.0 * np.einsum("eir,ero->eoi", a, b), want, atol=1e-12)
    back_a, back_b = experts.to_peft(a, b)
    np.testing.assert_array_equal(back_a, lora_a)
    np.testing.assert_array_equal(back_b, lora_b)
  assert len(state) == 2 * len(targets)
  nested = {experts.tensor_module(n, targeted) for n in targeted}
  assert {k.rsplit(".lora_", 1)[0] for k in state} == nested
  if len(targets) == 2:
    assert nested == {"experts", "experts.base_layer"}


def test_target_parameters_that_match_nothing_are_refused():
  with pytest.raises(MethodError, match="x.json: target_parameters \\['mlp.experts.up'\\] match "
                     "no mixture-of-experts parameter"):
    experts.wrapped_modules({"target_parameters": ["mlp.experts.up"]},
                            ["m.layers.0.mlp.experts.gate_up_proj"], "x.json")
  assert experts.wrapped_modules({"target_parameters": ["down_proj"]},
                                 ["m.0.experts.gate_up_proj", "m.0.experts.down_proj"], "x") == {
      "m.0.experts": "m.0.experts.down_proj"}
