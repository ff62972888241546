"""Penalties in the train step and the trainer: weight 0 gives plain training bit for bit, a huge
EWC weight pins the weights to theta0, LwF/KL from the frozen base, `mllm-tune train` with LoRA +
EWC + LwF (a combination) logs both terms and saves a reusable Fisher, online EWC accumulates it,
and a Fisher file for another model or for leaves the method does not change is refused."""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mllm_tune as mt
from mllm_tune.train import setup, step as step_lib
from mllm_tune.train.loop import Trainer
from mllm_tune.train.synthetic import SyntheticBatches
from mllm_tune.importance import fisher, store as importance_store
from mllm_tune import penalties
from mllm_tune import pytree as select
from tests.helpers.train import ROOT, run_cli, tiny_cfg


def _run(cfg, steps_done=True):
  tr = Trainer(cfg, SyntheticBatches(8, 16, 128), progress=False)
  if steps_done:
    tr.run()
  return tr


def _penalised(cfg, name, weight, **kw):
  cfg.penalty.name, cfg.penalty.weight = name, weight
  cfg.penalty.fisher_samples = 8
  cfg.penalty.update(kw)
  return cfg


STEPS = 10


@functools.cache
def _full_ft_runs():
  """Full fine-tuning of the tiny model for STEPS real train steps (Adam 3e-4), plain and with
  penalties: {label: (final trainable, losses)}, theta0 and the Fisher (16 samples)."""
  cfg = tiny_cfg("unused")
  model, params, _ = setup.load_model(cfg.model)
  method = mt.tuning.get("freeze", preset="full")
  variables = method.init_variables(jax.random.key(0), params)
  data = SyntheticBatches(8, 16, 128)
  leaves = jax.tree.map(lambda _: True, {"params": params, "adapters": {}})
  imp, _ = fisher.fisher_from_batches(model, {"params": params, "adapters": {}}, leaves,
                                      [data.make(i) for i in range(2)], num_examples=16)
  mask = method.trainable(variables)
  trainable, frozen = mt.tuning.partition(variables, mask)
  out = {}
  for label, name, weight in [("plain", None, 0.0), ("ewc0", "ewc", 0.0),
                              ("ewc_huge", "ewc", 1e10), ("kl", "kl", 1.0), ("lwf", "lwf", 1.0)]:
    opt = mt.tuning.build_optimizer(method, variables, mask, trainable, optax.adam(3e-4))
    bound = consts = None
    if name:
      bound, consts = penalties.bind(penalties.get(name, weight=weight), method, variables,
                                     importance=imp if name == "ewc" else None)
      opt = optax.chain(bound.transform(), opt)
    fns = step_lib.StepFns(model, method, opt, penalty=bound)
    state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                                opt_state=opt.init(trainable), rng=jax.random.key(0))
    step = jax.jit(lambda s, b, fns=fns, consts=consts: step_lib.train_step(
        fns, frozen, s, b, penalty_consts=consts))
    curve, terms = [], []
    for i in range(STEPS):
      state, metrics = step(state, data.make(i))
      curve.append(float(metrics["loss"]))
      terms.append(float(metrics.get(f"loss_terms/{name}", np.nan)))
    out[label] = (jax.tree.map(np.asarray, state.trainable), curve, terms)
  return out, select.flatten(jax.tree.map(np.asarray, trainable)), imp


def test_weight_zero_gives_plain_training_bit_for_bit():
  runs, _, _ = _full_ft_runs()
  plain, plain_curve, _ = runs["plain"]
  got, curve, terms = runs["ewc0"]
  assert curve == plain_curve and terms == [0.0] * STEPS
  for p, x in select.flatten(plain).items():
    np.testing.assert_array_equal(select.flatten(got)[p], x, err_msg=p)


def test_huge_ewc_weight_keeps_the_weights_at_theta0():
  runs, theta0, imp = _full_ft_runs()

  def moved(trained, pinned_only):
    out = 0.0
    for p, x in select.flatten(trained).items():
      d = np.abs(x - theta0[p])
      if pinned_only:  # entries the penalty pulls hard: lambda F >= 1e4
        d = d[1e10 * np.asarray(imp[p]) >= 1e4]
      out = max(out, float(d.max()))
    return out
  assert moved(runs["plain"][0], False) > 2e-3
  assert moved(runs["ewc_huge"][0], True) < 1e-3
  n_pinned = sum(int((1e10 * np.asarray(x) >= 1e4).sum()) for x in imp.values())
  assert n_pinned > 0.95 * sum(x.size for x in theta0.values())


