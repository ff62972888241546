"""Meshes on 8 forced CPU devices, two jax.distributed processes, kill -9 and resume."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.helpers.env import cpu_env
from tests.helpers.train import ROOT, losses, run_cli, run_processes

MESH_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {root!r})
    import mllm_tune.tuning.selective.by_path  # registers freeze
    from tests.helpers.train import tiny_cfg, losses
    from mllm_tune.train.loop import Trainer
    from mllm_tune.train.synthetic import SyntheticBatches
    assert jax.device_count() == 8
    out = {{}}
    for name, mesh in {{"one": (1, 1, 1, 1), "data": (8, 1, 1, 0), "fsdp": (1, 8, 1, 0),
                        "fsdp_tensor": (1, 4, 2, 0)}}.items():
        cfg = tiny_cfg(sys.argv[1] + "/" + name, steps=5)
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.mesh.devices = mesh
        tr = Trainer(cfg, SyntheticBatches(8, 16, 128), progress=False)
        q = tr.state.trainable["params"]["llm"]["layers"]["attn"]["q_proj"]["kernel"]
        out[name] = {{"spec": [str(a) for a in q.sharding.spec],
                      "n_shards": len({{str(s.index) for s in q.addressable_shards}})}}
        tr.run()
        out[name]["losses"] = [losses(cfg.run_dir)[s] for s in range(1, 6)]
    cfg = tiny_cfg(sys.argv[1] + "/accum", steps=1, grad_accum=2)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.mesh.devices = 8, 1, 1, 0
    tr = Trainer(cfg, SyntheticBatches(8, 16, 128, grad_accum=2), progress=False)
    ids = np.zeros((8, 16), np.int32)  # an eval / caption batch: no micro-batch axis
    out["single_spec"] = str(tr.put_single_batch({{"input_ids": ids}})["input_ids"].sharding.spec)
    out["accum_spec"] = str(tr.put_batch({{"input_ids": ids[None].repeat(2, 0)}})["input_ids"]
                            .sharding.spec)
    print("RESULT" + json.dumps(out))
""")


def test_data_fsdp_and_tensor_meshes_give_the_one_device_loss_curve(tmp_path):
  res = subprocess.run([sys.executable, "-c", MESH_SCRIPT.format(root=ROOT), str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env=cpu_env(8))
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.split("RESULT")[1])
  for name in ("data", "fsdp", "fsdp_tensor"):
    np.testing.assert_allclose(out[name]["losses"], out["one"]["losses"], rtol=2e-5,
                               err_msg=name)
  assert out["one"]["losses"][-1] < out["one"]["losses"][0]
  assert out["fsdp"]["spec"][:2] == ["None", "fsdp"] and out["fsdp"]["n_shards"] == 8
  assert out["fsdp_tensor"]["spec"] == ["None", "fsdp", "tensor"]
  assert out["fsdp_tensor"]["n_shards"] == 8
  assert out["data"]["n_shards"] == 1  # data parallel: replicated parameters
  # with grad_accum, train batches split rows on axis 1; eval / caption batches on axis 0
  assert out["accum_spec"] == "P(None, ('data', 'fsdp', 'expert'))"
  assert out["single_spec"] == "P(('data', 'fsdp', 'expert'),)"


def test_two_processes_with_jax_distributed_agree_on_the_loss(tmp_path):
  """Runs launch/local_multiprocess.sh: two processes, 2 CPU devices each, one JAX job."""
  args = [f"--config={ROOT}/configs/experiments/tiny_full.py", "--no-progress",
          f"--config.run_dir={tmp_path}/run", "--config.train.steps=4",
          "--config.train.log_every=1", "--config.train.save_every=2"]
  res, logs = run_processes(2, args, str(tmp_path), devices_per_proc=2)
  assert res.returncode == 0, logs[0][-2000:] + logs[1][-2000:]
  assert all("process %d of 2, 4 global devices" % i in logs[i] for i in range(2))
  finals = [json.loads(log.strip().splitlines()[-1]) for log in logs]
  assert finals[0]["loss"] == finals[1]["loss"] and finals[0]["step"] == 4
  assert np.isfinite(finals[0]["loss"])
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2", "4"]


