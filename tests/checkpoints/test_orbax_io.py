"""`checkpoints/orbax_io.py`: what reaches the user when orbax or tensorstore fails is our
`CheckpointError` with the step and the path (the resume fallback is tested end to end in
tests/train/test_distributed.py)."""
from __future__ import annotations

import jax.numpy as jnp
import pytest

from mllm_tune.checkpoints.orbax_io import CheckpointReadError, TrainCheckpointer
from mllm_tune.checkpoints.safetensors_io import CheckpointError


def test_save_and_restore_failures_name_the_step_and_path(tmp_path, monkeypatch):
  ck = TrainCheckpointer(str(tmp_path / "ckpt"), async_save=False)
  state = {"w": jnp.ones((3,))}
  ck.save(1, state, {"pos": 0}, {"base_fingerprint": "f"})

  def broken(*args, **kwargs):
    raise OSError("tensorstore: disk full\nmore detail")
  monkeypatch.setattr(ck.manager, "save", broken)
  with pytest.raises(CheckpointError, match=r"ckpt/2: saving the checkpoint failed "
                                            r"\(OSError: tensorstore: disk full\)"):
    ck.save(2, state, {"pos": 1}, {"base_fingerprint": "f"})
  (tmp_path / "ckpt" / "1" / "meta" / "metadata").write_text("not json")
  with pytest.raises(CheckpointReadError, match=r"ckpt/1: cannot read its meta item"):
    ck.restore(1, state, "f")
  assert issubclass(CheckpointReadError, CheckpointError)
