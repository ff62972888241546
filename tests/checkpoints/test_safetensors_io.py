"""safetensors writer: 0-d tensors keep shape () (np.ascontiguousarray made them (1,)), and the
file reads back in our reader and in the `safetensors` package."""
from __future__ import annotations

import ml_dtypes
import numpy as np
from safetensors.numpy import load_file

from mllm_tune.checkpoints.safetensors_io import SafetensorsFile, write_safetensors


def test_zero_dim_tensor_round_trips(tmp_path):
  path = str(tmp_path / "t.safetensors")
  tensors = {"scalar": np.float32(2.5), "bf16_scalar": np.asarray(1.5, ml_dtypes.bfloat16),
             "matrix_T": np.arange(6, dtype=np.float32).reshape(2, 3).T,  # not C-contiguous
             "empty": np.zeros((0, 4), np.int32)}
  specs = [(k, np.shape(v), np.asarray(v).dtype, lambda v=v: v) for k, v in tensors.items()]
  write_safetensors(path, specs)
  ours = SafetensorsFile(path)
  for k, v in tensors.items():
    assert ours.info(k)[0] == np.shape(v), k
    np.testing.assert_array_equal(ours.get(k), np.asarray(v), err_msg=k)
  ref = load_file(path)  # the reference reader (bf16 is not numpy-native there: skip it)
  assert ref["scalar"].shape == () and float(ref["scalar"]) == 2.5
  np.testing.assert_array_equal(ref["matrix_T"], tensors["matrix_T"])
  assert ref["empty"].shape == (0, 4)