def _params(run_dir: str, step: int):
  import orbax.checkpoint as ocp
  path = os.path.join(run_dir, "checkpoints", str(step), "state")
  return ocp.StandardCheckpointer().restore(path)


def test_kill_9_and_resume_gives_identical_losses_and_params(tmp_path):
  base = ["train", "--config=configs/experiments/tiny_lora.py", "--no-progress",
          "--config.train.steps=10", "--config.train.save_every=5",
          "--config.train.log_every=1", "--config.data.seq_len=16"]
  ref = run_cli(base + [f"--config.run_dir={tmp_path}/ref"])
  assert ref.returncode == 0, ref.stderr[-3000:]
  for phase in ("after_save", "during_save"):
    run = f"{tmp_path}/{phase}"
    spec = "7" if phase == "after_save" else "5:during_save"
    killed = run_cli(base + [f"--config.run_dir={run}"], env_extra={"MLLM_DEBUG_KILL": spec})
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_cli(base + [f"--config.run_dir={run}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = losses(f"{tmp_path}/ref"), losses(run)
    assert got[10] == want[10] and got[6] == want[6], (phase, got, want)
    # the steps redone after the checkpoint are logged once: the killed run's records past
    # it were dropped on resume (steps 6 and 7 after_save, all of them during the first save)
    with open(os.path.join(run, "metrics.jsonl")) as f:
      assert [json.loads(line)["step"] for line in f] == list(range(1, 11)), phase
    a, b = _params(f"{tmp_path}/ref", 10), _params(run, 10)
    import jax
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path):
  base = ["train", "--config=configs/experiments/tiny_lora.py", "--no-progress",
          "--config.train.steps=6", "--config.train.save_every=0", "--config.train.log_every=1",
          "--config.data.seq_len=16", f"--config.run_dir={tmp_path}/run"]
  first = run_cli(base, env_extra={"MLLM_DEBUG_KILL": "3:sigterm"})
  assert first.returncode == 0, first.stderr[-2000:]
  assert '"status": "preempted"' in first.stdout
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["3"]
  second = run_cli(base)
  assert second.returncode == 0 and '"status": "done"' in second.stdout
  assert sorted(losses(f"{tmp_path}/run")) == [1, 2, 3, 4, 5, 6]


def test_sigterm_on_a_save_step_still_exits_cleanly(tmp_path):
  """SIGTERM right after the regular save of step 3: no second save of the same step (orbax
  refused it, exit 2); the run ends preempted with status 0 and resumes."""
  base = ["train", "--config=configs/experiments/tiny_lora.py", "--no-progress",
          "--config.train.steps=5", "--config.train.save_every=3", "--config.train.log_every=1",
          "--config.data.seq_len=16", f"--config.run_dir={tmp_path}/run"]
  first = run_cli(base, env_extra={"MLLM_DEBUG_KILL": "3:sigterm"})
  assert first.returncode == 0, first.stderr[-2000:]
  assert '"status": "preempted"' in first.stdout and "already exists" not in first.stderr
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["3"]
  second = run_cli(base)
  assert second.returncode == 0 and '"status": "done"' in second.stdout


def test_a_refused_resume_leaves_the_runs_config_untouched(tmp_path):
  """A resume refused by the base fingerprint (another tiny base seed, the config change
  allowed) fails before it writes anything: the run's config.json stays byte-identical."""
  base = ["train", "--config=configs/experiments/tiny_lora.py", "--no-progress",
          "--config.train.steps=2", "--config.train.log_every=1", "--config.data.seq_len=16",
          f"--config.run_dir={tmp_path}/run"]
  assert run_cli(base).returncode == 0
  before = (tmp_path / "run" / "config.json").read_bytes()
  refused = run_cli(base + ["--config.train.steps=4", "--config.model.tiny.seed=7",
                            "--config.train.allow_config_change=true"])
  assert refused.returncode != 0 and "fingerprint" in refused.stderr, refused.stderr[-2000:]
  assert (tmp_path / "run" / "config.json").read_bytes() == before


def _cli_args(run_dir) -> list[str]:
  return ["train", "--config=configs/experiments/tiny_lora.py", "--no-progress",
          "--config.train.save_every=1", "--config.train.log_every=1", "--config.train.keep=5",
          "--config.train.async_save=False", "--config.data.seq_len=16",
          f"--config.run_dir={run_dir}"]


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
  """A 3-step run saving every step (run once; each test damages a copy)."""
  run = tmp_path_factory.mktemp("three_steps") / "run"
  assert run_cli(_cli_args(run) + ["--config.train.steps=3"]).returncode == 0
  return run


def _damaged_run(tmp_path, damage, three_steps):
  """A copy of the 3-step run at `tmp_path/run`, then `damage(checkpoints_dir)`; returns the
  CLI args that continue it."""
  shutil.copytree(three_steps, tmp_path / "run")
  damage(tmp_path / "run" / "checkpoints")
  return _cli_args(tmp_path / "run")


@pytest.mark.parametrize("what", ["truncated meta", "deleted state metadata",
                                  "truncated array file"])
def test_resume_skips_a_damaged_newest_checkpoint(tmp_path, what, three_steps):
  def damage(ckpt):
    if what == "truncated meta":
      (ckpt / "3" / "meta" / "metadata").write_text('{"base_')
    elif what == "deleted state metadata":
      (ckpt / "3" / "state" / "_METADATA").unlink()
    else:
      for f in (ckpt / "3" / "state").rglob("*"):
        if f.is_file() and "ocdbt" in str(f) and f.stat().st_size > 64:
          f.write_bytes(f.read_bytes()[:32])
  base = _damaged_run(tmp_path, damage, three_steps)
  resumed = run_cli(base + ["--config.train.steps=4"])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "skipping checkpoint step 3" in resumed.stderr and "/checkpoints/3" in resumed.stderr
  assert "resumed from" in resumed.stderr and "at step 2" in resumed.stderr
  assert sorted(losses(f"{tmp_path}/run")) == [1, 2, 3, 4]


def test_resume_with_no_readable_checkpoint_names_the_directory(tmp_path, three_steps):
  def damage(ckpt):
    for step in ("1", "2", "3"):
      (ckpt / step / "meta" / "metadata").write_text("")
  base = _damaged_run(tmp_path, damage, three_steps)
  failed = run_cli(base + ["--config.train.steps=4"])
  assert failed.returncode != 0
  assert "none of the checkpoints (steps 3, 2, 1) can be read" in failed.stderr
  assert f"{tmp_path}/run/checkpoints" in failed.stderr and "Traceback" not in failed.stderr


def test_kill_9_during_an_async_save_then_damage_resumes_bit_exactly(tmp_path):
  """kill -9 while step 4's async save may be in flight, then whatever of step 4 reached the
  disk is truncated: the resume starts from a readable step and ends with the reference's
  losses, bit for bit."""
  base = ["train", "--config=configs/experiments/tiny_lora.py", "--no-progress",
          "--config.train.steps=6", "--config.train.save_every=2", "--config.train.keep=5",
          "--config.train.log_every=1", "--config.data.seq_len=16"]
  ref = run_cli(base + [f"--config.run_dir={tmp_path}/ref"])
  assert ref.returncode == 0, ref.stderr[-3000:]
  run = tmp_path / "run"
  killed = run_cli(base + [f"--config.run_dir={run}"], env_extra={"MLLM_DEBUG_KILL":
                                                                   "4:during_save"})
  assert killed.returncode == -9, killed.stderr[-2000:]
  # step 4's save: half written (orbax's temporary directory) or committed; damage what exists
  half = [p for p in (run / "checkpoints").iterdir() if p.name.startswith("4")]
  for d in half:
    for f in d.rglob("*"):
      if f.is_file():
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  resumed = run_cli(base + [f"--config.run_dir={run}"])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from" in resumed.stderr
  want, got = losses(f"{tmp_path}/ref"), losses(str(run))
  assert got[6] == want[6] and got[5] == want[5], (got, want)
