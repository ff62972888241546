"""Online EWC refreshed within a run (`penalty.refresh_every`, docs/methods.md §5.2): after every
K-th step F~ <- gamma F~ + F(theta_k) and theta* <- theta_k (LoRA's merged weights, checked
against a float64 NumPy merge of the checkpoint at step k, and the Fisher at those weights on
the batch the refresh read); the penalty is 0 right after a refresh; a run killed after a
refresh resumes bit-exactly; the option is refused where it would do nothing."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from mllm_tune import penalties, pytree
from mllm_tune.importance import fisher, store as importance_store
from mllm_tune.train import loop as loop_lib, penalty_refresh
from mllm_tune.train.loop import Trainer
from mllm_tune.train.synthetic import SyntheticBatches
from tests.helpers.train import tiny_cfg

GAMMA, EVERY, STEPS = 0.5, 2, 5


def _cfg(run_dir, refresh_every=EVERY, save_every=1, keep=10, steps=STEPS):
  cfg = tiny_cfg(str(run_dir), method="lora", steps=steps, save_every=save_every, keep=keep)
  cfg.penalty.update(dict(name="online_ewc", weight=3e4, gamma=GAMMA, fisher_samples=8,
                          fisher_chunk=4, refresh_every=refresh_every))
  return cfg


def _data(seed=0):
  return SyntheticBatches(8, 16, 128, seed=seed)


def _trained(tr):
  return {p: np.asarray(x) for p, x in pytree.flatten(tr.state.trainable).items()}


class _Killed(Exception):
  pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The refreshing run; the same run killed after the refresh of step 4 (its newest checkpoint:
  step 3) and resumed; a run without refresh."""
  root = tmp_path_factory.mktemp("refresh")
  # traces of the Fisher objective, counted over the initial importance and both refreshes
  traces, real = [], fisher.example_objective

  def counted(logits_fn, kind):
    fn = real(logits_fn, kind)

    def traced(*args):
      traces.append(kind)
      return fn(*args)
    return traced
  fisher.lm_logits_fn.cache_clear()
  fisher.example_objective = counted
  try:
    full = Trainer(_cfg(root / "full"), _data(), progress=False)
    full.run()
  finally:
    fisher.example_objective = real
    fisher.lm_logits_fn.cache_clear()
  full.objective_traces = len(traces)
  orig = loop_lib.debug_kill

  def kill(step, ckpt):
    if step == 4:
      ckpt.wait()
      raise _Killed
  loop_lib.debug_kill = kill
  try:
    with pytest.raises(_Killed):
      Trainer(_cfg(root / "resumed", save_every=3), _data(), progress=False).run()
  finally:
    loop_lib.debug_kill = orig
  assert os.path.isdir(os.path.join(root, "resumed", penalty_refresh.SUBDIR, "step_4"))
  resumed = Trainer(_cfg(root / "resumed", save_every=3), _data(), progress=False)
  resumed.run()
  plain = Trainer(_cfg(root / "plain", refresh_every=0), _data(), progress=False)
  plain.run()
  return full, resumed, plain


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
  """A refresh after every step, the frozen base stored in bfloat16, the Fisher from a data
  factory (read anew at each refresh), two checkpoints kept."""
  cfg = _cfg(tmp_path_factory.mktemp("refresh_bf16") / "run", refresh_every=1, keep=2)
  cfg.model.frozen_dtype = "bfloat16"
  tr = Trainer(cfg, _data(), progress=False, fisher_data=lambda model: _data(seed=7))
  tr.run()
  return tr


def _metrics(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, f) if "loss_terms/online_ewc" in r}


def _check_refresh(tr, k, prev, batch):
  """The refresh of step k against a float64 NumPy merge of checkpoint k (theta*) and
  gamma prev + the Fisher at those weights on `batch` (F~); returns F~."""
  scale = tr.cfg.method.alpha / tr.cfg.method.rank
  flat = {p: np.asarray(x, np.float64) for p, x in pytree.flatten(tr.variables_at(k)).items()}
  merged = dict(flat)  # K0 + s A B for every wrapped kernel
  for p in [p for p in flat if p.endswith("/lora_a")]:
    base = "params/" + p[len("adapters/"):-len("/lora_a")] + "/kernel"
    merged[base] = flat[base] + scale * flat[p] @ flat[p[:-1] + "b"]
  pen = tr.penalty.penalty
  consts = penalty_refresh.load(tr.run_dir, k, tr.penalty_consts, gamma=pen.gamma,
                                every_k=pen.refresh_every)
  assert set(consts["anchor"]) == set(tr.penalty.weighted) and len(consts["anchor"]) == 3
  for p, x in consts["anchor"].items():
    assert x.dtype == np.float32
    np.testing.assert_allclose(np.asarray(x), merged[p], rtol=1e-6, atol=1e-7, err_msg=p)
  params = pytree.unflatten({p[len("params/"):]: np.asarray(x, np.float32)
                             for p, x in merged.items() if p.startswith("params/")})
  leaves = pytree.unflatten({p: p in consts["importance"] for p in pytree.flatten(
      {"params": params})})
  leaves["adapters"] = {}
  now, n = fisher.fisher_from_batches(tr.model, {"params": params, "adapters": {}}, leaves,
                                      [batch], num_examples=8, chunk=4)
  assert n == 8
  want = fisher.online_update(prev, now, GAMMA)
  for p, x in consts["importance"].items():
    np.testing.assert_allclose(np.asarray(x), np.asarray(want[p]), rtol=2e-4, atol=1e-9,
                               err_msg=p)
  return consts["importance"]


