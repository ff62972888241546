"""`mllm-tune` command line: train, export (a run's weights), convert (HF <-> native), demo,
bench, report."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

log = logging.getLogger("mllm_tune")


def _convert(args) -> int:
  import mllm_tune as mt
  from mllm_tune.checkpoints.native import CONFIG_FILE, load_native, save_native
  from mllm_tune.train.runs import RunError, is_run_dir
  if is_run_dir(args.src):
    raise RunError(f"{args.src} is a training run directory, not a model: use `mllm-tune export "
                   f"{args.src} [--step N | --best] --peft DIR --merged DIR --native DIR` to "
                   "write its trained weights")
  src_is_native = os.path.isfile(os.path.join(args.src, CONFIG_FILE))
  t0 = time.time()
  if src_is_native:
    model, params = load_native(args.src)
  else:
    model, params = mt.load_pretrained(args.src)
  to = args.to or ("hf" if src_is_native else "native")
  if to == "native":
    save_native(args.dst, model, params)
  else:
    mt.save_pretrained(args.dst, model, params, dtype=args.dtype, layout=args.layout,
                       max_shard_size=args.max_shard_size,
                       source_dir=None if src_is_native else args.src)
  print(f"converted {args.src} ({'native' if src_is_native else 'hf'}) -> {args.dst} ({to}) "
        f"in {time.time() - t0:.1f}s")
  return 0


def _export_tailored(run, merged_dir: str, pairs: list[str], dtype) -> dict:
  """`export --tailor [KEY=VALUE ...]`: Model Tailor's options (configs/methods/model_tailor.py
  keys; `num_samples` calibration rows, default 128) on the run's training data, first batches
  of its first epoch, one image group, no prefetch."""
  import ml_collections
  from mllm_tune import tuning
  from mllm_tune.train import setup
  from mllm_tune.train.export import export_tailored
  from mllm_tune.train.runs import RunError
  options = {}
  for kv in pairs:
    key, sep, value = kv.partition("=")
    if not sep or not key:
      raise RunError(f"--tailor takes KEY=VALUE options (e.g. sparsity=0.8), got {kv!r}")
    try:
      options[key] = json.loads(value)
    except json.JSONDecodeError:
      options[key] = value
    if isinstance(options[key], list):
      options[key] = tuple(options[key])
  tuning.get("model_tailor", **options)  # unknown or bad options: refused before any loading
  cfg = ml_collections.ConfigDict(run.config.to_dict())
  cfg.train.grad_accum = 1
  cfg.data.image_groups = cfg.data.get("image_groups") or 1  # one host, no mesh: one group
  cfg.data.prefetch, cfg.data.num_workers = 0, 0
  rows = int(options.get("num_samples", 128))
  if rows < 1:
    raise RunError(f"--tailor num_samples={rows}: needs at least one calibration row")
  it = build_data(cfg, run.model)
  batches = [next(it) for _ in range(-(-rows // cfg.data.batch_size))]
  _, theta0, _ = setup.load_model(run.config.model)
  return export_tailored(run, merged_dir, theta0, batches, options, dtype)


def _export(args) -> int:
  from mllm_tune.train.export import export_posthoc, export_run
  from mllm_tune.train.runs import RunError, load_run
  t0 = time.time()
  if args.posthoc:
    if (args.peft or args.native or not args.merged or args.step is not None or args.best
        or args.tailor is not None):
      raise RunError("--posthoc writes the run's post-hoc model, already merged into the base "
                     "weights: give --merged DIR only (no --peft / --native / --step / --best "
                     "/ --tailor)")
    out = export_posthoc(args.run_dir, args.merged, dtype=args.dtype, base=args.base)
    print(json.dumps({"run_dir": os.path.abspath(args.run_dir), "posthoc": True, **out,
                      "seconds": round(time.time() - t0, 1)}))
    return 0
  run = load_run(args.run_dir, step="best" if args.best else args.step, base=args.base)
  if args.tailor is not None:
    if args.peft or args.native or not args.merged:
      raise RunError("--tailor writes the tailored model, merged into the base weights: give "
                     "--merged DIR only (no --peft / --native)")
    out = _export_tailored(run, args.merged, args.tailor, args.dtype)
  else:
    out = export_run(run, peft_dir=args.peft, merged_dir=args.merged, native_dir=args.native,
                     dtype=args.dtype)
  print(json.dumps({"run_dir": os.path.abspath(args.run_dir), "step": run.step,
                    "method": run.method.name or "compose", **out,
                    "seconds": round(time.time() - t0, 1)}))
  return 0


def build_data(cfg, model):
  """The training iterator named by `cfg.data` (this process's shard; `data.batch_size` is the
  global batch, split evenly over processes)."""
  import jax
  from mllm_tune.train.config_io import ConfigError
  d = cfg.data
  if d.kind == "synthetic":
    from mllm_tune.train.synthetic import SyntheticBatches
    if d.batch_size % jax.process_count():
      raise ConfigError(f"data.batch_size={d.batch_size} is not divisible by the "
                        f"{jax.process_count()} processes")
    return SyntheticBatches(d.batch_size // jax.process_count(), d.seq_len,
                            model.config.llm.vocab_size, seed=d.seed + 1000 * jax.process_index(),
                            grad_accum=cfg.train.grad_accum)
  if d.kind in ("llava_json", "tfds", "offline"):
    from mllm_tune.data.loader import make_batches
    if cfg.model.source != "hf":
      raise ConfigError("config key 'data.kind': LLaVA-format data needs model.source='hf' "
                        "(the tokenizer and image processor are read from model.path)")
    per_host = d.to_dict()
    if per_host["batch_size"] % jax.process_count():
      raise ConfigError(f"data.batch_size={d.batch_size} is not divisible by the "
                        f"{jax.process_count()} processes")
    per_host["batch_size"] //= jax.process_count()
    micro = int(cfg.train.get("grad_accum", 1) or 1)
    if per_host["batch_size"] % micro:
      raise ConfigError(f"data.batch_size={d.batch_size} ({per_host['batch_size']} rows per "
                        f"process) is not divisible by train.grad_accum={micro}")
    per_host["micro_batches"] = micro  # (A, B / A) batches, each micro-batch packed alone
    if not per_host.get("image_groups"):  # one patch block per data-parallel shard of the rows
      per_host["image_groups"] = _row_shards_per_host(cfg, per_host["batch_size"] // micro)
      if per_host["image_groups"] > 1:
        log.info("data.image_groups=%d (the mesh's data-parallel shards of a host's rows): each "
                 "group of rows packs under its share of the image budget, so the batches "
                 "depend on it; set data.image_groups to keep them across meshes",
                 per_host["image_groups"])
    return make_batches(per_host, cfg.model.path, model.config)
  raise ConfigError(f"config key 'data.kind': unknown data kind {d.kind!r} "
                    "(synthetic | llava_json | tfds | offline)")


def _row_shards_per_host(cfg, rows: int) -> int:
  """`setup.row_groups` of the run's mesh (built here as the Trainer builds it)."""
  import jax
  from mllm_tune.train.setup import row_groups
  from mllm_tune.train.sharding import make_mesh
  m = cfg.mesh
  devices = jax.devices()[:m.devices] if m.get("devices") else None
  return row_groups(make_mesh(m.data, m.fsdp, m.tensor, devices, expert=m.get("expert", 1)),
                    rows)


