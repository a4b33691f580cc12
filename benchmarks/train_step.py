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

--suite accelerator (issue 12 §4): one command for a GPU/TPU, sized for <= 8 minutes on an H100/H200
(not yet run on one), printing one JSON line per measurement as it finishes:
    python benchmarks/train_step.py --suite accelerator
DeepAll on batch 32 of 256x256; exact second-order MLDG and MASF on 33 slices (2 + 1 domains x
11); SIFA's iteration at its released sizes on 8 + 8 slices of 256x256; DeepAll's step with the
3-D U-Net (model.name='unet3d') on batch 2 of 128^3 random patches ("skipped" if
models/unet3d.py is missing); each in bfloat16 and float32, on one device (--devices N to pmap
over N); and first, where torch imports (or --torch-python), the PyTorch eager anchor
(../shared/anchors/unet_torch.py, run as its README says, in a subprocess) on DeepAll's batch.
Each step is compiled once, ahead of time, through DataParallel's pmap; then --steps x --repeats
steps on a device-resident batch, then --steps steps fed by the real sampler through
parallel.Prefetcher as the trainer does. Fields: step_ms (median of the repeats' mean step),
images_per_step / images_per_s (every slice or patch entering the step: SIFA source + target,
MLDG/MASF meta-train + meta-test), e2e_images_per_s (fed by the sampler), compile_s (lower +
compile), peak_mem_mb (device peak so far in the process: memory_stats' peak_bytes_in_use; CPU:
process peak RSS), step_mem_mb (XLA's buffer assignment for the step: arguments + outputs -
donated + temporaries), flops_per_step (per device, XLA's cost analysis of the compiled step;
flops_source says when the pre-optimization count stood in), mfu (flops_per_step / step time /
the chip's dense peak for the dtype, PEAK_TFLOPS; null on an unknown device unless
--peak-tflops), ratio_to_deepall (MLDG/MASF: time per slice over DeepAll's, same dtype; target
<= 3), ratio_to_torch / ratio_to_best_torch (DeepAll images/s over the anchor's in the same dtype
/ its faster dtype; targets: >= 2,300 img/s bf16 on an H200 and >= 2.8x the anchor). --tiny: the
same steps at CPU-test sizes (U-Net 4 features, depth 1; 32^2 slices; 16^3 patches; 2 steps;
no anchor); --configs BxS: the 2-D entries at DeepAll batch B of SxS (the others scaled alike)
with the full-size networks; --budget-s (default 420) starts no measurement after that long.

Reported: step_ms (median over repeats of the mean over --steps steps, device work only),
slices_per_s, compile_s (first call), peak_mem_mb (GPU: device peak; CPU: process peak RSS),
data_wait_fraction (share of an end-to-end loop's wall time spent in the sampler).
With --json: one JSON object per line per measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402

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


@dataclasses.dataclass
class Setup:
  """One method's step ready to time: its sampler, its (replicated) state and DataParallel."""
  name: str
  method: str
  sampler: object
  runner: parallel.DataParallel
  state: object


_PREPARED: dict = {}


def _prepared(data_config):
  """prepare_data, once per data config in this process (the suite's entries and dtypes share it)."""
  key = data_config.to_json_best_effort(sort_keys=True)
  if key not in _PREPARED:
    _PREPARED[key] = prepare_data(data_config, progress=None)
  return _PREPARED[key]


def setup_step(batch: int, size: int, dtype: str, fast: bool, *, data_root: str,
               method: str = "deepall", first_order: bool = False, phase: int | None = None,
               gan_size: str = "quick", overrides: dict | None = None,
               num_devices: int | None = None) -> Setup:
  """The real step of `method` (its own networks, optimizers and sampler on brain-sites, A, B, C
  as sources and D held out) through parallel.DataParallel; `overrides`: dotted config keys."""
  config = base_config()
  if method in TRANSLATION:
    config.data.normalization.name = "site_range"
    if gan_size == "quick":
      config = image_translation(config, "quick")
      config.sifa.encoder_features, config.sifa.decoder_features, config.sifa.decoder_blocks = 4, 8, 2
  name = method
  method, method_overrides = MULTISITE.get(name, (name, {}))
  for key, value in {**method_overrides, **(overrides or {})}.items():
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
  data = _prepared(config.data)
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
  runner = parallel.DataParallel(step_fn, num_devices=num_devices)
  return Setup(name, method, sampler, runner, runner.replicate(parts.state))


def measure(batch: int, size: int, dtype: str, fast: bool, *, data_root: str, steps: int, repeats: int,
            method: str = "deepall", first_order: bool = False, phase: int | None = None,
            gan_size: str = "quick"):
  run = setup_step(batch, size, dtype, fast, data_root=data_root, method=method,
                   first_order=first_order, phase=phase, gan_size=gan_size)
  name, method, sampler, runner, state = run.name, run.method, run.sampler, run.runner, run.state
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


# --- The accelerator suite (issue 12 §4) ----------------------------------------------------------

# Dense (no sparsity) peak FLOP/s of one chip, TFLOP/s: (device_kind substring, bfloat16, float32).
# First match wins. GPUs: float32 = TF32 tensor cores, which XLA uses for float32 convolutions and
# dots at JAX's default precision on Ampere and later; TPUs: float32 matmuls run as bf16 passes at
# the default precision, so the bf16 peak. Sources: NVIDIA's H100 / H200 / A100 datasheets (their
# tensor-core figures "with sparsity" halved: H100 SXM BF16 1,979 -> 989.5, TF32 989 -> 494.5;
# H100 PCIe 1,513 / 756; H100/H200 NVL 1,671 / 835; A100 BF16 312, TF32 156 dense); Google Cloud's
# TPU system-architecture pages (bf16 per chip: v4 275, v5e 197, v5p 459, v6e Trillium 918).
PEAK_TFLOPS = (
    ("H100 PCIe", 756.5, 378.0),
    ("H100 NVL", 835.5, 417.5),
    ("H200 NVL", 835.5, 417.5),
    ("H100", 989.5, 494.5),      # SXM5 ('NVIDIA H100 80GB HBM3')
    ("H200", 989.5, 494.5),      # SXM ('NVIDIA H200'): the H100 SXM's tensor cores
    ("A100", 312.0, 156.0),
    ("TPU v4", 275.0, 275.0),
    ("TPU v5 lite", 197.0, 197.0),   # v5e's device_kind
    ("TPU v5e", 197.0, 197.0),
    ("TPU v5p", 459.0, 459.0),
    ("TPU v5", 459.0, 459.0),        # v5p's device_kind
    ("TPU v6 lite", 918.0, 918.0),   # v6e's device_kind
    ("TPU v6e", 918.0, 918.0),
)


def device_peak_flops(device_kind: str, dtype: str) -> float | None:
  """Dense peak FLOP/s of one chip of `device_kind` (jax.Device.device_kind) for `dtype`
  ('bfloat16' or 'float32'); None for a device not in PEAK_TFLOPS (CPUs included)."""
  for key, bf16, fp32 in PEAK_TFLOPS:
    if key.lower() in device_kind.lower():
      return 1e12 * (bf16 if dtype == "bfloat16" else fp32)
  return None


def analysed_flops(cost) -> float | None:
  """The 'flops' of an XLA cost analysis: a dict (JAX 0.10's Compiled/Lowered.cost_analysis())
  or a list of dicts, one per program (older JAX), summed; None if missing or not positive
  (XLA reports -1 for what it cannot count)."""
  if cost is None:
    return None
  if isinstance(cost, (list, tuple)):
    values = [v for v in (analysed_flops(c) for c in cost) if v]
    return sum(values) if values else None
  flops = cost.get("flops")
  return float(flops) if flops is not None and flops > 0 else None


def model_flop_utilisation(flops_per_step: float | None, step_s: float, peak_flops: float | None) -> float | None:
  """MFU = FLOPs of one step / step time / peak FLOP/s (all per chip); None when unknown."""
  if not flops_per_step or not peak_flops or step_s <= 0:
    return None
  return flops_per_step / step_s / peak_flops


def step_flops(lowered, compiled) -> tuple[float | None, float | None, str | None]:
  """(FLOPs per device per step used for MFU, the lowered program's count, which one was used).

  The compiled program's count (XLA's cost analysis after optimization) is the figure; the
  pre-optimization (lowered) count stands in when the compiled one is missing or under half of it
  (a backend that runs convolutions/matmuls as library calls may not count them)."""
  compiled_flops = analysed_flops(compiled.cost_analysis())
  try:
    lowered_flops = analysed_flops(lowered.cost_analysis())
  except Exception:  # noqa: BLE001 - optional: some backends cannot analyse the lowered program
    lowered_flops = None
  if compiled_flops and (lowered_flops is None or compiled_flops >= 0.5 * lowered_flops):
    return compiled_flops, lowered_flops, "compiled"
  if lowered_flops:
    return lowered_flops, lowered_flops, "lowered"
  return None, None, None


def step_memory_mb(compiled) -> float | None:
  """Device memory of one step from XLA's buffer assignment: arguments + outputs - donated
  (aliased) + temporaries, MiB; None where the backend does not report it."""
  try:
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  except Exception:  # noqa: BLE001
    return None
  return round(total / 2**20, 1)


@dataclasses.dataclass(frozen=True)
class SuiteEntry:
  name: str
  method: str
  batch: int        # config.batch_size: slices per step (SIFA: source slices, as many target ones)
  size: int         # in-plane size (3-D: the cubic patch's edge)
  gan_size: str = "quick"
  three_d: bool = False


# GPU sizes. MLDG/MASF: 2 meta-train + 1 meta-test domains of 11 slices, 33 in all, the multiple
# of 3 nearest DeepAll's 32 (their ratio to DeepAll is per slice). SIFA: batch 8 + 8 at its
# released network sizes. 3-D: DeepAll's step on batch 2 of 128^3 patches, U-Net 16-..-256.
# In priority order (the time budget skips the last ones first).
ACCELERATOR_SUITE = (
    SuiteEntry("deepall", "deepall", 32, 256),
    SuiteEntry("mldg", "mldg", 33, 256),
    SuiteEntry("masf", "masf", 33, 256),
    SuiteEntry("deepall_3d", "deepall", 2, 128, three_d=True),
    SuiteEntry("sifa", "sifa", 8, 256, gan_size="full"),
)
# --tiny: the same steps at CPU-test sizes (U-Net 4-8-16, 32^2 slices, 16^3 patches).
TINY_SUITE = (
    SuiteEntry("deepall", "deepall", 4, 32),
    SuiteEntry("mldg", "mldg", 6, 32),
    SuiteEntry("masf", "masf", 6, 32),
    SuiteEntry("deepall_3d", "deepall", 1, 16, three_d=True),
    SuiteEntry("sifa", "sifa", 2, 32),
)
TINY_MODEL = {"model.base_features": 4, "model.depth": 1}


class _FixedBatches:
  """A stand-in sampler for the 3-D step: one random patch batch (image, label, domain)."""

  def __init__(self, batch: int, size: int, num_classes: int):
    rng = np.random.default_rng(0)
    shape = (batch, size, size, size)
    self.batch = {"image": rng.standard_normal(shape + (1,), dtype=np.float32),
                  "label": rng.integers(0, num_classes, shape).astype(np.int32),
                  "domain": np.zeros(batch, np.int32)}

  def batch_at(self, step: int):
    return self.batch


def setup_3d(batch: int, size: int, dtype: str, *, overrides: dict | None = None,
             num_devices: int | None = None, num_classes: int = 4) -> Setup:
  """DeepAll's step (segmentation loss of medgen_jax.losses + L2, Adam, BatchNorm) with
  model.name='unet3d' on random [batch, size, size, size, 1] patches, through DataParallel."""
  from medgen_jax.methods import deepall
  from medgen_jax.methods.base import RunInfo
  config = base_config()
  config.model.name = "unet3d"
  for key, value in (overrides or {}).items():
    group, field = key.split(".")
    config[group][field] = value
  config.dtype = dtype
  config.batch_size = batch
  config.num_steps = 1000
  info = RunInfo(num_classes=num_classes, input_shape=(size, size, size, 1), axis_name=parallel.AXIS_NAME)
  state = deepall.init_state(jax.random.PRNGKey(0), config, info)
  runner = parallel.DataParallel(deepall.make_step(config, info), num_devices=num_devices)
  return Setup("deepall_3d", "deepall", _FixedBatches(batch, size, num_classes), runner, runner.replicate(state))


def unet3d_available() -> bool:
  return importlib.util.find_spec("medgen_jax.models.unet3d") is not None


def images_per_step(run: Setup, host_batch) -> int:
  """Images entering one step: every slice or patch of the batch (SIFA: source + target,
  MLDG/MASF: meta-train + meta-test)."""
  return sum(np.shape(x)[0] for path, x in jax.tree_util.tree_leaves_with_path(host_batch)
             if getattr(path[-1], "key", None) == "image")


def measure_compiled(run: Setup, *, steps: int, repeats: int, peak_flops: float | None,
                     end_to_end: bool = True) -> dict:
  """Compiles `run`'s pmapped step once (lower + compile, timed as compile_s), reads its FLOPs and
  memory from XLA, times `repeats` x `steps` steps on one device-resident batch (step_ms = median
  of the means), then (`end_to_end`) `steps` steps fed by the real sampler through
  parallel.Prefetcher as the trainer does (e2e_images_per_s)."""
  runner, state = run.runner, run.state
  key = jax.random.PRNGKey(0)
  host_batch = run.sampler.batch_at(0)
  images = images_per_step(run, host_batch)
  device_batch = runner.put(host_batch)
  start = time.perf_counter()
  # DataParallel's own pmapped step, compiled ahead of time (once) to read XLA's analyses.
  lowered = runner.lower(state, device_batch, key)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  flops, lowered_flops, flops_source = step_flops(lowered, compiled)
  state, metrics = compiled(state, device_batch, key)
  jax.block_until_ready((state, metrics))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, device_batch, key)
    jax.block_until_ready((state, metrics))
    times.append((time.perf_counter() - start) / steps)
  step_s = statistics.median(times)
  e2e = None
  if end_to_end:
    build = lambda i: runner.put(run.sampler.batch_at(i))  # noqa: E731 - the trainer's device_batch
    with parallel.Prefetcher(build, range(1, steps + 1), size=2) as batches:
      start = time.perf_counter()
      for batch in batches:
        state, metrics = compiled(state, batch, key)
      jax.block_until_ready((state, metrics))
      e2e = round(steps * images / (time.perf_counter() - start), 1)
  mfu = model_flop_utilisation(flops, step_s, peak_flops)
  loss = float(np.asarray(metrics["loss"]).reshape(-1)[0])
  return {"step_ms": round(step_s * 1000, 3), "images_per_step": images,
          "images_per_s": round(images / step_s, 1), "e2e_images_per_s": e2e,
          "compile_s": round(compile_s, 2), "peak_mem_mb": round(peak_memory_mb(), 1),
          "step_mem_mb": step_memory_mb(compiled),
          "flops_per_step": flops, "flops_lowered": lowered_flops, "flops_source": flops_source,
          "peak_tflops": None if peak_flops is None else peak_flops / 1e12,
          "mfu": None if mfu is None else round(mfu, 4), "loss_finite": bool(np.isfinite(loss))}


def default_anchor() -> Path | None:
  for path in (REPO.parent / "shared" / "anchors" / "unet_torch.py", REPO / "shared" / "anchors" / "unet_torch.py"):
    if path.exists():
      return path
  return None


def run_torch_anchor(python: str, anchor: Path, *, batch: int, size: int, amp: str,
                     timeout_s: float, repeats: int = 3, iters: int = 5) -> dict:
  """The PyTorch eager anchor's train step (its own script, in a subprocess, see its README):
  its RESULT line as a dict, or {'error': ...}."""
  cmd = [python, str(anchor), "--batch", str(batch), "--size", str(size), "--parts", "train",
         "--amp", amp, "--repeats", str(repeats), "--iters", str(iters), "--warmup", "3",
         "--part-budget-s", "20", "--tag", "medgen_jax accelerator suite"]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout_s:.0f} s"}
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:300]}


