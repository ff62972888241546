"""Re-evaluate a finished retention-tracked run's checkpoints with the benchmark's own evaluation.

    python scripts/retention_check.py runs/retention_full [--out results/retention/check.md]

For every checkpoint the run kept, the trainable state is restored and scored by
`mllm_tune.benchmark.runner.measure` (the after-the-fact evaluation `mllm-tune bench` uses) on the
benchmark's eval splits cut to the run's set sizes; the table puts those numbers beside the ones
the run logged at that step. They must agree to float tolerance (same metric, same data).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import ml_collections
import numpy as np


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("run_dir")
  ap.add_argument("--out", default=None, help="markdown file (default: print only)")
  args = ap.parse_args(argv)
  from mllm_tune.benchmark import runner
  from mllm_tune.cli import build_data
  from mllm_tune.eval import selection
  from mllm_tune.train.config_io import load_config
  from mllm_tune.train.loop import Trainer

  with open(os.path.join(args.run_dir, "config.json")) as f:
    cfg = ml_collections.ConfigDict(json.load(f))
  cfg.eval.report = False
  cfg.posthoc.name = "none"
  target, general = cfg.eval.target.digits, cfg.eval.retention.general
  bcfg = load_config(cfg.model.bench_config or runner_default())
  bcfg.eval.update(dict(general_per_family=general.num // len(bcfg.general),
                        downstream=target.num, batch_size=cfg.eval.batch_size,
                        max_new_tokens=cfg.eval.max_new_tokens))
  tr = Trainer(cfg, data=lambda m: build_data(cfg, m), progress=False)
  base = runner.load_base(cfg.model.path)
  sets = runner.prepare_sets(bcfg, base)
  with open(os.path.join(args.run_dir, "metrics.jsonl")) as f:
    logged = {r["step"]: r for r in selection.eval_records([json.loads(x) for x in f if x.strip()])}
  rows, worst = [], 0.0
  for step in sorted(tr.ckpt.all_steps()):
    v = tr.variables_at(step)
    acc = runner.measure(bcfg, base, sets, v["params"], v.get("adapters"))
    r = logged[step]
    pairs = [("digits", acc["digits"], r["eval/target/digits"])]
    pairs += [(f, acc[f], r[f"eval/retention/general/{f}"]) for f in bcfg.general]
    pairs.append(("general (mean)", float(np.mean([acc[f] for f in bcfg.general])),
                  r["eval/retention/general"]))
    for name, a, b in pairs:
      worst = max(worst, abs(a - b))
      rows.append(f"| {step} | {name} | {a:.4f} | {b:.4f} | {abs(a - b):.2e} |")
  md = "\n".join([
      f"# In-run evaluation vs the benchmark's evaluation: `{os.path.basename(args.run_dir)}`",
      "", f"Command: `python scripts/retention_check.py {args.run_dir}`. Every kept checkpoint is "
      "restored and scored by `mllm_tune.benchmark.runner.measure` on the benchmark's eval splits "
      f"({target.num} digits records, {general.num // len(bcfg.general)} per general family).",
      "", "| step | set | benchmark evaluation | logged in the run | abs. difference |",
      "|---|---|---:|---:|---:|", *rows, "", f"Largest difference: {worst:.2e}.", ""])
  print(md)
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      f.write(md)
  return 0 if worst <= 1e-6 else 1


def runner_default() -> str:
  from mllm_tune.benchmark.pretrain import default_config_path
  return default_config_path()


if __name__ == "__main__":
  sys.exit(main())