def _train(args) -> int:
  from mllm_tune.train.config_io import apply_overrides, load_config, validate
  from mllm_tune.train.loop import Trainer
  from mllm_tune.benchmark.pretrain import resolve_model_source
  from mllm_tune.train.multihost import maybe_initialize_distributed
  maybe_initialize_distributed()
  cfg = load_config(args.config)
  apply_overrides(cfg, args.overrides)
  validate(cfg)
  resolve_model_source(cfg.model)
  trainer = Trainer(cfg, data=lambda model: build_data(cfg, model),
                    progress=not args.no_progress, fisher_data=build_fisher_data(cfg))
  trainer.eval_fn = build_eval_fn(cfg, trainer.model)
  summary = trainer.run()
  print(json.dumps({k: summary[k] for k in ("status", "run_dir", "best_step", "step_programs",
                                            "skipped")}))
  if summary.get("posthoc"):
    ph = summary["posthoc"]
    print(json.dumps({"posthoc": ph["name"], ph["param"]: ph["chosen"],
                      "before": {k: ph["before"][k] for k in ph["before"] if "tradeoff/" in k},
                      "after": {k: ph["after"][k] for k in ph["after"] if "tradeoff/" in k}}))
  print(json.dumps(summary["last"], sort_keys=True))
  return 0 if summary["status"] in ("done", "preempted") else 1


