"""Expert parallelism (`mesh.expert`, `models/moe.routed_experts_sharded`) on 4 forced CPU
devices: a tiny Qwen3-VL-MoE whose expert stacks (and per-expert LoRA factors) are split by
expert gives the one-device logits and gradients on a packed batch (beside FSDP or tensor
parallelism) and generates the same tokens from a one-row prompt (rows that do not split over
the batch axes); the dispatch alone gives the one-device gradients with rows split or not (beside
FSDP or data parallelism), and with a capacity factor drops exactly the pairs past their
expert's capacity in each dispatch group (values, gradients and the count against a one-device
reference that routes those pairs with weight 0) in less compiled memory; and
`mllm-tune train` with `mesh.expert=2` reproduces the one-device loss curve of LoRA on the
experts with EWC (its per-sample Fisher vmaps through the sharded dispatch), logs the dropped
share, and refuses an expert axis that does not divide the experts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from tests.helpers import qwen_vl_tiny as qt
from tests.helpers.data import sized_records, write_llava_dataset
from tests.helpers.train import ROOT, lora_train_args, losses, run_cli
from tests.helpers.env import cpu_env

SCRIPT = """
import json, math, pathlib, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, sys.argv[2])
import mllm_tune as mt
from mllm_tune import pytree
from mllm_tune.data.loader import make_batches
from mllm_tune.losses.router import dropped_pairs
from mllm_tune.train import setup, sharding
from tests.helpers import qwen_vl_tiny as qt
from tests.helpers.data import packed_cfg, sized_records, write_llava_dataset
assert jax.device_count() == 4
root = pathlib.Path(sys.argv[1])
d, _, _ = qt.model_dir(str(root), "qwen3_vl_moe")
model, params = mt.load_pretrained(d)
records, images = sized_records()
path = write_llava_dataset(str(root / "data"), records, images)
batch = next(make_batches(packed_cfg(path, str(root / "data" / "images"), batch_size=4), d,
                          model.config))
EXPERTS = r"llm/layers_\\d+/mlp/experts_(gate_up|down)"
lora = lambda **kw: mt.tuning.get("lora", rank=2, targets=EXPERTS, **kw)
variables = lora().init_variables(jax.random.key(0), params)
# B factors away from zero, so that the expert LoRA changes the logits and has gradients
variables["adapters"] = jax.tree_util.tree_map_with_path(
    lambda p, x: x + 0.05 * jax.random.normal(jax.random.key(len(str(p))), x.shape)
    if "lora_b" in str(p) else x, variables["adapters"])

def loss(v, b):
  logits = model.apply(v, b["input_ids"], **mt.models.model_kwargs(b))
  return jnp.mean(jnp.sin(logits) * (b["loss_mask"][..., None] > 0)), logits

(l1, logits1), g1 = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables, batch)
flat1 = pytree.flatten(g1)
out = {"grads": sorted(flat1)}
MESHES = {"fsdp2_expert2": (1, 2, 1, 2), "expert2_tensor2": (1, 1, 2, 2)}
for name, (data, fsdp, tensor, expert) in MESHES.items():
  mesh = sharding.make_mesh(data, fsdp, tensor, expert=expert)
  with sharding.mesh_context(mesh):
    v = jax.device_put(variables, sharding.state_shardings(variables, mesh))
    b, _ = setup.place_batch(batch, setup.batch_sharding(mesh, 1), model.config)
    (l2, logits2), g2 = jax.jit(jax.value_and_grad(loss, has_aux=True))(v, b)
    jaxpr = str(jax.make_jaxpr(lambda v, b: loss(v, b)[0])(v, b))
  flat2 = pytree.flatten(g2)
  mlp = pytree.flatten(v)
  out[name] = dict(
      logits=float(np.abs(np.asarray(logits1) - np.asarray(logits2)).max()),
      scale=float(np.abs(np.asarray(logits1)).max()), loss=[float(l1), float(l2)],
      grad_rel={p: float(np.abs(np.asarray(g) - np.asarray(flat2[p])).max()
                         / np.abs(np.asarray(g)).max()) for p, g in flat1.items()},
      shard_map="shard_map" in jaxpr,
      shards={p: [list(x.shape), list(x.addressable_shards[0].data.shape)]
              for p, x in mlp.items() if "experts_" in p and "scale" not in p})
