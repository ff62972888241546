"""`mllm-tune bench` / `mllm-tune demo`: pre-train (cached), tune each method x seed on the
downstream task, measure target and general accuracy, write the trade-off report.

Protocol (docs/methods.md §8): every run starts from the same cached base θ0, sees the same number
of steps and batch size, draws its batches and adapter init from its seed, and is scored by greedy
generation on fixed eval sets (general: one set per family of the general mix; downstream: the
task's eval split). The zero-shot row is θ0 on the same sets.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import resource
import sys
import time

import numpy as np

from mllm_tune.eval import vqa_sets as arrays_lib
from mllm_tune.eval import vqa_eval as evaluate
from mllm_tune.benchmark import assets, pretrain
from mllm_tune.benchmark import config as bench_config
from mllm_tune.benchmark.fit import fit
from mllm_tune.data import offline_vqa as ov
from mllm_tune.eval import tradeoff
from mllm_tune import penalties

log = logging.getLogger(__name__)


class Progress:
  """tqdm bar driven by `fit`'s `progress(n, loss)` callback (silent when disabled)."""

  def __init__(self, total: int, desc: str, enabled: bool = True):
    from tqdm import tqdm
    self.bar = tqdm(total=total, desc=desc, leave=False, disable=not enabled, file=sys.stderr,
                    dynamic_ncols=True)

  def __call__(self, n: int, loss: float) -> None:
    self.bar.update(n - self.bar.n)
    self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

  def close(self) -> None:
    self.bar.close()


@dataclasses.dataclass
class Base:
  path: str
  model: object
  params: dict
  tokenizer: object
  spec: object
  preparer: object


def load_base(path: str) -> Base:
  """The cached base through the regular loaders (tokenizer and image processor first, then the
  HF weights)."""
  from mllm_tune.checkpoints.hf import load_pretrained, read_config
  from mllm_tune.data.pipeline import SamplePreparer
  prep = SamplePreparer.from_pretrained(path, read_config(path), pretrain.MAX_LEN,
                                        pretrain.TEMPLATE)
  model, params = load_pretrained(path)
  return Base(path, model, params, prep.chat.tokenizer, prep.image_spec, prep)


def downstream_source(cfg, split: str, num: int | None):
  if cfg.downstream == "digits":
    return ov.DigitsSource(split, cfg.model.image_size, seed=cfg.data_seed)
  if cfg.downstream not in ov.SAMPLERS or cfg.downstream in cfg.general:
    raise ValueError(f"config key 'downstream': {cfg.downstream!r} must be 'digits' or a "
                     f"synthetic family outside the general mix {tuple(cfg.general)}")
  return ov.ShapesVqaSource((cfg.downstream,), split, num, cfg.model.image_size,
                            seed=cfg.data_seed, name=cfg.downstream)


@dataclasses.dataclass
class Sets:
  general_eval: arrays_lib.VqaArrays
  down_train: arrays_lib.VqaArrays
  down_eval: arrays_lib.VqaArrays


def prepare_sets(cfg, base: Base) -> Sets:
  e = cfg.eval
  n_general = e.general_per_family * len(cfg.general)
  gen = arrays_lib.prepare(pretrain.general_source(cfg, "eval", n_general), base.preparer,
                           name="general")
  train = arrays_lib.prepare(downstream_source(cfg, "train", cfg.tune.num_records),
                             base.preparer, cfg.tune.num_records, prompts=False)
  ev = arrays_lib.prepare(downstream_source(cfg, "eval", e.downstream), base.preparer,
                          e.downstream)
  return Sets(gen, train, ev)


