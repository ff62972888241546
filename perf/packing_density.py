"""Packing density (real tokens / all token slots) with and without packing, on a LLaVA-like mix.

    .venv/bin/python perf/packing_density.py [--samples 20000] [--batch-size 8] [--max-len 2048]

The batches are planned by the pipeline's own `Planner` / `pack_rows` (mllm_tune.data.packing),
including the dummy-image rule (every unused image slot needs `image_seq_len` padding tokens),
so the numbers are what `BatchIterator` produces for these lengths.

Length mix, modelled on LLaVA-1.5's 665k instruction mix (CLIP-L/336: 576 tokens per image):
94% single-image samples = 576 + text ~ LogNormal(median 140, sigma 0.85) (VQA / captions /
LLaVA-Instruct conversations), 6% text-only ShareGPT-like ~ LogNormal(median 450, sigma 1.0);
every sample is at least 8 text tokens and is truncated to `max_len` as the pipeline does.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from mllm_tune.data.packing import (BatchSpec, Item, Planner, batch_density,
                                    suggest_max_images)


def llava_mix(n: int, seed: int = 0, image_seq_len: int = 576, max_len: int = 2048,
              image_fraction: float = 0.94) -> list[Item]:
  """n items (length, images) in random order; see the module docstring."""
  rng = np.random.default_rng(seed)
  has_image = rng.random(n) < image_fraction
  text = np.where(has_image, rng.lognormal(np.log(140), 0.85, n),
                  rng.lognormal(np.log(450), 1.0, n))
  lengths = np.minimum(np.maximum(text.astype(int), 8) + has_image * image_seq_len, max_len)
  return [Item(i, int(l), int(h)) for i, (l, h) in enumerate(zip(lengths, has_image))]


def plan_density(items: list[Item], spec: BatchSpec) -> tuple[float, int, float]:
  """One epoch over `items` (in order) -> (density, batches, planning ms per batch)."""
  planner, real, slots, batches, k = Planner(spec), 0, 0, 0, 0
  start = time.perf_counter()
  while True:
    while planner.wants_more() and k < len(items):
      planner.add(items[k])
      k += 1
    rows = planner.next_batch()
    if not rows:
      return real / slots, batches, 1e3 * (time.perf_counter() - start) / max(batches, 1)
    r, s = batch_density(rows, spec)
    real, slots, batches = real + r, slots + s, batches + 1


def density_report(n: int = 20000, batch_size: int = 8, max_len: int = 2048,
                   image_seq_len: int = 576, max_images: int | None = None,
                   seed: int = 0) -> dict[str, float]:
  """Densities of packing vs padding (to max_len, and to buckets) on the same items.

  `max_images` (image slots per batch) defaults to `suggest_max_images` for the mix.
  """
  items = llava_mix(n, seed, image_seq_len, max_len)
  mean_len = np.mean([i.length for i in items])
  packed_images = max_images or suggest_max_images(
      [i.length for i in items], [i.images for i in items], batch_size, max_len, image_seq_len)
  common = dict(batch_size=batch_size, max_len=max_len, image_seq_len=image_seq_len,
                image_token_id=1, image_hw=(1, 1))
  packed = BatchSpec(packing=True, max_images=packed_images, **common)
  padded = BatchSpec(packing=False, max_images=suggest_max_images(
      [], [1], batch_size, max_len, image_seq_len, packing=False), **common)
  buckets = dataclasses.replace(padded, bucket_lengths=tuple(
      b for b in (768, 1024, 1280, 1536, 1792, max_len) if b <= max_len))
  out = {"mean_length": float(mean_len), "max_images_packed": packed_images}
  for name, spec in (("packed", packed), ("padded_max_len", padded), ("padded_buckets", buckets)):
    out[name], out[f"{name}_batches"], out[f"{name}_ms"] = plan_density(items, spec)
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--samples", type=int, default=20000)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--max-len", type=int, default=2048)
  p.add_argument("--image-seq-len", type=int, default=576)
  p.add_argument("--max-images", type=int, default=None)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args()
  r = density_report(a.samples, a.batch_size, a.max_len, a.image_seq_len, a.max_images, a.seed)
  print(f"{a.samples} samples (mean {r['mean_length']:.0f} tokens), {a.batch_size} rows x "
        f"{a.max_len}, {a.image_seq_len} tokens/image")
  print(f"{'layout':<34}{'density':>8}{'batches':>9}{'plan ms/batch':>15}")
  rows = [("packed (max_images=%d)" % r["max_images_packed"], "packed"),
          ("padded to max_len", "padded_max_len"), ("padded to buckets 768..max_len",
                                                    "padded_buckets")]
  for label, key in rows:
    print(f"{label:<34}{r[key]:>8.3f}{r[key + '_batches']:>9d}{r[key + '_ms']:>15.2f}")


if __name__ == "__main__":
  main()