# decoding one row: one token per step, rows that do not split over the batch axes
mesh = sharding.make_mesh(1, 2, 1, expert=2)
prompt = jnp.asarray(batch["input_ids"][:1, :24])
gen = lambda p, a: np.asarray(mt.generate(model, p, prompt, max_new_tokens=6, adapters=a)).tolist()
out["generate_one"] = gen(variables["params"], variables["adapters"])
with sharding.mesh_context(mesh):
  v = jax.device_put(variables, sharding.state_shardings(variables, mesh))
  out["generate_ep"] = gen(v["params"], v["adapters"])
  # LoRA dropout on the experts: one mask per token shard, finite, and it changes the loss
  dv = lora(dropout=0.5).init_variables(jax.random.key(0), params)
  drop = pytree.flatten(dv)
  both = pytree.unflatten({**pytree.flatten(variables), **{p: x for p, x in drop.items()
                                                          if "lora_dropout" in p}})
  out["dropout_leaves"] = sum("lora_dropout" in p for p in drop)
  both = jax.device_put(both, sharding.state_shardings(both, mesh))
  b, _ = setup.place_batch(batch, setup.batch_sharding(mesh, 1), model.config)
  f = jax.jit(lambda v, b, k: jnp.mean(model.apply(v, b["input_ids"], rngs={"dropout": k},
                                                   **mt.models.model_kwargs(b))))
  out["dropout_means"] = [float(f(both, b, jax.random.key(s))) for s in (1, 2)]
  # with a capacity factor the padding tokens are not routed: the sown pair count is the
  # real tokens' (k = 2 per token and layer)
  cm = mt.models.build_model(mt.models.config.with_runtime(model.config,
                                                           moe_capacity_factor=1.0))
  _, st = jax.jit(lambda v, b: cm.apply(v, b["input_ids"], mutable=["moe_stats"],
                                        **mt.models.model_kwargs(b)))(v, b)
  out["moe_pairs"] = float(dropped_pairs(st["moe_stats"])[1])
  out["real_tokens"] = [int(np.asarray(batch["attention_mask"]).sum()),
                        int(np.asarray(batch["input_ids"]).size),
                        model.config.llm.num_layers]
# the dispatch alone, rows split (16) and on every device (3, which no shard count divides):
# gradients of the rows, router logits, both stacks and the LoRA factors and scale
from mllm_tune.models import moe
r = np.random.default_rng(0)
arr = lambda *s: (r.normal(size=s) * 0.3).astype(np.float32)  # numpy: no eager jax ops below
x, logit, gu, dn = arr(16, 8), arr(16, 4), arr(4, 8, 12), arr(4, 6, 8)
la = moe.ExpertLora(arr(4, 8, 3), arr(4, 3, 12), jnp.asarray(0.5))
def f(x, logit, gu, dn, la, sharded, keep=None, factor=0.0, valid=None):
  w, i = moe.route(logit, 2)
  if sharded:
    y, dropped = moe.routed_experts_sharded(moe.expert_mesh(), x, w, i, gu, dn, "silu", la,
                                            capacity_factor=factor, valid_N=valid)
  else:  # the reference drops a pair by giving it routing weight 0
    y, dropped = moe.routed_experts(x, w if keep is None else w * keep, i, gu, dn, "silu",
                                    la), 0
  return jnp.sum(jnp.sin(y)), dropped
g = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True), static_argnums=(5, 7))
def kept(logit, group, cap, valid):
  # (N, 2) float: pair (n, j) of a real row is kept when fewer than `cap` earlier pairs of real
  # rows of its dispatch group (`group` consecutive rows) chose its expert (GShard's expert
  # capacity), in NumPy; padding rows keep nothing and take no capacity
  idx = np.argsort(-logit, axis=1, kind="stable")[:, :2]
  keep = np.zeros(idx.shape, np.float32)
  for start in range(0, len(idx), group):
    seen = {}
    for n in [n for n in range(start, min(start + group, len(idx))) if valid[n]]:
      for j in range(2):
        e = int(idx[n, j])
        keep[n, j] = seen.get(e, 0) < cap
        seen[e] = seen.get(e, 0) + 1
  return keep
