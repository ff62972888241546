"""mllm_tune/configs/methods: every method config loads from the package and from the thin copy
(`configs/methods/`) alike, and the tuning methods among them build."""
from __future__ import annotations

import pytest

from mllm_tune import tuning
from tests.helpers.configs import load_both, names


@pytest.mark.parametrize("name", names("methods"))
def test_method_config_is_the_same_from_the_package_and_the_thin_copy(name):
  packaged, thin = load_both("methods", name)
  assert packaged.to_dict() == thin.to_dict()
  if packaged.get("name") in tuning.names():
    assert tuning.from_config(packaged).name == packaged.name
