"""Sharded load onto 8 forced CPU devices (FSDP x tensor mesh) gives the same logits."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.helpers import ROOT, hf_tiny
from tests.helpers.env import cpu_env

SCRIPT = textwrap.dedent("""
    import os, sys
    import numpy as np, jax
    assert jax.device_count() == 8, jax.devices()
    import mllm_tune as mt
    from mllm_tune.train.sharding import make_mesh, sharding_fn
    d = sys.argv[1]
    model, ref_params = mt.load_pretrained(d)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    model2, params = mt.load_pretrained(d, sharding_fn=sharding_fn(mesh))
    q = params["llm"]["layers"]["attn"]["q_proj"]["kernel"]
    assert tuple(q.sharding.spec) == (None, "fsdp", "tensor"), q.sharding
    assert len({tuple((s.start, s.stop) for s in sh.index) for sh in q.addressable_shards}) == 4
    emb = params["llm"]["embed"]["embedding"]
    assert tuple(emb.sharding.spec) == ("tensor", "fsdp"), emb.sharding
    for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids = np.array([[1, 5] + [99] * 4 + [7, 8], [0, 0, 1, 3, 4, 6, 11, 12]])
    mask = (np.arange(8)[None] >= np.array([[0], [2]])).astype(np.int32)
    ids, mask = np.concatenate([ids, ids[::-1]]), np.concatenate([mask, mask[::-1]])
    px = np.random.RandomState(0).randn(2, 28, 28, 3).astype(np.float32)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    ids_s, mask_s = jax.device_put(ids, batch_sharding), jax.device_put(mask, batch_sharding)
    fwd = jax.jit(lambda p, i, m, x: model2.apply({"params": p}, i, m, pixel_values=x))
    sharded = np.asarray(fwd(params, ids_s, mask_s, px))
    single = np.asarray(model.apply({"params": ref_params}, ids, mask, pixel_values=px))
    np.testing.assert_allclose(sharded, single, atol=1e-5)
    print("SHARDED_OK")
""")


def test_fsdp_tensor_sharded_load_gives_same_logits(tmp_path):
  d = str(tmp_path / "hf")
  hf_tiny.clip_llama().save_pretrained(d, max_shard_size="40KB")
  env = cpu_env(8)
  res = subprocess.run([sys.executable, "-c", SCRIPT, d], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stdout + res.stderr
  assert "SHARDED_OK" in res.stdout
