"""Trainer: loss goes down, frozen leaves have no grads/state, NaN guard, config errors, logs."""
from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from mllm_tune.train import logs, runs
from mllm_tune.train.config_io import ConfigError, apply_overrides, load_config, validate
from mllm_tune.train.loop import Trainer, TrainingError
from mllm_tune.train.step import micro_loss
from mllm_tune.train.synthetic import SyntheticBatches
from mllm_tune import pytree as select
from tests.helpers.train import ROOT, losses, tiny_cfg


def _trainer(cfg):
  data = SyntheticBatches(cfg.data.batch_size, cfg.data.seq_len, 128, grad_accum=cfg.train.grad_accum)
  return Trainer(cfg, data, progress=False)


def test_lora_training_reduces_loss_and_writes_logs(tmp_path):
  cfg = tiny_cfg(str(tmp_path / "run"), method="lora", steps=30)
  cfg.optimizer.learning_rate = 1e-2
  out = _trainer(cfg).run()
  curve = losses(cfg.run_dir)
  assert out["status"] == "done" and len(curve) == 30
  assert np.mean([curve[s] for s in range(26, 31)]) < curve[1] - 0.15
  # no eval sets and no train.best_metric: no selection, as `export --best` says (runs.py)
  assert out["best_step"] is None
  with pytest.raises(runs.RunError, match="the run has no selection"):
    runs.resolve_step(cfg.run_dir, cfg, runs.checkpointer(cfg.run_dir, cfg), "best")
  tb_dir = os.path.join(cfg.run_dir, "tb")
  (event_file,) = os.listdir(tb_dir)
  records = logs.read_records(os.path.join(tb_dir, event_file))
  assert len(records) == 31 and b"loss" in records[-1]
  assert os.path.isfile(os.path.join(cfg.run_dir, "config.json"))


def test_steps_compile_once_and_donate_the_state(tmp_path):
  cfg = tiny_cfg(str(tmp_path / "run"), method="lora", steps=4)
  tr = _trainer(cfg)
  old_leaves = jax.tree.leaves(tr.state.trainable)
  assert tr.run()["status"] == "done"
  assert tr.jit_step._cache_size() == 1  # the same executable for every step
  assert all(x.is_deleted() for x in old_leaves)  # step 1 reused the initial state's buffers


def test_frozen_leaves_get_no_gradient_and_no_optimizer_state(tmp_path):
  cfg = tiny_cfg(str(tmp_path / "run"), method="lora")
  tr = _trainer(cfg)
  trainable_paths = set(select.flatten(tr.state.trainable))
  assert trainable_paths and all(p.startswith("adapters/") for p in trainable_paths)
  assert not any(p.startswith("params/") for p in trainable_paths)
  batch = tr.put_batch(next(tr.data))
  grad_fn = jax.grad(lambda t, f, b: micro_loss(tr.fns, t, f, b, jax.random.key(0), 1.0, 1),
                     has_aux=True)
  grads = jax.eval_shape(grad_fn, tr.state.trainable, tr.frozen, batch)[0]
  assert set(select.flatten(grads)) == trainable_paths
  opt_paths = {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in p)
               for p, _ in jax.tree_util.tree_flatten_with_path(tr.state.opt_state)[0]}
  assert not any("params" in p for p in opt_paths)
  n_opt = sum(x.size for x in jax.tree.leaves(tr.state.opt_state))
  n_train = sum(x.size for x in jax.tree.leaves(tr.state.trainable))
  assert n_opt <= 2 * n_train + 8  # Adam mu and nu (+ counters) over the trainable leaves only