def test_distillation_from_the_frozen_base_in_the_train_step():
  runs, _, _ = _full_ft_runs()
  kl, lwf = runs["kl"][2], runs["lwf"][2]
  assert abs(kl[0]) < 1e-6 < kl[-1]  # theta = theta0 at step 1: KL 0, then it grows
  assert lwf[0] > 1.0  # LwF at theta0 = the teacher's entropy at T = 2 (KL 0)
  assert runs["kl"][1][-1] != runs["plain"][1][-1]


def test_cli_lora_ewc_plus_lwf_logs_both_terms_and_a_wrong_fisher_file_is_refused(tmp_path):
  run_dir = tmp_path / "run"
  res = run_cli(["train", f"--config={ROOT}/configs/experiments/tiny_lora.py", "--no-progress",
                 f"--config.run_dir={run_dir}", "--config.train.steps=3",
                 "--config.train.log_every=1", "--config.train.save_every=0",
                 "--config.penalty.name=ewc+lwf", "--config.penalty.weights.ewc=1e4",
                 "--config.penalty.weights.lwf=0.5", "--config.penalty.fisher_samples=16",
                 "--config.penalty.fisher_chunk=4"])
  assert res.returncode == 0, res.stderr[-3000:]
  with open(run_dir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == 3 and all(np.isfinite(r["loss_terms/ewc"]) for r in rows)
  assert rows[0]["loss_terms/ewc"] == 0.0 < rows[-1]["loss_terms/ewc"]  # B = 0 at step 1
  # lwf beside it: at theta0 (LoRA's B = 0) 0.5 x the teacher's entropy at T = 2 per token
  assert all(r["loss_terms/lwf"] > 0.5 for r in rows)
  path = run_dir / "importance" / "empirical"
  meta = json.loads((path / fisher.META_FILE).read_text())
  assert meta["num_examples"] == 16 and len(meta["leaves"]) == 7  # q k v o gate up down

  cfg = _penalised(tiny_cfg(str(tmp_path / "online"), method="lora", steps=1), "online_ewc",
                   1.0, fisher_path=str(path), prev_fisher_path=str(path), gamma=0.5)
  cfg.method.targets = r"llm/layers_\d+/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"
  tr = _run(cfg, steps_done=False)  # F~ = gamma F_prev + F, saved for the next stage
  acc, _ = importance_store.load_importance(str(tmp_path / "online" / "importance" / "online_ewc"))
  first, _ = importance_store.load_importance(str(path))
  for p, x in first.items():
    np.testing.assert_allclose(np.asarray(tr.penalty_consts["importance"][p]), 1.5 * x,
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(acc[p]), 1.5 * x, rtol=1e-6)

  cfg = _penalised(tiny_cfg(str(tmp_path / "other"), method="lora", steps=1), "ewc", 1.0,
                   fisher_path=str(path))
  cfg.model.tiny.intermediate_size = 96  # another architecture
  with pytest.raises(fisher.ImportanceError, match=rf"{path}/importance.json: computed for a "
                                                   r"model with config hash"):
    _run(cfg, steps_done=False)
  cfg.model.tiny.intermediate_size = 128
  cfg.method.targets = r"llm/layers_\d+/attn/q_proj"  # leaves the Fisher covers stay frozen
  with pytest.raises(penalties.PenaltyError, match=rf"importance file {path}: leaf 'params/llm/"
                                                   r"layers/attn/k_proj/kernel' is neither "
                                                   r"trained by method 'lora' nor changed by"):
    _run(cfg, steps_done=False)


def test_importance_reads_micro_batches_one_at_a_time():
  """With `train.grad_accum` > 1 the training batches carry a micro-batch axis ((A, B, T) ids;
  Qwen positions (A, 3, B, T)); the Fisher / MAS pass reads them as A ordinary batches."""
  from mllm_tune.train.penalty_setup import _unstacked
  ids = np.arange(2 * 3 * 4).reshape(2, 3, 4)
  pos = np.arange(2 * 3 * 3 * 4).reshape(2, 3, 3, 4)
  plain = {"input_ids": np.ones((3, 4)), "positions": np.ones((3, 3, 4))}
  out = list(_unstacked([{"input_ids": ids, "positions": pos}, plain]))
  assert len(out) == 3 and out[2] is plain
  for i in range(2):
    np.testing.assert_array_equal(out[i]["input_ids"], ids[i])
    np.testing.assert_array_equal(out[i]["positions"], pos[i])
