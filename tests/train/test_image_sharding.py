"""Data parallelism splits the image buffers like the rows (`setup.place_batch`, which
`Trainer.put_batch` uses, and `data.image_groups`): on two CPU devices each device's compiled
forward runs the vision tower on half of the batch's images (its FLOPs drop by half the vision tower's) and the logits are the
one-device logits, for LLaVA-1.5 image slots, OneVision crops and Qwen2.5-VL patch blocks."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import ROOT
from tests.helpers.env import cpu_env

SCRIPT = """
import json, sys
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
sys.path.insert(0, sys.argv[3])
import mllm_tune as mt
from mllm_tune.data.loader import make_batches
from mllm_tune.train import setup, sharding
from tests.helpers import anyres_tiny, qwen_vl_tiny
from tests.helpers.data import llava_model_dir, packed_cfg, sized_records, write_llava_dataset
family, tmp = sys.argv[1], sys.argv[2]
if family == "qwen2_5_vl":
  d = qwen_vl_tiny.model_dir(tmp, family)[0]
elif family == "llava_onevision":
  d = anyres_tiny.model_dir(tmp, family)[0]
else:
  d = llava_model_dir(tmp)
model, params = mt.load_pretrained(d)
records, images = sized_records(12, seed=3)
path = write_llava_dataset(tmp + "/data", records, images)
it = make_batches(packed_cfg(path, tmp + "/data/images", batch_size=4, image_groups=2,
                             template="chatml" if family == "llava" else None), d,
                  model.config)
batch = next(it)
one = np.asarray(model.apply({"params": params}, batch["input_ids"],
                             **mt.models.model_kwargs(batch)))
mesh = sharding.make_mesh(2, 1, 1)
params = jax.device_put(params, NamedSharding(mesh, P()))
rows = setup.batch_sharding(mesh, 1)
split, replicated_shape = setup.place_batch(batch, rows, model.config)  # Trainer.put_batch's
repl = {k: jax.device_put(v, NamedSharding(mesh, P()) if k in setup.IMAGE_FIELDS
                          else split[k].sharding) for k, v in batch.items()}
fwd = jax.jit(lambda p, b: model.apply({"params": p}, b["input_ids"],
                                       **mt.models.model_kwargs(b)))
flops = lambda f, *a: f.lower(*a).compile().cost_analysis()["flops"]
ids = [k for k in ("vision_segment_ids", "vision_pos_hw", "vision_window_ids") if k in batch]
vision = jax.jit(lambda p, b: model.apply({"params": p}, b["pixel_values"], *[b[k] for k in ids],
                                          method="image_features"))
print("RESULT" + json.dumps(dict(
    shape=list(batch["pixel_values"].shape),
    spec=[str(a) for a in split["pixel_values"].sharding.spec],
    shards=len({str(s.index) for s in split["pixel_values"].addressable_shards}),
    replicated_shape=replicated_shape,
    split=flops(fwd, params, split), replicated=flops(fwd, params, repl),
    vision=flops(vision, params, repl),
    err=float(np.abs(np.asarray(fwd(params, split)) - one).max()))))