def build_fisher_data(cfg):
  """`penalty.fisher_data` -> a factory `model -> batches` the penalty's importance is computed
  from, or None for the training batches (`train`, the default)."""
  import ml_collections
  p = cfg.get("penalty")
  if p is None or p.name.strip() == "none" or p.get("fisher_data", "train") in ("", "train"):
    return None
  fcfg = ml_collections.ConfigDict(cfg.to_dict())
  fcfg.train.grad_accum = 1
  if p.fisher_data == "synthetic":
    fcfg.data.kind = "synthetic"
    fcfg.data.seed = cfg.data.seed + 104729
  else:
    fcfg.data.kind = p.fisher_data
    fcfg.data.json_path = p.fisher_json_path
    fcfg.data.image_folder = p.fisher_image_folder or cfg.data.get("image_folder", "")
    fcfg.data.shuffle = False
  return lambda model: build_data(fcfg, model)


def build_eval_fn(cfg, model):
  """`eval` config section -> `fn(trainer, step) -> metrics` over the first `num_batches`
  batches of a held-out set (same tokenizer, template and shapes as training), or None."""
  import ml_collections
  e = cfg.get("eval")
  if e is None or not e.kind:
    return None
  ecfg = ml_collections.ConfigDict(cfg.to_dict())
  if e.kind == "synthetic":
    ecfg.data.seed = cfg.data.seed + 7919
  else:
    ecfg.data.kind = e.kind
    ecfg.data.json_path = e.json_path
    ecfg.data.image_folder = e.image_folder or cfg.data.get("image_folder", "")
    ecfg.data.shuffle = False
  ecfg.train.grad_accum = 1

  def fn(trainer, step):
    del step
    it = build_data(ecfg, model)
    return trainer.evaluate(next(it) for _ in range(e.num_batches))
  return fn


def _demo(args) -> int:
  if args.smoke:
    from mllm_tune.demo import run_smoke_demo
    run_smoke_demo(args.out or "runs/demo_smoke")
    return 0
  args.config = args.config or f"{default_bench_config()}:demo"
  if args.out:
    args.overrides = [*args.overrides, f"config.out_dir={args.out}"]
  return _bench(args)


def default_bench_config() -> str:
  from mllm_tune.benchmark.pretrain import default_config_path
  return default_config_path()


def _bench(args) -> int:
  from mllm_tune.benchmark.runner import run_bench
  from mllm_tune.train.config_io import apply_overrides, load_config
  cfg = load_config(args.config or default_bench_config())
  apply_overrides(cfg, args.overrides)
  if getattr(args, "methods", None):
    cfg.run = tuple(m.strip() for m in args.methods.split(",") if m.strip())
  if getattr(args, "seeds", None):
    cfg.seeds = tuple(int(s) for s in args.seeds.split(","))
  run_bench(cfg, progress=not args.no_progress)
  return 0


