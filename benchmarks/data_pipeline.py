"""Data pipeline throughput on the brain-sites benchmark.

    python benchmarks/data_pipeline.py [--root data/brain-sites] [--batch 32] [--steps 300] [--json]
    python benchmarks/data_pipeline.py --assembly [--size 256] [--batch 32] [--steps 100] [--threads 2]

Default: the one-off cost (load + validate + normalize + cache) and then slices/s of the
domain-balanced and episodic samplers at 128x128, for 2-D and 2.5-D (3 slices) input, float32
and float16 caches, the process pinned to one core (where the OS allows) to measure what one
core delivers. Target: >= 2,000 slices/s, so the sampler never starves a train step.

--assembly: host batch assembly per process as the trainer does it (train_lib._train_loop:
`runner.put(sampler.batch_at(step))`, i.e. the real sampler, the split over the local devices and
the start of the copy to them; BigAug runs inside the jitted step on the device, so it is not
host work) for the balanced, episodic (2 + 1 sites) and source + target samplers at --size
(default batch 32 of 256x256, float32 cache), measured four ways:
  sampler      batch_at only, in the main thread;
  sampler+put  batch_at + DataParallel.put + waiting for the copy, in the main thread;
  prefetcher   the same through parallel.Prefetcher (the trainer's background thread, two ahead),
               the consumer only taking batches;
  threads=N    N worker threads building consecutive batches (a batch is a pure function of its
               step), taken in order.
Target (issue 12): 2,300 slices/s per process, the DeepAll bf16 rate aimed for on an H200, so
that data feeding is never the bottleneck. Not pinned: the thread rows use every core allowed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import runpy
import statistics
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


ASSEMBLY_TARGET = 2300  # slices/s per process (issue 12)


def _rate(make, steps: int, slices: int, *, repeats: int) -> float:
  """Median slices/s over `repeats` runs of `make(range) -> iterable of batches`, each run
  taking `steps` batches (blocking on each batch's arrays)."""
  import jax
  rates = []
  for r in range(repeats):
    start = time.perf_counter()
    for batch in make(range(r * steps, (r + 1) * steps)):
      jax.block_until_ready(batch)
    rates.append(steps * slices / (time.perf_counter() - start))
  return statistics.median(rates)


def _threaded(build, steps, *, threads: int, ahead: int):
  """Batches `build(i)` for i in `steps`, in order, built by `threads` workers at most `ahead`
  batches in advance."""
  steps = list(steps)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    pending = [pool.submit(build, i) for i in steps[:ahead]]
    for k in range(len(steps)):
      if k + ahead < len(steps):
        pending.append(pool.submit(build, steps[k + ahead]))
      yield pending[k].result()
      pending[k] = None


def measure_assembly(args) -> list[dict]:
  """Host batch assembly rates (see the module docstring, --assembly)."""
  from medgen_jax import parallel
  from medgen_jax.data.sampler import SourceTargetSampler
  config = runpy.run_path(str(REPO / "configs" / "data_brain_sites.py"))["get_config"]().data
  config.root = args.root
  config.in_plane_shape = (args.size, args.size)
  config.target_adaptation = True   # the held-out site's unlabelled cases, for the source + target sampler
  start = time.perf_counter()
  data = prepare_data(config, progress=None)
  prepare_s = time.perf_counter() - start
  runner = parallel.DataParallel(lambda state, batch, key: (state, {}), num_devices=args.devices)
  batch = args.batch
  balanced_sites = list(data.sources)
  while batch % len(balanced_sites):
    balanced_sites = balanced_sites[:-1]
  per_domain = batch // 3
  samplers = {
      "balanced": (SliceSampler(data.train, sites=balanced_sites, batch_size=batch, seed=0), batch),
      "episodic": (EpisodicSampler(data.train, sites=data.sources, meta_train_domains=2,
                                   meta_test_domains=1, slices_per_domain=per_domain, seed=0), 3 * per_domain),
      "source_target": (SourceTargetSampler(data.train, data.adapt, sources=data.sources[:1],
                                            targets=list(data.held_out), batch_size=batch // 2, seed=0),
                        2 * (batch // 2)),
  }
  results = []
  for name, (sampler, slices) in samplers.items():
    def build(i, sampler=sampler):
      return runner.put(sampler.batch_at(i))
    ways = {
        "sampler": lambda steps, sampler=sampler: (sampler.batch_at(i) for i in steps),
        "sampler+put": lambda steps, build=build: (build(i) for i in steps),
        "prefetcher": lambda steps, build=build: parallel.Prefetcher(build, steps, size=2),
        f"threads={args.threads}": lambda steps, build=build: _threaded(build, steps, threads=args.threads,
                                                                        ahead=2 * args.threads),
    }
    for way, make in ways.items():
      for batch_ in make(range(2)):  # warm up (first touches of the output buffers, threads)
        pass
      rate = _rate(make, args.steps, slices, repeats=args.repeats)
      results.append({"sampler": name, "way": way, "slices_per_batch": slices, "size": args.size,
                      "devices": runner.num_devices, "slices_per_s": round(rate),
                      "target": ASSEMBLY_TARGET, "meets_target": rate >= ASSEMBLY_TARGET,
                      "prepare_s": round(prepare_s, 2), "cpus": len(os.sched_getaffinity(0))
                      if hasattr(os, "sched_getaffinity") else os.cpu_count()})
  return results


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--root", default="data/brain-sites")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--size", type=int, default=None, help="in-plane size (default 128; --assembly: 256)")
  parser.add_argument("--steps", type=int, default=None, help="batches per timing (default 300; --assembly: 100)")
  parser.add_argument("--json", action="store_true", help="one JSON object per measurement")
  parser.add_argument("--assembly", action="store_true", help="host batch assembly per process (see above)")
  parser.add_argument("--threads", type=int, default=2, help="--assembly: worker threads of the threads row")
  parser.add_argument("--repeats", type=int, default=3, help="--assembly: timings per row (median)")
  parser.add_argument("--devices", type=int, default=None, help="--assembly: local devices to split over (default all)")
  args = parser.parse_args()
  if args.assembly:
    args.size = args.size or 256
    args.steps = args.steps or 100
    for r in measure_assembly(args):
      if args.json:
        print(json.dumps(r), flush=True)
      else:
        print(f"{r['sampler']:13s} {r['way']:12s} {r['slices_per_batch']} x {r['size']}x{r['size']}: "
              f"{r['slices_per_s']:>7,} slices/s  ({'meets' if r['meets_target'] else 'BELOW'} "
              f"{r['target']:,}/s)", flush=True)
    return 0
  args.size = args.size or 128
  args.steps = args.steps or 300
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