def test_grad_accumulation_equals_one_big_batch(tmp_path):
  a = _trainer(tiny_cfg(str(tmp_path / "a"), steps=3))
  b_cfg = tiny_cfg(str(tmp_path / "b"), steps=3, grad_accum=2)
  b_cfg.data.batch_size = 4
  b = Trainer(b_cfg, SyntheticBatches(4, 16, 128, grad_accum=2), progress=False)
  big = SyntheticBatches(8, 16, 128)
  for i in range(3):
    micro = b.data.make(i)
    big_batch = {k: v.reshape((8,) + v.shape[2:]) for k, v in micro.items()}
    a.state, ma = a._step(a.frozen, a.state, a.put_batch(big_batch))
    b.state, mb = b._step(b.frozen, b.state, b.put_batch(micro))
    np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-5)
  for x, y in zip(jax.tree.leaves(a.state.trainable), jax.tree.leaves(b.state.trainable)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
  del big


class NaNPixels:
  """LLaVA batches whose second batch carries a NaN pixel."""

  def __init__(self, image_token):
    self.i, self.tok = 0, image_token

  def __next__(self):
    ids = np.full((2, 12), 5, np.int32)
    ids[:, 1:5] = self.tok
    px = np.ones((2, 28, 28, 3), np.float32)
    if self.i == 1:
      px[1, 3, 3, 0] = np.nan
    self.i += 1
    ones = np.ones_like(ids)
    return {"input_ids": ids, "attention_mask": ones, "positions":
            np.broadcast_to(np.arange(12), ids.shape).astype(np.int32), "segment_ids": ones,
            "loss_mask": ones, "pixel_values": px}

  def get_state(self):
    return {"i": self.i}

  def set_state(self, s):
    self.i = s["i"]


def test_nan_in_a_batch_stops_with_the_step_and_culprits_named(tmp_path):
  cfg = tiny_cfg(str(tmp_path / "run"), steps=4, save_every=1)
  cfg.model.tiny.vision_layers = 1
  cfg.mesh.devices = 1
  tr = Trainer(cfg, NaNPixels(127), progress=False)
  with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 2; trainable leaves "
                                          r"now non-finite: \[.*params/.*\]; batch fields with "
                                          r"NaN/Inf: \['pixel_values'\].*step 1\) was kept"):
    tr.run()
  assert tr.ckpt.all_steps() == [1]


def test_config_typos_and_bad_values_name_the_key():
  cfg = load_config(os.path.join(ROOT, "configs/experiments/tiny_lora.py"))
  apply_overrides(cfg, ["config.method.rank=16", "config.optimizer.learning_rate=1"])
  assert cfg.method.rank == 16 and cfg.optimizer.learning_rate == 1.0
  with pytest.raises(ConfigError, match=r"unknown config key 'train.stepz'.*did you mean "
                                        r"\['steps'\]"):
    apply_overrides(cfg, ["config.train.stepz=5"])
  with pytest.raises(ConfigError, match=r"config key 'train.steps': cannot set 'abc'"):
    apply_overrides(cfg, ["config.train.steps=abc"])
  with pytest.raises(ConfigError, match=r"unknown config key 'method.rnak'"):
    apply_overrides(cfg, ["config.method.rnak=3"])
  apply_overrides(cfg, ["config.train.loss_chunk=-1"])
  with pytest.raises(ConfigError, match=r"config key 'train.loss_chunk' must be >= 0"):
    validate(cfg)


def test_resume_refuses_a_different_base(tmp_path):
  cfg = tiny_cfg(str(tmp_path / "run"), steps=2, save_every=1)
  _trainer(cfg).run()
  cfg.model.tiny.seed = 1  # another base model
  cfg.train.steps = 4
  with pytest.raises(Exception, match=r"model.tiny.seed: 0 -> 1"):  # the config says so
    _trainer(cfg)
  cfg.train.allow_config_change = True  # and so does the base's fingerprint
  with pytest.raises(Exception, match="refusing to mix them"):
    _trainer(cfg).run()


def test_event_file_framing_uses_crc32c():
  assert logs.crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value


@pytest.mark.parametrize("mode", ["max", "min"])
def test_best_by_metric_keeps_the_best_checkpoints_and_the_newest(tmp_path, mode):
  """The best `max_to_keep` by the metric, plus the newest step whatever its score (a resumed
  run continues from it; before, a run pre-empted after a poor eval went back to the best)."""
  from mllm_tune.checkpoints.orbax_io import TrainCheckpointer
  ck = TrainCheckpointer(str(tmp_path / "ck"), max_to_keep=2, best_metric="score",
                         best_mode=mode, async_save=False)
  sign = 1.0 if mode == "max" else -1.0
  saves = [(1, 0.5), (2, 0.9), (3, 0.1), (4, 0.7), (5, 0.05), (6, None)]
  for step, score in saves:  # step 6: a save between evals, not ranked
    ck.save(step, {"w": np.full(3, step, np.float32)}, {"index": step}, {"base_path": "x"},
            None if score is None else {"score": sign * score})
    ck.wait()
    if step == 5:
      assert sorted(ck.all_steps()) == [2, 4, 5] and ck.best_step() == 2
  assert sorted(ck.all_steps()) == [2, 4, 6] and ck.best_step() == 2
  assert ck.latest_step() == 6
  state, data, meta = ck.restore(2, {"w": jax.ShapeDtypeStruct((3,), np.float32)})
  assert np.asarray(state["w"]).tolist() == [2, 2, 2] and data == {"index": 2}
  ck.close()


