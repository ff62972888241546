"""mllm_tune/configs/penalties: every penalty preset loads from the package and the thin copy
alike, fills only fields of the base config's `penalty` section and makes a penalty."""
from __future__ import annotations

import pytest

from mllm_tune import penalties
from mllm_tune.configs import base
from tests.helpers.configs import load_both, names


@pytest.mark.parametrize("name", names("penalties"))
def test_penalty_preset_fits_the_base_penalty_section(name):
  packaged, thin = load_both("penalties", name)
  assert packaged.to_dict() == thin.to_dict()
  assert set(packaged.keys()) == set(base.get_config().penalty.keys())
  assert packaged.name == {"ewc_lwf": "ewc+lwf"}.get(name, name)
  assert penalties.from_config(packaged).name == packaged.name
