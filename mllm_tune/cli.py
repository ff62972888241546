"""`mllm-tune` command line: convert (HF <-> native), demo. Training and benchmarks come later."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

log = logging.getLogger("mllm_tune")


def _convert(args) -> int:
  import mllm_tune as mt
  from mllm_tune.checkpoints.native import CONFIG_FILE, load_native, save_native
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


def _demo(args) -> int:
  from mllm_tune.demo import run_smoke_demo
  run_smoke_demo(args.out)
  return 0


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="mllm-tune", description=__doc__)
  sub = p.add_subparsers(dest="command", required=True)
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
  d = sub.add_parser("demo", help="offline end-to-end demo on a tiny generated model")
  d.add_argument("--out", default="runs/demo")
  d.set_defaults(fn=_demo)
  return p


def main(argv: list[str] | None = None) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  log.setLevel(logging.INFO)
  args = build_parser().parse_args(argv)
  try:
    return args.fn(args)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