@pytest.mark.parametrize("metric, kind, eval_every, message", [
    ("eval/target/vall", "", 2, r"'eval/target/vall' is an eval metric, but the run has no "
     r"evaluation \(set eval.kind"),
    ("eval/target/vall", "synthetic", 2, r"unknown eval metric 'eval/target/vall'; the held-out "
     r"evaluation logs \['eval/loss', 'eval/accuracy'"),
    ("eval/loss", "synthetic", 0, r"'train.eval_every': 0, so the eval metric"),
    ("tradeoff/O", "", 2, r"'tradeoff/O' needs eval.target and eval.retention sets"),
    ("los", "", 2, r"'los' is not a metric this run logs; the training step log \[.*'loss'"),
])
def test_a_best_metric_the_run_does_not_log_is_refused(tmp_path, metric, kind, eval_every,
                                                       message):
  """Without eval sets too (a misspelt name used to train to the end, rank no checkpoint and
  fail only at `export --best`): eval and trade-off names before training, the names of
  training metrics at the first step, before anything is logged or saved."""
  cfg = tiny_cfg(str(tmp_path / "run"), steps=3, best_metric=metric, eval_every=eval_every)
  cfg.eval.kind = kind
  with pytest.raises(ValueError, match=message):
    _trainer(cfg).run()
  jsonl = os.path.join(cfg.run_dir, "metrics.jsonl")
  assert not os.path.exists(jsonl) or os.path.getsize(jsonl) == 0


def test_an_eval_fn_of_ones_own_logs_the_names_best_metric_may_use(tmp_path):
  """Python API: a trainer given its own `eval_fn` (no eval.kind) selects by its names; one it
  does not log is refused at the first evaluation."""
  def score(trainer, step):
    return {"score": float(step % 3)}  # steps 2, 4: 2.0, 1.0
  cfg = tiny_cfg(str(tmp_path / "run"), steps=4, best_metric="eval/score", eval_every=2)
  tr = _trainer(cfg)
  tr.eval_fn = score
  assert tr.run()["best_step"] == 2
  cfg = tiny_cfg(str(tmp_path / "run2"), steps=4, best_metric="eval/scor", eval_every=2)
  tr = _trainer(cfg)
  tr.eval_fn = score
  with pytest.raises(ValueError, match=r"'eval/scor' is not a metric this run logs; the "
                     r"evaluation and training step log \[.*'eval/score'"):
    tr.run()
  assert max(losses(cfg.run_dir)) == 1  # stopped at the first evaluation, step 2, unsaved


def test_a_training_metric_ranks_the_checkpoints(tmp_path):
  """Ranked by `ce` at the eval-step saves (2, 4), "max": the earlier, higher one wins, so the
  choice differs from the latest checkpoint."""
  cfg = tiny_cfg(str(tmp_path / "run"), steps=4, best_metric="ce", best_mode="max",
                 eval_every=2)
  out = _trainer(cfg).run()
  curve = {r: v for r, v in losses(cfg.run_dir, "ce").items() if r in (2, 4)}
  assert curve[2] > curve[4]  # the loss falls, so ranking and "latest" disagree
  assert out["best_step"] == 2


