"""mllm_tune/configs/data: every data section loads from the package and the thin copy alike
and names only fields the data loader knows."""
from __future__ import annotations

import pytest

from mllm_tune.data.loader import DEFAULTS
from tests.helpers.configs import load_both, names


@pytest.mark.parametrize("name", names("data"))
def test_data_section_names_only_loader_fields(name):
  packaged, thin = load_both("data", name)
  assert packaged.to_dict() == thin.to_dict()
  assert set(packaged.keys()) <= set(DEFAULTS)