def method_of(cfg, name: str):
  """Bench method name -> (Method, learning rate, penalty config or None)."""
  from mllm_tune import tuning
  if name not in cfg.methods:
    raise ValueError(f"unknown bench method {name!r}; configured: {sorted(cfg.methods)}")
  d = dict(cfg.methods[name].to_dict())
  if "lr" not in d:
    raise ValueError(f"config key 'methods.{name}.lr' is missing")
  lr = float(d.pop("lr"))
  penalty = d.pop("penalty", None)
  if d.get("targets") == bench_config.ALL_LINEARS:  # the family's own tower names
    d["targets"] = bench_config.all_linears(assets.family_of(cfg.model))
  return tuning.from_config(d), lr, penalty


def general_batches(cfg, base: Base, batch_size: int = 32):
  """General-mix *train* batches (in order), the data a Fisher / MAS importance is taken on."""
  n = int(cfg.tune.importance_records)
  data = arrays_lib.prepare(pretrain.general_source(cfg, "train", n), base.preparer,
                            name="general", prompts=False)
  return (data.batch(np.arange(i, min(i + batch_size, n)), base.spec)
          for i in range(0, n, batch_size))


def measure(cfg, base: Base, sets: Sets, params, adapters) -> dict[str, float]:
  """Percent accuracy on each general family and on the downstream task."""
  kw = dict(batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens)
  general = evaluate.accuracy(base.model, params, adapters, sets.general_eval, base.spec,
                              base.tokenizer, **kw)
  down = evaluate.accuracy(base.model, params, adapters, sets.down_eval, base.spec,
                           base.tokenizer, **kw)
  out = {f: general[f] for f in cfg.general}
  out[cfg.downstream] = down["all"]
  return out


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def run_bench(cfg, progress: bool = True, echo=print) -> list[tradeoff.RunRecord]:
  """Every method in `cfg.run` x every seed in `cfg.seeds`; writes the report into
  `cfg.out_dir` and returns the run records."""
  for name in cfg.run:
    method_of(cfg, name)  # fail on a bad name or config before any training
  t_start = time.time()
  path = pretrain.ensure_base(cfg, lambda n, d: Progress(n, d, progress))
  base = load_base(path)
  sets = prepare_sets(cfg, base)
  base_acc = measure(cfg, base, sets, base.params, None)
  echo(f"base {os.path.basename(path)} (zero-shot): " + _fmt(base_acc))
  runs = []
  for name in cfg.run:
    for seed in cfg.seeds:
      method, lr, penalty = method_of(cfg, name)
      importance_data = None
      if penalty and penalties.importance_source(penalties.from_config(penalty)):
        importance_data = general_batches(cfg, base)
      bar = Progress(cfg.tune.steps, f"tune {name} seed {seed}", progress)
      res = fit(base.model, method, base.params, sets.down_train, base.spec,
                steps=cfg.tune.steps, batch_size=cfg.tune.batch_size, learning_rate=lr,
                seed=seed, warmup_steps=cfg.tune.warmup_steps, progress=bar, penalty=penalty,
                importance_data=importance_data)
      bar.close()
      tuned = measure(cfg, base, sets, res.variables["params"], res.variables.get("adapters"))
      echo(f"{name} seed {seed}: " + _fmt(tuned) + f" | {res.step_time_s * 1e3:.0f} ms/step")
      runs.append(tradeoff.RunRecord(
          method=name, seed=int(seed), base=os.path.basename(path),
          trainable_params=res.trainable_params, total_params=res.total_params,
          downstream=(cfg.downstream,), general=tuple(cfg.general), base_acc=base_acc,
          tuned_acc=tuned, peak_memory_gib=None, step_time_s=res.step_time_s))
  paths = tradeoff.save_report(runs, cfg.out_dir)
  echo(tradeoff.markdown_table(tradeoff.aggregate(runs), forgetting=True))
  echo(f"report: {paths['markdown']}, plot: {paths['plot']}; total {time.time() - t_start:.0f}s,"
       f" peak RSS {peak_rss_gib():.2f} GiB")
  return runs


def _fmt(acc: dict[str, float]) -> str:
  return ", ".join(f"{k} {v:.1f}" for k, v in acc.items())