"""


@pytest.mark.parametrize("family", ["llava", "llava_onevision", "qwen2_5_vl"])
def test_image_buffers_are_split_over_data_parallel_devices(family, tmp_path):
  res = subprocess.run([sys.executable, "-c", SCRIPT, family, str(tmp_path), ROOT], cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env=cpu_env(2))
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.split("RESULT")[1])
  assert out["spec"][0] == "('data', 'fsdp', 'expert')" and out["shards"] == 2, out
  assert out["replicated_shape"] is None
  if family == "qwen2_5_vl":  # (blocks, K, C*T*p*p): one patch block per row shard
    assert len(out["shape"]) == 3 and out["shape"][0] == 2
  else:  # image slots / crops: an even count
    assert out["shape"][0] % 2 == 0
  saved = out["replicated"] - out["split"]
  assert 0.4 * out["vision"] < saved < 0.6 * out["vision"], out
  assert out["err"] < 1e-5


def _cfg(args: list[str]):
  from mllm_tune.train.config_io import apply_overrides, load_config
  cfg = load_config(args[0].split("=", 1)[1])
  apply_overrides(cfg, [a[2:] for a in args if a.startswith("--config.")])
  return cfg


def _host_batches(args: list[str], model, hosts: int) -> list[dict]:
  """The first batch each of `hosts` processes reads with these `mllm-tune train` arguments
  (`cli.build_data` with the process index and count it would see)."""
  from unittest import mock
  import jax
  from mllm_tune import cli
  cfg = _cfg(args)
  out = []
  for rank in range(hosts):
    with mock.patch.object(jax, "process_index", lambda: rank), \
         mock.patch.object(jax, "process_count", lambda: hosts):
      out.append(next(cli.build_data(cfg, model)))
  return out


def _token_nll(model, params, batch: dict) -> tuple[float, int]:
  """(sum, count) of the next-token negative log-likelihoods over the loss mask (float64)."""
  import mllm_tune as mt
  logits = np.asarray(model.apply({"params": params}, batch["input_ids"],
                                  **mt.models.model_kwargs(batch)), np.float64)[:, :-1]
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, batch["input_ids"][:, 1:, None], -1)[..., 0]
  mask = batch["loss_mask"][:, 1:].astype(bool)
  return float(nll[mask].sum()), int(mask.sum())


@pytest.mark.parametrize("devices_per_proc", [1, 2])
def test_two_processes_train_qwen_with_image_buffers_split_over_hosts(devices_per_proc,
                                                                      tmp_path):
  """`mllm-tune train` (LoRA, Qwen2.5-VL, LLaVA JSON) as two jax.distributed processes: each
  host's patch buffer becomes its blocks of the global batch (one block per host with one device
  each; two per host with two devices), sharded over the hosts' devices instead of gathered
  everywhere, and no image buffer is replicated (the trainer would warn). The first step's loss
  (LoRA B = 0: the base model) equals the base model's token cross-entropy over the two hosts'
  first batches, each computed alone, so every host's tokens met their own images in the joined
  buffer; both processes log the same losses, and the loss goes down. With two devices each the
  run also has EWC without an importance file: each process takes 2 of its first batch's
  samples, and the Fisher the processes compute together is the one-process Fisher of those 4
  samples (images of different sizes on each host: the stacked examples agree on shapes)."""
  import mllm_tune as mt
  from tests.helpers import qwen_vl_tiny as qt
  from tests.helpers.data import sized_records, write_llava_dataset
  from tests.helpers.train import lora_train_args, losses, run_processes
  d = qt.model_dir(str(tmp_path), "qwen2_5_vl")[0]
  records, images = sized_records(32, seed=1)
  write_llava_dataset(str(tmp_path / "data"), records, images)
  run = str(tmp_path / "run")
  args = lora_train_args(d, str(tmp_path / "data"), run, 4, 4, "--config.data.max_pixels=9408",
                         f"--config.mesh.data={2 * devices_per_proc}",
                         f"--config.data.image_groups={devices_per_proc}")[1:]  # no "train"
  if devices_per_proc == 2:
    args += ["--config.penalty.name=ewc", "--config.penalty.weight=1.0",
             "--config.penalty.fisher_samples=4",
             "--config.penalty.fisher_chunk=2"]
  res, logs = run_processes(2, args, str(tmp_path), devices_per_proc=devices_per_proc)
  assert res.returncode == 0, logs[0][-3000:] + logs[1][-3000:]
  finals = [json.loads(log.strip().splitlines()[-1]) for log in logs]
  assert finals[0]["loss"] == finals[1]["loss"] and finals[0]["step"] == 4
  curve = losses(run)
  assert all(np.isfinite(v) for v in curve.values()) and curve[4] < curve[1]
  assert not any("replicated over" in log for log in logs)
  model, params = mt.load_pretrained(d)
  hosts = _host_batches(args, model, 2)
  assert all(h["pixel_values"].ndim == (2 if devices_per_proc == 1 else 3) for h in hosts)
  sums, counts = zip(*(_token_nll(model, params, h) for h in hosts))
  np.testing.assert_allclose(curve[1], sum(sums) / sum(counts), rtol=2e-5)
  if devices_per_proc == 2:
    import jax
    from mllm_tune.importance import fisher, store
    from mllm_tune.train import penalty_setup, setup
    got, meta = store.load_importance(os.path.join(run, "importance", "empirical"))
    assert meta["num_examples"] == 4
    tok, seq = fisher.image_spec(model)
    mine = [fisher.split_examples(h, tok, seq)[:2] for h in hosts]
    assert [len(m) for m in mine] == [2, 2]
    cfg = _cfg(args)
    method = setup.method_from(cfg.method)
    variables = method.init_variables(jax.random.fold_in(jax.random.key(cfg.seed), 1), params)
    leaves, changed = penalty_setup.changed_leaves(method, variables, params)
    want = fisher.importance(fisher.lm_logits_fn(model), {"params": params, "adapters": {}},
                             leaves, fisher.stack_examples(mine[0] + mine[1], tok, seq),
                             chunk=2)
    assert set(got) == set(want) and len(want) == len(changed) > 0
    for p in want:
      w = np.asarray(want[p])
      np.testing.assert_allclose(np.asarray(got[p]), w, rtol=1e-4,
                                 atol=1e-6 * np.abs(w).max(), err_msg=p)