def test_grad_topk_gets_its_mask_from_training_batches_and_trains_only_it(tmp_path):
  cfg = tiny_cfg(str(tmp_path / "run"), steps=3)
  cfg.method = {"name": "grad_topk", "density": 0.01}
  import ml_collections
  cfg.method = ml_collections.ConfigDict(cfg.method)
  tr = _trainer(cfg)
  assert tr.data.get_state() == {"index": 0}  # calibration batches were rewound
  before = {p: np.asarray(x) for p, x in select.flatten(tr.state.trainable).items()}
  tr.run()
  after = select.flatten(tr.state.trainable)
  mask = select.flatten(tr.mask)
  moved, selected = 0, 0
  for p, x in before.items():
    delta = np.asarray(after[p]) != x
    m = np.broadcast_to(np.asarray(mask[p], bool), x.shape)
    assert not delta[~m].any(), p  # only the top-k entries move
    moved, selected = moved + int(delta.sum()), selected + int(m.sum())
  n_params = sum(x.size for x in jax.tree.leaves(tr.frozen)) + sum(x.size for x in
                                                                    before.values())
  assert 0 < moved <= selected <= 0.011 * n_params


def test_a_resume_that_changes_how_the_run_trains_is_refused_naming_the_keys(tmp_path):
  """Re-running a run directory with checkpoints under another optimizer or method config is
  refused before anything loads, naming each key (old -> new); steps, logging and locations
  may change; `train.allow_config_change` continues with the new values and keeps the previous
  config as config.step<N>.json."""
  import json
  from mllm_tune.train.resume_check import ResumeConfigError
  run = str(tmp_path / "run")
  cfg = tiny_cfg(run, method="lora", steps=2, save_every=2)
  assert _trainer(cfg).run()["status"] == "done"
  changed = tiny_cfg(run, method="lora", steps=4, save_every=2, log_every=2)
  changed.optimizer.learning_rate = 0.5
  changed.method.rank = 8
  with pytest.raises(ResumeConfigError, match=r"method.rank: 4 -> 8; optimizer.learning_rate: "
                     r"0.003 -> 0.5\. Resume with the run's values"):
    _trainer(changed)
  with open(os.path.join(run, "config.json")) as f:
    assert json.load(f)["optimizer"]["learning_rate"] == 0.003  # untouched
  # steps and logging only: resumes from step 2
  longer = tiny_cfg(run, method="lora", steps=3, save_every=3, log_every=2)
  assert _trainer(longer).run()["status"] == "done"
  assert sorted(losses(run)) == [1, 2, 3]
  faster = tiny_cfg(run, method="lora", steps=4, save_every=4, allow_config_change=True)
  faster.optimizer.learning_rate = 0.5
  assert _trainer(faster).run()["status"] == "done" and sorted(losses(run)) == [1, 2, 3, 4]
  with open(os.path.join(run, "config.step3.json")) as f:
    assert json.load(f)["optimizer"]["learning_rate"] == 0.003
  with open(os.path.join(run, "config.json")) as f:
    assert json.load(f)["optimizer"]["learning_rate"] == 0.5


def test_resume_check_compares_the_keys_both_configs_have():
  """A key the run's config.json lacks (saved before the key existed) is no change; the rest
  are compared value by value, locations and logging being benign."""
  from mllm_tune.train import resume_check as rc
  old = {"train": {"steps": 4}, "optimizer": {"learning_rate": 0.1}, "data": {"json_path": "a"}}
  new = {"train": {"steps": 8, "allow_config_change": False},
         "optimizer": {"learning_rate": 0.2}, "data": {"json_path": "b"},
         "model": {"moe_capacity_factor": 0.0}}
  diff = rc.changes(old, new)
  assert diff == [("data.json_path", "a", "b"), ("optimizer.learning_rate", 0.1, 0.2),
                  ("train.steps", 4, 8)]
  assert [k for k, _, _ in diff if not rc.benign(k)] == ["optimizer.learning_rate"]
  assert rc.benign("eval.target.val.image_folder") and rc.benign("data.tfds_dir")
  assert not rc.benign("data.seq_len") and not rc.benign("seed")


def test_drop_records_after_keeps_earlier_steps_and_drops_a_cut_line(tmp_path):
  """What a resumed run does to metrics.jsonl: records past the restored step go, as does the
  last line a kill cut short; at step 0 nothing is kept."""
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 0, "a": 1}\n{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
  assert logs.drop_records_after(str(path), 2) == 2  # step 3 and the cut line
  assert path.read_text() == '{"step": 0, "a": 1}\n{"step": 1}\n{"step": 2}\n'
  assert logs.drop_records_after(str(path), 0) == 3 and path.read_text() == ""
  assert logs.drop_records_after(str(tmp_path / "missing.jsonl"), 2) == 0
