"""Online EWC (docs/methods.md §5.2): F~_k = gamma F~_{k-1} + F_k, anchored at this stage's base.
Stage k+1: `--config.penalty.prev_fisher_path=<stage k run_dir>/importance/online_ewc` (the
running sum each stage writes); stage 1 leaves it empty. `refresh_every` K > 0 repeats the update
within the run after every K-th step (Fisher at the current weights, anchor = the current
weights; saved under run_dir/importance/online_ewc_refresh/step_<k>/, whose newest `importance`
is then the running sum to hand to the next stage)."""
from mllm_tune.configs import base


def get_config():
  c = base.get_config().penalty
  c.name = "online_ewc"
  c.weight = 1e3
  c.gamma = 1.0
  c.prev_fisher_path = ""
  c.refresh_every = 0
  return c
