"""mllm_tune/configs/experiments: every experiment loads from the package and the thin copy
alike, passes `validate`, and its sections hold only fields of the base config."""
from __future__ import annotations

import pytest

from mllm_tune.configs import base
from mllm_tune.train.config_io import validate
from tests.helpers.configs import load_both, names


@pytest.mark.parametrize("name", names("experiments"))
def test_experiment_validates(name):
  packaged, thin = load_both("experiments", name)
  assert packaged.to_dict() == thin.to_dict()
  validate(packaged)
  ref = base.get_config()
  for section in ("train", "optimizer", "eval", "mesh", "posthoc"):
    assert set(packaged[section].keys()) <= set(ref[section].keys()), section