rel = lambda ref, got: max(float(np.abs(np.asarray(a) - np.asarray(b)).max()
                                 / max(np.abs(np.asarray(a)).max(), 1e-30))
                           for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)))
out["dispatch"], out["capacity"] = {}, {}
for n in (16, 3):
  ref = g(x[:n], logit[:n], gu, dn, la, False)
  for shape in ((1, 2, 1, 2), (2, 1, 1, 2), (1, 1, 1, 4)):
    mesh = sharding.make_mesh(*shape[:3], expert=shape[3])
    with sharding.mesh_context(mesh):
      got = g(x[:n], logit[:n], gu, dn, la, True)
      out["dispatch"][f"{n} {shape}"] = rel(ref, got)
      # capacity factor 0.5: each expert keeps ceil(0.5 * G * 2 / 4) pairs of a group of G
      # rows (the expert group's rows when they split, else all rows), padding rows included
      # in G (the capacity is computed from the group's row count)
      group = n // math.prod(shape[:2]) if n == 16 else n
      cap = math.ceil(0.5 * group * 2 / 4)
      valid = np.arange(n) % 5 != 2  # rows 2, 7, 12 are padding: not routed
      keep = kept(logit[:n], group, cap, valid)
      (val, dropped), grads = g(x[:n], logit[:n], gu, dn, la, True, None, 0.5, valid)
      (rval, _), rgrads = g(x[:n], logit[:n], gu, dn, la, False, jnp.asarray(keep))
    out["capacity"][f"{n} {shape}"] = dict(
        err=rel((rval, rgrads), (val, grads)), dropped=int(dropped),
        want=int((keep[valid] == 0).sum()), group=group, cap=cap)
# the capacity bounds each device's pair buffer: compiled temporary memory of the sharded
# forward + backward, 64 rows of width 8 through experts of width 64 (the pair rows dominate)
xm, lm = arr(64, 8), arr(64, 4)
gm, dm = arr(4, 8, 128), arr(4, 64, 8)
mesh = sharding.make_mesh(1, 1, 1, expert=4)
with sharding.mesh_context(mesh):
  out["temp_bytes"] = {
      str(c): g.lower(xm, lm, gm, dm, None, True, None, c).compile().memory_analysis()
      .temp_size_in_bytes for c in (0.0, 1.0)}
