"""Data pipeline throughput on the brain-sites benchmark, on one CPU core.

    python benchmarks/data_pipeline.py [--root data/brain-sites] [--batch 32] [--steps 300] [--json]

Prints the one-off cost (load + validate + normalize + cache) and then slices/s of the
domain-balanced and episodic samplers at 128x128, for 2-D and 2.5-D (3 slices) input, float32
and float16 caches. Target: >= 2,000 slices/s, so the sampler never starves a train step.
The process is pinned to one core (where the OS allows) to measure what one core delivers.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medgen_jax.data.pipeline import prepare_data  # noqa: E402
from medgen_jax.data.sampler import EpisodicSampler, SliceSampler  # noqa: E402


def measure(sampler, steps: int, batch_slices: int) -> float:
  next(sampler)  # warm caches
  start = time.perf_counter()
  for _ in range(steps):
    next(sampler)
  return steps * batch_slices / (time.perf_counter() - start)


def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--root", default="data/brain-sites")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--size", type=int, default=128)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--json", action="store_true", help="one JSON object per measurement")
  args = parser.parse_args()
  if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
  results = []
  for context, dtype in ((1, "float32"), (1, "float16"), (3, "float32")):
    config = runpy.run_path(str(REPO / "configs" / "data_brain_sites.py"))["get_config"]().data
    config.root = args.root
    config.in_plane_shape = (args.size, args.size)
    config.context_slices = context
    config.cache_dtype = dtype
    start = time.perf_counter()
    data = prepare_data(config, progress=print)
    prepare_s = time.perf_counter() - start
    batch = args.batch - args.batch % len(data.sources)
    balanced = SliceSampler(data.train, sites=data.sources, batch_size=batch, seed=0)
    episodic = EpisodicSampler(data.train, sites=data.sources, meta_train_domains=2,
                               meta_test_domains=1, slices_per_domain=batch // 3, seed=0)
    for name, sampler in (("balanced", balanced), ("episodic", episodic)):
      rate = measure(sampler, args.steps, batch)
      results.append({"name": name, "batch": batch, "size": args.size, "context_slices": context,
                      "cache_dtype": dtype, "slices_per_s": round(rate), "prepare_s": round(prepare_s, 2),
                      "cached_slices": sum(len(s.images) for s in data.train.sites.values())})
  for r in results:
    if args.json:
      print(json.dumps(r))
    else:
      print(f"{r['name']:9s} batch {r['batch']} {r['size']}x{r['size']}x{r['context_slices']} "
            f"{r['cache_dtype']}: {r['slices_per_s']:>7,} slices/s  "
            f"(prepare {r['prepare_s']} s, {r['cached_slices']} cached slices)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
