"""Train-step throughput, compile time, peak memory and data-wait fraction, per method.

    python benchmarks/train_step.py [--json] [--configs 8x128,32x256] [--dtypes float32,bfloat16]
                                    [--variants fast,plain] [--steps 10] [--repeats 3]
    python benchmarks/train_step.py --methods deepall,mldg,masf,saml --configs 12x128 --variants fast,plain

With --methods source_only,dann,adda,adaoutput,pnp_adanet the unsupervised adaptation steps are
timed on brain-sites with A as the labelled source and D as the unlabelled target (batch B source
+ B target slices), each line gaining `ratio_to_source_only`. Methods with phases (ADDA:
pre-training, adaptation; PnP-AdaNet: source, critic, DAM) get one line per phase after the
first (`adda[1]`, `pnp_adanet[1]`, `pnp_adanet[2]`): the first phase is the source-only step.

With --methods cyclegan,sifa (and seuda, cycada: their translation phase) the image-level steps
are timed the same way; `--gan-size full` gives SIFA's released network sizes (generator 32
features / 9 blocks, PatchGAN 64, encoder 16-..-512, decoder 32 / 4 blocks), `quick` the CPU
`:quick` sizes (8 / 3 blocks, 16, 4-..-128, 8 / 2 blocks). A SIFA line gains
`ratio_to_cyclegan` (one SIFA iteration = its seven updates, vs one CycleGAN step of the same
generator/discriminator sizes). GPU command (batch 8 + 8 of 256², both dtypes):
    python benchmarks/train_step.py --methods source_only,cyclegan,sifa --configs 8x256 \
        --dtypes float32,bfloat16 --variants fast --gan-size full --data-root data/brain-sites

With --methods dsbn,series_adapter,parallel_adapter,usenet,msnet,ummkd the supervised
multi-site steps (DSBN, adapters, USE-Net: DeepAll with domain-specific layers; MS-Net's full
step: teacher update then student update; UMMKD with two sites as modalities) are timed on the
same pooled batch over the sources, each line gaining `ratio_to_deepall`:
    python benchmarks/train_step.py --methods deepall,dsbn,series_adapter,parallel_adapter,usenet,msnet,ummkd \
        --configs 12x80 --variants fast

With --methods, the meta-learning steps (MLDG, MASF, SAML; second order and, as order 1,
first order) are timed on the same total batch as DeepAll (meta-train 2 domains + meta-test 1,
batch/3 slices each), and each line gains `order` and `ratio_to_deepall` (same variant/size).

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

from medgen_jax import methods, parallel, train_lib  # noqa: E402
from medgen_jax.config import base_config, image_translation  # noqa: E402
from medgen_jax.methods.base import Phases  # noqa: E402
from medgen_jax.data.pipeline import prepare_data  # noqa: E402


PHASES = {"adda": 2, "pnp_adanet": 3, "seuda": 2, "cycada": 2}   # methods whose step is methods/base.Phases: how many
TRANSLATION = ("cyclegan", "seuda", "cycada", "sifa")   # images in [-1, 1]; networks sized by --gan-size
# Multi-site rows: name -> (method, config overrides); MS-Net timed after its warm-up (full step).
MULTISITE = {"dsbn": ("deepall", {"model.norm": "dsbn"}),
             "series_adapter": ("deepall", {"model.norm": "dsbn", "model.adapter": "series"}),
             "parallel_adapter": ("deepall", {"model.norm": "dsbn", "model.adapter": "parallel"}),
             "usenet": ("deepall", {"model.se": "domain"}),
             "msnet": ("msnet", {"model.norm": "dsbn"}),
             "ummkd": ("ummkd", {"model.norm": "dsbn"})}


def peak_memory_mb() -> float:
  device = jax.local_devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**20
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def block(tree):
  jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)


def measure(batch: int, size: int, dtype: str, fast: bool, *, data_root: str, steps: int, repeats: int,
            method: str = "deepall", first_order: bool = False, phase: int | None = None,
            gan_size: str = "quick"):
  config = base_config()
  if method in TRANSLATION:
    config.data.normalization.name = "site_range"
    if gan_size == "quick":
      config = image_translation(config, "quick")
      config.sifa.encoder_features, config.sifa.decoder_features, config.sifa.decoder_blocks = 4, 8, 2
  name = method
  method, overrides = MULTISITE.get(name, (name, {}))
  for key, value in overrides.items():
    group, field = key.split(".")
    config[group][field] = value
  config.method = method
  config.meta.first_order = first_order
  config.data.root = data_root
  config.data.held_out = ("D",)
  config.data.in_plane_shape = (size, size)
  config.data.slices = "all"
  config.dtype = dtype
  config.model.fast_ops = fast
  config.batch_size = batch
  config.num_steps = 1000
  uda = methods.get(method).SAMPLER == "source_target" or method == "source_only"
  if uda:  # adaptation: the first site is the labelled source, D the unlabelled target
    config.data.target_adaptation = True
    config.data.sites = ("A", "D")
    config.eval.selection = "last"
  data = prepare_data(config.data, progress=None)
  sources = list(data.sources)
  if methods.get(method).SAMPLER != "episodic":
    while batch % len(sources):
      sources = sources[:-1]
  if method == "ummkd":   # two of the sites as the modalities
    sources = sources[:2]
  sampler = train_lib.make_sampler(config, data, sources)
  # the method's own networks and step, one set of domain-specific parts per source
  parts = train_lib.init_run_parts(config, data.num_classes, sources=sources)
  step_fn = parts.step
  if isinstance(step_fn, Phases):  # time one phase: `phase` (default: the last, the adaptation)
    step_fn = step_fn.steps[len(step_fn.steps) - 1 if phase is None else phase]
  runner = parallel.DataParallel(step_fn)
  state = parts.state
  state = runner.replicate(state)
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
  result = {"name": name, "variant": "fast" if fast else "plain", "batch": batch, "size": size,
            "dtype": dtype, "devices": runner.num_devices, "backend": jax.default_backend(),
            "step_ms": round(step_s * 1000, 2), "slices_per_s": round(batch / step_s, 2),
            "compile_s": round(compile_s, 2), "peak_mem_mb": round(peak_memory_mb(), 1),
            "data_wait_fraction": round(wait / total, 4)}
  if methods.get(method).SAMPLER == "episodic":
    result["order"] = 1 if first_order else 2
  return result


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--configs", default="8x128,32x256", help="batch x size, comma-separated")
  parser.add_argument("--dtypes", default="float32")
  parser.add_argument("--variants", default="fast,plain")
  parser.add_argument("--methods", default="deepall", help="deepall,mldg,masf,saml, the adaptation methods, or the multi-site rows dsbn,series_adapter,parallel_adapter,usenet,msnet,ummkd")
  parser.add_argument("--orders", default="2,1", help="meta-gradient orders for mldg/masf/saml")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--data-root", default="data/brain-sites")
  parser.add_argument("--gan-size", default="quick", choices=("quick", "full"),
                      help="translation networks: SIFA's released sizes or the CPU :quick sizes")
  args = parser.parse_args()
  for spec in args.configs.split(","):
    batch, size = (int(v) for v in spec.split("x"))
    for dtype in args.dtypes.split(","):
      for variant in args.variants.split(","):
        deepall_ms = source_only_ms = cyclegan_ms = None
        for method in args.methods.split(","):
          kind = methods.get(MULTISITE.get(method, (method,))[0]).SAMPLER
          orders = [int(o) for o in args.orders.split(",")] if kind == "episodic" else [2]
          runs = [(order, None) for order in orders]
          if method in PHASES:
            runs = [(2, p) for p in range(1, PHASES[method])]
          for order, phase in runs:
            r = measure(batch, size, dtype, variant == "fast", data_root=args.data_root,
                        steps=args.steps, repeats=args.repeats, method=method, first_order=order == 1,
                        phase=phase, gan_size=args.gan_size)
            if method in TRANSLATION:
              r["gan_size"] = args.gan_size
            if phase is not None:
              r["name"] = f"{method}[{phase}]"
            if method == "deepall":
              deepall_ms = r["step_ms"]
            elif method == "source_only":
              source_only_ms = r["step_ms"]
            if method == "cyclegan":
              cyclegan_ms = r["step_ms"]
            elif method == "sifa" and cyclegan_ms:
              r["ratio_to_cyclegan"] = round(r["step_ms"] / cyclegan_ms, 2)
            elif kind == "source_target" and source_only_ms:
              r["ratio_to_source_only"] = round(r["step_ms"] / source_only_ms, 2)
            elif deepall_ms:
              r["ratio_to_deepall"] = round(r["step_ms"] / deepall_ms, 2)
            if args.json:
              print(json.dumps(r), flush=True)
            else:
              label = r["name"] + (f" order {r['order']}" if "order" in r else "")
              ratio = f"  {r['ratio_to_deepall']:.2f}x DeepAll" if "ratio_to_deepall" in r else ""
              if "ratio_to_source_only" in r:
                ratio = f"  {r['ratio_to_source_only']:.2f}x source only"
              if "ratio_to_cyclegan" in r:
                ratio += f"  {r['ratio_to_cyclegan']:.2f}x CycleGAN"
              print(f"{label:14s} {r['variant']:5s} batch {batch:3d} {size}x{size} {dtype:8s}: "
                    f"{r['step_ms']:8.1f} ms/step {r['slices_per_s']:8.1f} slices/s  compile {r['compile_s']:5.1f} s  "
                    f"peak {r['peak_mem_mb']:.0f} MB  data wait {100 * r['data_wait_fraction']:.1f} %{ratio}",
                    flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