def _report(args) -> int:
  from mllm_tune.eval.run_report import report_command
  paths = report_command(args.run_dirs, args.out)
  print(json.dumps(paths))
  return 0


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="mllm-tune", description=__doc__)
  sub = p.add_subparsers(dest="command", required=True)
  t = sub.add_parser("train", help="train with an ml_collections config",
                     epilog="overrides: --config.method.rank=8 --config.train.steps=100")
  t.add_argument("--config", required=True, help="configs/experiments/X.py[:arg]")
  t.add_argument("--no-progress", action="store_true")
  t.set_defaults(fn=_train)
  c = sub.add_parser("convert", help="HF model dir <-> native (orbax) checkpoint, or HF -> HF")
  c.add_argument("src", help="HF model directory or native checkpoint directory")
  c.add_argument("dst", help="output directory")
  c.add_argument("--to", choices=["hf", "native"], default=None,
                 help="output format (default: the other one)")
  c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                 help="tensor dtype written to HF (default: the source checkpoint's)")
  c.add_argument("--layout", default=None,
                 help="LLaVA key layout written to HF: v5 (default), legacy, v5_saved, v5_flat")
  c.add_argument("--max-shard-size", default="5GB")
  c.set_defaults(fn=_convert)
  e = sub.add_parser("export", help="a training run's weights out: PEFT adapter, merged HF "
                     "model (with the base's tokenizer/processor files), native adapter")
  e.add_argument("run_dir", help="training run directory (config.json + checkpoints/)")
  which = e.add_mutually_exclusive_group()
  which.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  which.add_argument("--best", action="store_true",
                     help="the run's selected step (its report's, or train.best_metric's)")
  which.add_argument("--posthoc", action="store_true",
                     help="the run's post-hoc model (posthoc.name; applied to the last step), "
                     "with --merged")
  e.add_argument("--peft", metavar="DIR", default=None, help="write a PEFT adapter directory")
  e.add_argument("--merged", metavar="DIR", default=None,
                 help="write the merged model as an HF directory")
  e.add_argument("--native", metavar="DIR", default=None,
                 help="write our adapter directory (mllm_adapter.json + adapters.safetensors)")
  e.add_argument("--tailor", nargs="*", metavar="KEY=VALUE", default=None,
                 help="with --merged: Model Tailor on the run's weights, calibrated on its "
                 "training data's first batches; options as configs/methods/model_tailor.py "
                 "(e.g. sparsity=0.8 num_samples=64)")
  e.add_argument("--base", metavar="DIR", default=None,
                 help="the base model directory (default: the run's model.path)")
  e.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                 help="tensor dtype of --merged (default: the base checkpoint's)")
  e.set_defaults(fn=_export)
  d = sub.add_parser("demo", help="offline demo: pre-train a tiny LLaVA on the general mix "
                     "(cached), tune it with a few methods, print specialization vs retention")
  d.add_argument("--out", default=None, help="report directory (default runs/demo)")
  d.add_argument("--config", default=None,
                 help="bench config (default: mllm_tune/benchmark/config.py:demo)")
  d.add_argument("--smoke", action="store_true",
                 help="only the foundation smoke test (HF round trip + generation)")
  d.add_argument("--no-progress", action="store_true")
  d.set_defaults(fn=_demo)
  r = sub.add_parser("report", help="(re)write a run's trade-off report (report.md, "
                     "report.png); several runs: one overlay (overlay.md, overlay.png)")
  r.add_argument("run_dirs", nargs="+", help="training run directories")
  r.add_argument("--out", default=None, help="output directory (default: the run directory; "
                 "required for several runs)")
  r.set_defaults(fn=_report)
  b = sub.add_parser("bench", help="specialization-vs-retention benchmark: methods x seeds",
                     epilog="overrides: --config.tune.steps=300 --config.downstream=digits")
  b.add_argument("--config", default=None, help="default: mllm_tune/benchmark/config.py")
  b.add_argument("--methods", default=None, help="comma-separated bench method names")
  b.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2")
  b.add_argument("--no-progress", action="store_true")
  b.set_defaults(fn=_bench)
  return p


def main(argv: list[str] | None = None) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  log.setLevel(logging.INFO)
  parser = build_parser()
  args, unknown = parser.parse_known_args(argv)
  overrides = [u[2:] for u in unknown if u.startswith("--config.")]
  rest = [u for u in unknown if not u.startswith("--config.")]
  if rest or (overrides and args.command not in ("train", "bench", "demo")):
    parser.error(f"unrecognized arguments: {' '.join(rest or overrides)}")
  args.overrides = overrides
  try:
    return args.fn(args)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:  # Ctrl-C: no traceback (SIGTERM saves first: train.loop)
    print(f"interrupted: mllm-tune {args.command} stopped (Ctrl-C). A training run resumes from "
          "its newest checkpoint when the same command runs again.", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