def test_refresh_sets_the_running_fisher_and_the_anchor_to_the_current_weights(runs):
  full, _, _ = runs
  root = os.path.join(full.run_dir, penalty_refresh.SUBDIR)
  assert sorted(os.listdir(root)) == ["step_2", "step_4"]  # every 2 steps, not after the last
  prev, _ = importance_store.load_importance(os.path.join(full.run_dir, "importance",
                                                          "empirical"))
  for k in (2, 4):  # the refresh read training batch k (the next one), rewound
    prev = _check_refresh(full, k, prev, _data().make(k))
  terms = {s: r["loss_terms/online_ewc"] for s, r in _metrics(full.run_dir).items()}
  # the term is read before each update: 0 at theta0 and right after each refresh
  assert terms[1] == 0 and terms[3] == 0 and terms[5] == 0
  assert terms[2] > 0 and terms[4] > 0
  # three importances (the initial one, two refreshes), one trace (and compile) of the engine
  assert full.objective_traces == 1


def test_refresh_with_a_bf16_base_a_fisher_factory_and_pruning(bf16_run):
  tr = bf16_run
  root = os.path.join(tr.run_dir, penalty_refresh.SUBDIR)
  # checkpoints 3 and 4 were kept when step 4 refreshed: step 1's refresh was removed
  assert sorted(os.listdir(root)) == ["step_2", "step_3", "step_4"]
  prev, _ = importance_store.load_importance(os.path.join(root, "step_3", "importance"))
  _check_refresh(tr, 4, prev, _data(seed=7).make(0))
  terms = [r["loss_terms/online_ewc"] for r in _metrics(tr.run_dir).values()]
  assert terms == [0.0] * STEPS  # anchored at the bf16 base's merged weights from step 0 on


def test_resume_after_a_refresh_is_bit_exact_and_refreshing_changes_the_run(runs):
  full, resumed, plain = runs
  want = _trained(full)
  for p, x in _trained(resumed).items():
    np.testing.assert_array_equal(x, want[p], err_msg=p)
  assert any(not np.array_equal(x, want[p]) for p, x in _trained(plain).items())
  assert _metrics(plain.run_dir)[3]["loss_terms/online_ewc"] > 0  # anchored at theta0


def test_resume_without_its_refresh_is_refused(runs, tmp_path):
  """A run resumed at step 5 continues with the refresh of step 4: removed, or written with
  another refresh_every, the resume stops naming it instead of using older consts."""
  import shutil
  full, _, _ = runs
  run = tmp_path / "copy"
  shutil.copytree(full.run_dir, run)
  cfg = _cfg(run, steps=6)
  other = _cfg(run, steps=6, refresh_every=4)
  other.train.allow_config_change = True  # else refused up front as a config change
  with pytest.raises(fisher.ImportanceError, match="penalty.refresh_every=2"):
    Trainer(other, _data(), progress=False).run()
  shutil.rmtree(run / penalty_refresh.SUBDIR / "step_4")
  with pytest.raises(fisher.ImportanceError, match="the refresh of step 4 .* is missing"):
    Trainer(cfg, _data(), progress=False).run()


def test_refresh_every_is_refused_where_it_would_do_nothing():
  cfg = tiny_cfg("unused").penalty
  cfg.update(dict(name="ewc", weight=1.0, refresh_every=2))
  with pytest.raises(penalties.PenaltyError, match="needs penalty.name 'online_ewc' alone"):
    penalties.from_config(cfg)
  cfg.update(dict(name="online_ewc+lwf", weight=None))
  cfg.weights.online_ewc = 1.0
  with pytest.raises(penalties.PenaltyError, match="needs penalty.name 'online_ewc' alone"):
    penalties.from_config(cfg)
  for bad in (-1, 1.5):
    with pytest.raises(penalties.PenaltyError, match="must be an integer >= 0"):
      penalties.get("online_ewc", weight=1.0, refresh_every=bad)
  # outside the Trainer nothing would refresh
  import mllm_tune as mt
  from mllm_tune.models import build_model, init_params
  from mllm_tune.models.config import CausalLMConfig, LLMConfig
  model = build_model(CausalLMConfig(llm=LLMConfig(
      vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
      num_kv_heads=1, head_dim=4, max_position_embeddings=16)))
  params = init_params(model, jax.random.key(0))
  method = mt.tuning.get("freeze", preset="full")
  variables = method.init_variables(jax.random.key(0), params)
  imp = {"params/" + p: np.ones(x.shape, np.float32) for p, x in pytree.flatten(params).items()}
  with pytest.raises(penalties.PenaltyError, match="carried out by the Trainer"):
    penalties.bind(penalties.get("online_ewc", weight=1.0, refresh_every=2), method, variables,
                   importance=imp)


def test_a_one_pass_fisher_iterator_is_refused(tmp_path):
  with pytest.raises(Exception, match="one-pass iterator"):
    Trainer(_cfg(tmp_path), _data(), progress=False,
            fisher_data=iter([_data().make(0)]))


def test_refresh_needs_a_method_that_can_form_the_merged_model(tmp_path):
  """The refreshed Fisher runs on the merged model: LoRA's lora_bias on bias-free layers (the
  tiny Llama has none) cannot form it, refused before training."""
  cfg = _cfg(tmp_path)
  cfg.method.lora_bias = True
  with pytest.raises(Exception, match="refresh_every.*cannot form.*no bias to merge"):
    Trainer(cfg, _data(), progress=False)
