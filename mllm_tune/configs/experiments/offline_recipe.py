"""Retention-aware tuning on the offline benchmark: the shared part of the recipes.

The base is the benchmark's pre-trained tiny LLaVA (`model.source = "bench"`, built and cached
on first use, about 5 minutes on 2 CPU cores); the run tunes it on the downstream task (digits)
and evaluates, every `train.eval_every` steps and at step 0, the target set (digits, eval split)
and the retention set (the general mix, one score per family; its mean is Ā_up), with the KL of
the tuned model from θ0 on the retention records. Checkpoints are kept by the combined score
O = E + F (`train.best_metric`); the run report (report.md, report.png) is written at the end.
Methods and learning rates are the benchmark's (`mllm_tune/benchmark/config.py`), so a run here and
a `mllm-tune bench` run of the same method train the same way.

    mllm-tune train --config configs/experiments/recipe_full.py
"""
from mllm_tune.configs import base
from mllm_tune.benchmark import config as bench
from mllm_tune.configs.data import offline as offline_data


def get_config(method: str = "full", penalty: dict | None = None,
               posthoc: dict | None = None):
  c = base.get_config()
  c.run_dir = f"runs/recipe_{method}"
  c.model.source = "bench"
  c.model.bench_config = ""        # '' = mllm_tune/benchmark/config.py
  m = dict(bench.methods()[method])
  lr = m.pop("lr")
  bench_penalty = m.pop("penalty", None)
  c.method = m
  c.optimizer.update(dict(learning_rate=lr, schedule="cosine", warmup_steps=10,
                          weight_decay=0.0, clip_norm=1.0))
  c.data = offline_data.get_config("digits")
  c.data.batch_size = 32
  c.train.update(dict(steps=300, log_every=10, eval_every=50, save_every=0, keep=3,
                      best_metric="tradeoff/O", best_mode="max"))
  c.eval.update(dict(batch_size=100, max_new_tokens=4))
  # In-run sets: the first 200 records of the benchmark's eval splits (the benchmark scores
  # 300 digits and 100 per general family); smaller sets keep the eval under 15% of the run.
  c.eval.target.digits = base.eval_set("offline", "digits", num=200)
  c.eval.retention.general = base.eval_set("offline", "general", num=200)  # 50 per family
  c.penalty.update(penalty or bench_penalty or {})  # nested sections (weights) merge
  for k, v in (posthoc or {}).items():
    c.posthoc[k] = v
  return c
