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


def _cfg(run_dir, refresh_every=EVERY):
  cfg = tiny_cfg(str(run_dir), method="lora", steps=STEPS, save_every=1, keep=10)
  cfg.penalty.update(dict(name="online_ewc", weight=3e4, gamma=GAMMA, fisher_samples=8,
                          fisher_chunk=4, refresh_every=refresh_every))
  return cfg


def _data():
  return SyntheticBatches(8, 16, 128)


def _trained(tr):
  return {p: np.asarray(x) for p, x in pytree.flatten(tr.state.trainable).items()}


class _Killed(Exception):
  pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The refreshing run, the same run killed after step 3 and resumed, a run without refresh."""
  root = tmp_path_factory.mktemp("refresh")
  full = Trainer(_cfg(root / "full"), _data(), progress=False)
  full.run()
  orig = loop_lib.debug_kill

  def kill(step, ckpt):
    if step == 3:
      ckpt.wait()
      raise _Killed
  loop_lib.debug_kill = kill
  try:
    with pytest.raises(_Killed):
      Trainer(_cfg(root / "resumed"), _data(), progress=False).run()
  finally:
    loop_lib.debug_kill = orig
  resumed = Trainer(_cfg(root / "resumed"), _data(), progress=False)
  resumed.run()
  plain = Trainer(_cfg(root / "plain", refresh_every=0), _data(), progress=False)
  plain.run()
  return full, resumed, plain


def _metrics(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, f) if "loss_terms/online_ewc" in r}


def test_refresh_sets_the_running_fisher_and_the_anchor_to_the_current_weights(runs):
  full, _, _ = runs
  root = os.path.join(full.run_dir, penalty_refresh.SUBDIR)
  assert sorted(os.listdir(root)) == ["step_2", "step_4"]  # every 2 steps, not after the last
  prev, _ = importance_store.load_importance(os.path.join(full.run_dir, "importance",
                                                          "empirical"))
  scale = full.cfg.method.alpha / full.cfg.method.rank
  for k in (2, 4):
    v = full.variables_at(k)
    flat = {p: np.asarray(x, np.float64) for p, x in pytree.flatten(v).items()}
    merged = dict(flat)  # float64 NumPy merge: K0 + s A B for every wrapped kernel
    for p in [p for p in flat if p.endswith("/lora_a")]:
      base = "params/" + p[len("adapters/"):-len("/lora_a")] + "/kernel"
      merged[base] = flat[base] + scale * flat[p] @ flat[p[:-1] + "b"]
    consts = penalty_refresh.load(full.run_dir, k, full.penalty_consts)
    assert set(consts["anchor"]) == set(full.penalty.weighted) and len(consts["anchor"]) == 3
    for p, x in consts["anchor"].items():
      assert x.dtype == np.float32
      np.testing.assert_allclose(np.asarray(x), merged[p], rtol=1e-6, atol=1e-7, err_msg=p)
    # F~_k = gamma F~_{k-1} + F(theta_k) on the batch the refresh read (training batch k)
    params = pytree.unflatten({p[len("params/"):]: np.asarray(x, np.float32)
                               for p, x in merged.items() if p.startswith("params/")})
    leaves = pytree.unflatten({p: p in consts["importance"] for p in pytree.flatten(
        {"params": params})})
    leaves["adapters"] = {}
    now, n = fisher.fisher_from_batches(full.model, {"params": params, "adapters": {}}, leaves,
                                        [_data().make(k)], num_examples=8, chunk=4)
    assert n == 8
    want = fisher.online_update(prev, now, GAMMA)
    for p, x in consts["importance"].items():
      np.testing.assert_allclose(np.asarray(x), np.asarray(want[p]), rtol=2e-4, atol=1e-9,
                                 err_msg=p)
    prev = consts["importance"]
  terms = {s: r["loss_terms/online_ewc"] for s, r in _metrics(full.run_dir).items()}
  # the term is read before each update: 0 at theta0 and right after each refresh
  assert terms[1] == 0 and terms[3] == 0 and terms[5] == 0
  assert terms[2] > 0 and terms[4] > 0


def test_resume_after_a_refresh_is_bit_exact_and_refreshing_changes_the_run(runs):
  full, resumed, plain = runs
  want = _trained(full)
  for p, x in _trained(resumed).items():
    np.testing.assert_array_equal(x, want[p], err_msg=p)
  assert any(not np.array_equal(x, want[p]) for p, x in _trained(plain).items())
  plain_terms = _metrics(plain.run_dir)
  assert plain_terms[3]["loss_terms/online_ewc"] > 0  # anchored at theta0 throughout


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


def test_a_one_pass_fisher_iterator_is_refused(tmp_path):
  with pytest.raises(Exception, match="one-pass iterator"):
    Trainer(_cfg(tmp_path), _data(), progress=False,
            fisher_data=iter([_data().make(0)]))
