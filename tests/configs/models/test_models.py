"""mllm_tune/configs/models: every model section loads from the package and the thin copy alike
and holds only fields of the base config's `model` section."""
from __future__ import annotations

import pytest

from mllm_tune.configs import base
from tests.helpers.configs import load_both, names


@pytest.mark.parametrize("name", names("models"))
def test_model_section_fits_the_base_model_section(name):
  packaged, thin = load_both("models", name)
  assert packaged.to_dict() == thin.to_dict()
  assert set(packaged.keys()) <= set(base.get_config().model.keys())
  assert packaged.source in ("hf", "native", "tiny", "bench")