print("RESULT" + json.dumps(out))
"""


def test_expert_parallel_logits_gradients_and_decoding_equal_one_device(tmp_path):
  res = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), ROOT], cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env=cpu_env(4))
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.split("RESULT")[1])
  # every base weight and both experts' LoRA factors have gradients
  assert "params/llm/layers/mlp/experts_down" in out["grads"]
  assert "adapters/llm/layers/mlp/experts_gate_up/lora_a" in out["grads"]
  for name in ("fsdp2_expert2", "expert2_tensor2"):
    o = out[name]
    assert o["shard_map"], name  # the sharded dispatch ran
    assert o["logits"] < 1e-5 * max(1.0, o["scale"]), (name, o["logits"])
    np.testing.assert_allclose(o["loss"][1], o["loss"][0], rtol=1e-5)
    worst = max(o["grad_rel"], key=o["grad_rel"].get)
    assert o["grad_rel"][worst] < 1e-4, (name, worst, o["grad_rel"][worst])
    # each device holds half of the 6 experts (and of their LoRA factors)
    for path, (shape, shard) in o["shards"].items():
      assert shard[1] == shape[1] // 2 == 3, (name, path, shape, shard)
  assert out["fsdp2_expert2"]["shards"]["params/llm/layers/mlp/experts_gate_up"][1][2] == 16
  assert out["generate_ep"] == out["generate_one"]
  assert len(out["dispatch"]) == 6 and max(out["dispatch"].values()) < 1e-5, out["dispatch"]
  # a capacity factor drops exactly the pairs past their expert's capacity in each dispatch
  # group (the reference routes them with weight 0), padding rows route nothing and take no
  # capacity: same values and gradients, and the count
  for name, c in out["capacity"].items():
    assert c["err"] < 1e-5 and c["dropped"] == c["want"], (name, c)
  assert min(c["want"] for c in out["capacity"].values()) > 0  # every case dropped some
  assert {c["group"] for c in out["capacity"].values()} == {8, 16, 3}
  # 4 experts on 4 devices, 64 rows: the dropless buffer holds all 128 pairs per device, a
  # factor of 1 holds 32
  t = out["temp_bytes"]
  assert t["1.0"] < 0.6 * t["0.0"], t
  assert out["dropout_leaves"] == 2
  real, slots, layers = out["real_tokens"]
  assert real < slots and out["moe_pairs"] == real * 2 * layers, out  # padding: no pairs
  a, b = out["dropout_means"]
  assert np.isfinite(a) and np.isfinite(b) and a != b  # the dropout key reaches the experts


def test_expert_mesh_needs_experts_it_divides():
  from mllm_tune.train.setup import ConfigValueError, check_expert_mesh
  mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 1, "expert": 4, "tensor": 1})
  moe = types.SimpleNamespace(llm=types.SimpleNamespace(num_experts=6))
  with pytest.raises(ConfigValueError, match="mesh.expert' = 4: the model's 6 experts do not"):
    check_expert_mesh(moe, mesh)
  dense = types.SimpleNamespace(llm=types.SimpleNamespace(num_experts=0))
  with pytest.raises(ConfigValueError, match="no mixture-of-experts layers"):
    check_expert_mesh(dense, mesh)
  check_expert_mesh(types.SimpleNamespace(llm=types.SimpleNamespace(num_experts=8)), mesh)
  check_expert_mesh(dense, types.SimpleNamespace(shape={"expert": 1}))


def test_train_with_expert_parallelism_gives_the_one_device_loss_curve(tmp_path):
  """LoRA on attention and per expert, EWC on its per-sample Fisher; `image_groups=1` so that
  both runs see the same packed batches."""
  d, _, _ = qt.model_dir(str(tmp_path), "qwen3_vl_moe")
  records, images = sized_records(16, seed=2)
  write_llava_dataset(str(tmp_path / "data"), records, images)
  extra = ("--config.data.max_pixels=12288", "--config.data.image_groups=1",
           r"--config.method.targets=llm/layers_\d+/(attn/(q|v)_proj|mlp/experts_(gate_up|down))",
           "--config.method.dropout=0.0", "--config.penalty.name=ewc",
           "--config.penalty.weight=10.0", "--config.penalty.fisher_samples=8",
           "--config.penalty.fisher_chunk=2")
  curves = {}
  # capacity factor 3 with 6 experts and top-2: each expert may keep all of its group's rows,
  # so nothing can drop and the curve stays the one-device one; the dropped share is logged
  ep = ("--config.mesh.fsdp=2", "--config.mesh.expert=2", "--config.model.moe_capacity_factor=3")
  for name, devices, mesh in [("one", 1, ()), ("ep", 4, ep)]:
    run = str(tmp_path / name)
    res = run_cli(lora_train_args(d, str(tmp_path / "data"), run, 3, 4, *extra, *mesh),
                  devices=devices)
    assert res.returncode == 0, res.stderr[-3000:]
    curves[name] = [losses(run)[s] for s in (1, 2, 3)]
    with open(os.path.join(run, "metrics.jsonl")) as f:
      dropped = [json.loads(line).get("moe_dropped") for line in f]
    assert dropped == ([0.0] * 3 if name == "ep" else [None] * 3), dropped
    # the sharded dispatch ran (and said so once per row count), only with mesh.expert=2
    said = "mixture of experts: 6 experts over the 2 devices of mesh axis 'expert'"
    assert (said in res.stderr) == (name == "ep"), res.stderr[-2000:]
  np.testing.assert_allclose(curves["ep"], curves["one"], rtol=2e-5)
  assert len(set(curves["one"])) == 3  # the steps (and the EWC term) moved the loss
  # 6 experts on mesh.expert=4: refused before the weights load, naming the config key
  res = run_cli(lora_train_args(d, str(tmp_path / "data"), str(tmp_path / "bad"), 1, 4,
                                "--config.mesh.fsdp=1", "--config.mesh.expert=4"), devices=4)
  assert res.returncode != 0
  assert "mesh.expert' = 4: the model's 6 experts do not split into 4 equal groups" in res.stderr


def test_capacity_factor_needs_expert_parallelism():
  """A capacity factor bounds the expert-parallel dispatch: without mesh.expert > 1 it would do
  nothing, so it is refused naming the key; a negative one is refused by the config check."""
  from mllm_tune.models.llm_config import ConfigError, LLMConfig
  from mllm_tune.train.config_io import validate
  from mllm_tune.train.setup import ConfigValueError, check_expert_mesh
  from mllm_tune.configs.base import get_config
  moe = types.SimpleNamespace(llm=types.SimpleNamespace(num_experts=8))
  one = types.SimpleNamespace(shape={"data": 2, "fsdp": 1, "expert": 1, "tensor": 1})
  with pytest.raises(ConfigValueError, match="'model.moe_capacity_factor' = 1.25: it bounds "
                     "the buffer of expert parallelism's dispatch"):
    check_expert_mesh(moe, one, 1.25)
  check_expert_mesh(moe, types.SimpleNamespace(shape={"expert": 2}), 1.25)
  cfg = get_config()
  cfg.model.moe_capacity_factor = -1.0
  with pytest.raises(ValueError, match="model.moe_capacity_factor"):
    validate(cfg)
  small = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1,
               num_kv_heads=1, head_dim=8)
  with pytest.raises(ConfigError, match="moe_capacity_factor must be a number >= 0"):
    LLMConfig(**small, moe_capacity_factor=float("nan"))
  # a base saved by a run with a factor carries it in its config: the run's own model section
  # (no factor: 0) sets it back
  import ml_collections
  from mllm_tune.models.config import CausalLMConfig, with_runtime
  from mllm_tune.train.setup import _runtime
  saved = CausalLMConfig(llm=LLMConfig(**small, moe_capacity_factor=1.25))
  section = ml_collections.ConfigDict(dict(attention_impl="auto"))
  assert with_runtime(saved, **_runtime(section)).llm.moe_capacity_factor == 0.0


def test_foreign_pairs_never_read_rows_past_the_groups(monkeypatch):
  """With expert ids held elsewhere (`foreign=True`), the grouped products' rows past the groups
  are masked in and out: a backend that leaves NaN there changes neither the output nor any
  gradient (rows, routing logits, both stacks, the LoRA factors and scale)."""
  import jax
  import jax.numpy as jnp
  from mllm_tune.models import grouped_matmul, moe
  r = np.random.default_rng(1)
  arr = lambda *s: jnp.asarray(r.normal(size=s) * 0.3, jnp.float32)
  x, logit, gu, dn = arr(12, 8), arr(12, 4), arr(2, 8, 12), arr(2, 6, 8)
  lora = moe.ExpertLora(arr(2, 8, 3), arr(2, 3, 12), jnp.asarray(0.5))

  def f(x, logit, gu, dn, lora):
    w, i = moe.route(logit, 2)  # 4 experts, this device holds 2 and 3: ids 0, 1 are foreign
    return jnp.sum(jnp.sin(moe.routed_experts(x, w, i - 2, gu, dn, "silu", lora, foreign=True)))

  grads = jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4))
  clean = jax.tree.leaves(grads(x, logit, gu, dn, lora))
  real = grouped_matmul._rows_times_experts.__call__

  def poisoned(x_MD, w_EDF, sizes_E):
    y = real(x_MD, w_EDF, sizes_E)
    return jnp.where((jnp.arange(y.shape[0]) < jnp.sum(sizes_E))[:, None], y, jnp.nan)

  monkeypatch.setattr(grouped_matmul, "_rows_times_experts", poisoned)
  dirty = jax.tree.leaves(grads(x, logit, gu, dn, lora))
  assert len(clean) == len(dirty) == 8  # the value, 4 inputs, 3 LoRA leaves
  for a, b in zip(clean, dirty):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_model_sections_without_a_loadable_source_are_refused_before_anything_loads():
  """`setup.read_model_config` (what the expert-mesh check reads) and `load_model` share the
  source checks."""
  import ml_collections
  from mllm_tune.train.setup import ConfigValueError, load_model, read_model_config
  for fn in (read_model_config, load_model):
    with pytest.raises(ConfigValueError, match="model.source must be 'hf', 'native' or 'tiny'"):
      fn(ml_collections.ConfigDict(dict(source="hub", path="x")))
    with pytest.raises(ConfigValueError, match="model.path is empty"):
      fn(ml_collections.ConfigDict(dict(source="hf", path="")))
