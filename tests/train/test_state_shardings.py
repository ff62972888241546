"""`train.sharding.state_shardings` and `train.sharding.follow`: adapter leaves follow their
base layer's sharding (the LoRA factors of the token embedding, PiSSA's initial factors, per-feature
vectors), also when the Trainer places the trainable partition alone, and optimizer states follow
their weights, so that nothing as large as a layer's factors or moments is replicated on every
device."""
from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np

import mllm_tune as mt
from mllm_tune import pytree
from mllm_tune.train import sharding
from tests.helpers.tiny_models import tiny_llava
from tests.helpers.train import ROOT
from tests.helpers.env import cpu_env

Q = "llm/layers/attn/q_proj"
DOWN = "llm/layers/mlp/down_proj"


def _specs(method, params):
  variables = method.init_variables(jax.random.key(0), params)
  mesh = sharding.make_mesh(1, 1, 1)  # one device: every named axis divides
  out = pytree.flatten(sharding.state_shardings(variables, mesh))
  placed = jax.device_put(variables, sharding.state_shardings(variables, mesh))
  for p, x in pytree.flatten(placed).items():  # the shardings fit the leaves
    np.testing.assert_array_equal(np.asarray(x), np.asarray(pytree.flatten(variables)[p]))
  return {p[len("adapters/"):]: tuple(s.spec) for p, s in out.items()
          if p.startswith("adapters/")}


def test_adapter_leaves_take_their_base_layers_axes():
  _, params, _ = tiny_llava("qwen2")  # q_proj has a bias
  # the rules: q_proj (L, d_in, d_out) over (-, fsdp, tensor), down_proj (-, tensor, fsdp),
  # the token embedding (V, D) over (tensor, fsdp)
  specs = _specs(mt.tuning.get("lora", rank=2, targets=r"llm/(embed|layers_\d+/attn/q_proj)",
                               lora_bias=False), params)
  assert specs["llm/embed/lora_a"] == ("tensor", None)      # (V, r): the vocabulary axis
  assert specs["llm/embed/lora_b"] == (None, "fsdp")        # (r, D)
  assert specs[f"{Q}/lora_a"] == (None, "fsdp", None)
  assert specs[f"{Q}/lora_b"] == (None, None, "tensor")
  assert not any(specs[f"{Q}/lora_scale"])  # per-layer scales stay replicated
  specs = _specs(mt.tuning.get("lora", rank=2, targets=r"llm/layers_\d+/attn/q_proj",
                               lora_bias=True), params)
  assert specs[f"{Q}/lora_bias"] == (None, "tensor")
  specs = _specs(mt.tuning.get("dora", rank=2, targets=r"llm/layers_\d+/attn/q_proj"), params)
  assert specs[f"{Q}/dora_m"] == (None, "tensor")
  specs = _specs(mt.tuning.get("pissa", rank=2, targets=r"llm/layers_\d+/attn/q_proj"), params)
  assert specs[f"{Q}/pissa_a0"] == (None, "fsdp", None)
  assert specs[f"{Q}/pissa_b0"] == (None, None, "tensor")
  specs = _specs(mt.tuning.get("ia3"), params)
  assert specs[f"{DOWN}/ia3_in"] == (None, "tensor")        # (L, d_in = the MLP width)
  assert specs["llm/layers/attn/k_proj/ia3_out"] == (None, "tensor")


SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, sys.argv[1])
import mllm_tune as mt
from mllm_tune import pytree
from mllm_tune.train import sharding
from tests.helpers.tiny_models import tiny_llava
model, params, batch = tiny_llava("qwen2")
out = {}
for name, method in {
    "lora": mt.tuning.get("lora", rank=2, targets=r"llm/(embed|layers_\d+/attn/q_proj)"),
    "dora": mt.tuning.get("dora", rank=2, targets=r"llm/layers_\d+/attn/(q|v)_proj")}.items():
  v = method.init_variables(jax.random.key(0), params)
  v["adapters"] = jax.tree.map(lambda x: x + 0.1, v["adapters"])  # every factor non-zero

  def loss(a, v=v):
    logits = model.apply({**v, "adapters": a}, batch["input_ids"],
                         pixel_values=batch["pixel_values"])
    return jnp.mean(jnp.sin(logits))
  f = jax.jit(jax.value_and_grad(loss))
  l1, g1 = f(v["adapters"])
  mesh = sharding.make_mesh(1, 2, 2)
  with sharding.mesh_context(mesh):
    vs = jax.device_put(v, sharding.state_shardings(v, mesh))
    l2, g2 = f(vs["adapters"])
  flat1, flat2 = pytree.flatten(g1), pytree.flatten(g2)
  out[name] = dict(loss=[float(l1), float(l2)], grad=max(
      float(np.abs(np.asarray(flat1[p]) - np.asarray(flat2[p])).max()
            / max(np.abs(np.asarray(flat1[p])).max(), 1e-12)) for p in flat1),
      sharded=sorted(p for p, x in pytree.flatten(vs["adapters"]).items()
                     if x.addressable_shards[0].data.shape != x.shape))
# the Trainer on this mesh: trainable adapters and their AdamW moments split like the base
from mllm_tune.train.loop import Trainer
from mllm_tune.train.synthetic import SyntheticBatches
from tests.helpers.train import tiny_cfg
cfg = tiny_cfg(sys.argv[2], method="lora", steps=1)
cfg.mesh.update(dict(fsdp=2, tensor=2))
tr = Trainer(cfg, SyntheticBatches(8, 16, 128), progress=False)
b = tr.state.trainable["adapters"]["llm"]["layers"]["attn"]["q_proj"]["lora_b"]
moments = [x for x in jax.tree.leaves(tr.state.opt_state) if x.shape == b.shape]
out["trainer"] = [list(b.shape)] + [list(x.addressable_shards[0].data.shape)
                                    for x in [b] + moments]
print("RESULT" + json.dumps(out))
"""


def test_sharded_adapters_give_the_one_device_loss_and_gradients(tmp_path):
  """On 4 devices (fsdp 2 x tensor 2) the sharded embedding LoRA and DoRA magnitudes give the
  one-device loss and adapter gradients; the Trainer splits a trainable B and its AdamW moments
  over `tensor` as its base kernel's output."""
  res = subprocess.run([sys.executable, "-c", SCRIPT, ROOT, str(tmp_path / "run")], cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env=cpu_env(4))
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.split("RESULT")[1])
  for name in ("lora", "dora"):
    o = out[name]
    np.testing.assert_allclose(o["loss"][1], o["loss"][0], rtol=1e-5, err_msg=name)
    assert o["grad"] < 1e-5, (name, o["grad"])
  assert "llm/embed/lora_a" in out["lora"]["sharded"]
  assert "llm/layers/attn/v_proj/dora_m" in out["dora"]["sharded"]
  (l, r, d), *shards = out["trainer"]
  # B and its mu, nu (and those of any other leaf of its shape)
  assert len(shards) >= 3 and all(s == [l, r, d // 2] for s in shards), out["trainer"]


def test_the_trainer_places_its_trainable_adapters_like_their_frozen_base_layers(tmp_path):
  """The Trainer places the trainable partition alone; its adapters still find their (frozen)
  base layers' specs (the optimizer state on several devices: the subprocess test above)."""
  from mllm_tune.train.loop import Trainer
  from mllm_tune.train.synthetic import SyntheticBatches
  from tests.helpers.train import tiny_cfg
  tr = Trainer(tiny_cfg(str(tmp_path / "run"), method="lora", steps=1),
               SyntheticBatches(8, 16, 128), progress=False)
  specs = {p: tuple(x.sharding.spec) for p, x in pytree.flatten(tr.state.trainable).items()}
  assert specs["adapters/" + Q + "/lora_a"] == (None, "fsdp", None)
  assert specs["adapters/" + Q + "/lora_b"] == (None, None, "tensor")
  assert specs["adapters/" + DOWN + "/lora_a"] == (None, "tensor", None)