def scaled_batch(method: str, deepall_batch: int) -> int:
  """An entry's batch when DeepAll's is `deepall_batch`, as in ACCELERATOR_SUITE: MLDG/MASF the
  multiple of 3 nearest it (3 domain groups), SIFA a quarter (8 + 8 beside DeepAll's 32)."""
  if method in ("mldg", "masf"):
    return 3 * max(1, round(deepall_batch / 3))
  if method == "sifa":
    return max(1, deepall_batch // 4)
  return deepall_batch


def accelerator_suite(args) -> list[dict]:
  """Every entry of the suite in both dtypes, printed as JSON lines as they finish (see main)."""
  suite_start = time.perf_counter()
  entries = TINY_SUITE if args.tiny else ACCELERATOR_SUITE
  if args.methods:
    wanted = args.methods.split(",")
    unknown = sorted(set(wanted) - {e.name for e in entries})
    if unknown:
      raise SystemExit(f"--methods {','.join(unknown)}: not in the accelerator suite; use some of "
                       f"{','.join(e.name for e in entries)}")
    entries = [e for e in entries if e.name in wanted]
  if args.configs:   # the 2-D entries at another DeepAll batch x size, in the GPU suite's proportions
    if args.tiny or "," in args.configs:
      raise SystemExit("--suite accelerator --configs takes one BxS (DeepAll's batch x size), without --tiny")
    batch, size = (int(v) for v in args.configs.split("x"))
    entries = [e if e.three_d else dataclasses.replace(e, size=size, batch=scaled_batch(e.method, batch))
               for e in entries]
  dtypes = args.dtypes.split(",")
  overrides = TINY_MODEL if args.tiny else {}
  steps, repeats = (2, 1) if args.tiny else (args.steps, args.repeats)
  results = []

  def emit(record):
    results.append(record)
    print(json.dumps(record), flush=True)

  # The PyTorch anchor first: before JAX takes the GPU's memory (it preallocates most of it).
  torch_rates = {}
  deepall = next((e for e in entries if e.name == "deepall"), None)
  python = args.torch_python or (sys.executable if importlib.util.find_spec("torch") else None)
  anchor = Path(args.anchor) if args.anchor else default_anchor()
  if deepall is not None:
    why = ("--no-torch" if args.no_torch else "--tiny (the anchor is the full-size U-Net)" if args.tiny
           else "torch not importable (pass --torch-python)" if python is None
           else "anchor script not found (pass --anchor)" if anchor is None or not anchor.exists() else None)
    for dtype in dtypes:
      amp = "bf16" if dtype == "bfloat16" else "fp32"
      record = {"suite": "accelerator", "name": "torch_anchor", "dtype": dtype, "batch": deepall.batch,
                "size": deepall.size}
      if why:
        emit(dict(record, skipped=why))
        continue
      r = run_torch_anchor(python, anchor, batch=deepall.batch, size=deepall.size, amp=amp,
                           timeout_s=args.torch_timeout_s)
      if "error" in r:
        emit(dict(record, skipped=f"anchor failed: {r['error']}"))
        continue
      torch_rates[dtype] = r["imgs_per_s"]
      emit(dict(record, step_ms=round(1000 * r["step_s"], 3), images_per_s=round(r["imgs_per_s"], 1),
                torch=r.get("torch"), device_name=r.get("device_name"), threads=r.get("threads")))

  device = jax.local_devices()[0]
  num_devices = args.devices or 1
  deepall_per_image = {}
  for entry in entries:
    for dtype in dtypes:
      record = {"suite": "accelerator", "name": entry.name, "method": entry.method, "dtype": dtype,
                "batch": entry.batch, "size": entry.size, "devices": num_devices,
                "device_kind": device.device_kind, "backend": jax.default_backend()}
      if entry.gan_size != "quick" or entry.method == "sifa":
        record["gan_size"] = entry.gan_size
      if entry.method in ("mldg", "masf"):
        record["order"] = 2
      if entry.three_d and not unet3d_available():
        emit(dict(record, skipped="models/unet3d.py not available"))
        continue
      elapsed = time.perf_counter() - suite_start
      if elapsed > args.budget_s:
        emit(dict(record, skipped=f"time budget: {elapsed:.0f} s > --budget-s {args.budget_s:.0f}"))
        continue
      peak = args.peak_tflops * 1e12 if args.peak_tflops else device_peak_flops(device.device_kind, dtype)
      if entry.three_d:
        run = setup_3d(entry.batch, entry.size, dtype, overrides=overrides, num_devices=num_devices)
      else:
        run = setup_step(entry.batch, entry.size, dtype, True, data_root=args.data_root,
                         method=entry.method, gan_size=entry.gan_size, overrides=overrides,
                         num_devices=num_devices)
      r = dict(record, **measure_compiled(run, steps=steps, repeats=repeats, peak_flops=peak,
                                          end_to_end=not entry.three_d))
      del run
      per_image = r["step_ms"] / r["images_per_step"]
      if entry.name == "deepall":
        deepall_per_image[dtype] = per_image
        if dtype in torch_rates:
          r["torch_images_per_s"] = round(torch_rates[dtype], 1)
          r["ratio_to_torch"] = round(r["images_per_s"] / torch_rates[dtype], 3)
          r["ratio_to_best_torch"] = round(r["images_per_s"] / max(torch_rates.values()), 3)
      elif entry.method in ("mldg", "masf") and dtype in deepall_per_image:
        r["ratio_to_deepall"] = round(per_image / deepall_per_image[dtype], 3)
      emit(r)
  emit({"suite": "accelerator", "name": "total", "wall_s": round(time.perf_counter() - suite_start, 1),
        "jax": jax.__version__, "device_kind": device.device_kind, "tiny": bool(args.tiny)})
  return results


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--suite", default=None, choices=("accelerator",),
                      help="accelerator: the GPU/TPU suite (JSON lines; see the module docstring)")
  parser.add_argument("--tiny", action="store_true", help="--suite accelerator at CPU-test sizes (seconds)")
  parser.add_argument("--configs", default=None, help="batch x size, comma-separated (default 8x128,32x256); "
                      "--suite accelerator: one BxS, DeepAll's, the other 2-D entries scaled alike")
  parser.add_argument("--dtypes", default=None, help="default float32; --suite accelerator: bfloat16,float32")
  parser.add_argument("--variants", default="fast,plain")
  parser.add_argument("--methods", default=None, help="deepall,mldg,masf,saml, the adaptation methods, or the multi-site rows dsbn,series_adapter,parallel_adapter,usenet,msnet,ummkd (default deepall); --suite accelerator: a subset of deepall,mldg,masf,sifa,deepall_3d (default all)")
  parser.add_argument("--orders", default="2,1", help="meta-gradient orders for mldg/masf/saml")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--data-root", default="data/brain-sites")
  parser.add_argument("--gan-size", default="quick", choices=("quick", "full"),
                      help="translation networks: SIFA's released sizes or the CPU :quick sizes")
  suite = parser.add_argument_group("--suite accelerator")
  suite.add_argument("--devices", type=int, default=None, help="local devices to pmap over (default 1: per-chip figures); "
                     "each batch (MLDG/MASF: each domain's 11 slices) must split evenly over them")
  suite.add_argument("--budget-s", type=float, default=420.0,
                     help="start no further measurement after this many seconds (skipped lines say so)")
  suite.add_argument("--peak-tflops", type=float, default=None,
                     help="peak TFLOP/s per chip for MFU, for a device not in PEAK_TFLOPS")
  suite.add_argument("--no-torch", action="store_true", help="skip the PyTorch anchor")
  suite.add_argument("--torch-python", default=None,
                     help="python with torch for the anchor (default: this one, if it imports torch)")
  suite.add_argument("--anchor", default=None, help="path of unet_torch.py (default ../shared/anchors/)")
  suite.add_argument("--torch-timeout-s", type=float, default=120.0)
  args = parser.parse_args(argv)
  if args.suite == "accelerator":
    args.dtypes = args.dtypes or "bfloat16,float32"
    accelerator_suite(args)
    return 0
  if args.tiny:
    parser.error("--tiny goes with --suite accelerator")
  args.dtypes = args.dtypes or "float32"
  args.methods = args.methods or "deepall"
  args.configs = args.configs or "8x128,32x256"
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
