"""DeepAll train-step throughput, compile time, peak memory and data-wait fraction.

    python benchmarks/train_step.py [--json] [--configs 8x128,32x256] [--dtypes float32,bfloat16]
                                    [--variants fast,plain] [--steps 10] [--repeats 3]

For each batch x size x dtype x layer variant: the real DeepAll step (weighted CE + Dice + L2,
Adam, BatchNorm) through `parallel.DataParallel` on all local devices, fed by the real
domain-balanced sampler on brain-sites (generated under data/brain-sites if missing).
`fast` = models/unet.py's XLA-friendly layers (same math); `plain` = textbook flax layers
(nn.ConvTranspose, nn.max_pool, 1x1 nn.Conv head).

Reported: step_ms (median over repeats of the mean over --steps steps, device work only),
slices_per_s, compile_s (first call), peak_mem_mb (GPU: device peak; CPU: process peak RSS),
data_wait_fraction (share of an end-to-end loop's wall time spent in the sampler).
With --json: one JSON object per line per measurement.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from medgen_jax import parallel  # noqa: E402
from medgen_jax.config import base_config  # noqa: E402
from medgen_jax.data.pipeline import prepare_data  # noqa: E402
from medgen_jax.data.sampler import SliceSampler  # noqa: E402
from medgen_jax.methods import deepall  # noqa: E402
from medgen_jax.train_state import create_train_state, make_model, make_optimizer  # noqa: E402


def peak_memory_mb() -> float:
  device = jax.local_devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**20
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def block(tree):
  jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)


def measure(batch: int, size: int, dtype: str, fast: bool, *, data_root: str, steps: int, repeats: int):
  config = base_config()
  config.data.root = data_root
  config.data.held_out = ("D",)
  config.data.in_plane_shape = (size, size)
  config.data.slices = "all"
  config.dtype = dtype
  config.model.fast_ops = fast
  data = prepare_data(config.data, progress=None)
  sources = data.sources[: max(1, min(len(data.sources), batch))]
  while batch % len(sources):
    sources = sources[:-1]
  sampler = SliceSampler(data.train, sites=sources, batch_size=batch, seed=0)
  model = make_model(config.model, num_classes=data.num_classes, dtype=dtype,
                     bn_axis_name=parallel.AXIS_NAME)
  tx = make_optimizer(config.optimizer, num_steps=1000)
  runner = parallel.DataParallel(deepall.make_train_step(model, tx, config.loss,
                                                         num_classes=data.num_classes,
                                                         axis_name=parallel.AXIS_NAME))
  state = runner.replicate(create_train_state(0, model, tx, input_shape=(1, size, size, 1)))
  key = jax.random.PRNGKey(0)
  host_batch = next(sampler)
  start = time.perf_counter()
  state, metrics = runner.step(state, host_batch, key)
  block(metrics)
  compile_s = time.perf_counter() - start
  state, metrics = runner.step(state, host_batch, key)  # second call: must not recompile
  block(metrics)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = runner.step(state, host_batch, key)
    block(metrics)
    times.append((time.perf_counter() - start) / steps)
  step_s = statistics.median(times)
  # End to end with the real sampler, fetching the loss each step as the trainer does.
  wait = 0.0
  start = time.perf_counter()
  for _ in range(steps):
    t = time.perf_counter()
    host_batch = next(sampler)
    wait += time.perf_counter() - t
    state, metrics = runner.step(state, host_batch, key)
    float(metrics["loss"])
  total = time.perf_counter() - start
  return {"name": "deepall", "variant": "fast" if fast else "plain", "batch": batch, "size": size,
          "dtype": dtype, "devices": runner.num_devices, "backend": jax.default_backend(),
          "step_ms": round(step_s * 1000, 2), "slices_per_s": round(batch / step_s, 2),
          "compile_s": round(compile_s, 2), "peak_mem_mb": round(peak_memory_mb(), 1),
          "data_wait_fraction": round(wait / total, 4)}


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--configs", default="8x128,32x256", help="batch x size, comma-separated")
  parser.add_argument("--dtypes", default="float32")
  parser.add_argument("--variants", default="fast,plain")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--data-root", default="data/brain-sites")
  args = parser.parse_args()
  for spec in args.configs.split(","):
    batch, size = (int(v) for v in spec.split("x"))
    for dtype in args.dtypes.split(","):
      for variant in args.variants.split(","):
        r = measure(batch, size, dtype, variant == "fast", data_root=args.data_root,
                    steps=args.steps, repeats=args.repeats)
        if args.json:
          print(json.dumps(r), flush=True)
        else:
          print(f"deepall {r['variant']:5s} batch {batch:3d} {size}x{size} {dtype:8s}: {r['step_ms']:8.1f} ms/step "
                f"{r['slices_per_s']:8.1f} slices/s  compile {r['compile_s']:5.1f} s  peak {r['peak_mem_mb']:.0f} MB  "
                f"data wait {100 * r['data_wait_fraction']:.1f} %", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
