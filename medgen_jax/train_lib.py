"""`train_and_evaluate(config, workdir)`: train, select, evaluate, write results. Resumable.

Run layout (`workdir`):
  config.json                the resolved config (a different config in the same workdir is an
                             error); written once the data has loaded and the run really starts
  splits.json                the case split used (reused, never recomputed, on resume)
  normalizer.json            the fitted intensity normalization (reused on resume)
  data_info.json             labels, modality, source and held-out sites (for predict)
  <model>/checkpoints/<step> orbax checkpoints (latest N + best by the selection metric);
                             an unreadable one is moved to <step>.corrupt
  metrics.jsonl              one record per log step and per evaluation, naming its model
  tensorboard/<model>/       event files
  results.md, results.csv, results.json

Model selection ("selection rule" in every table): `val` = best mean Dice on the source sites'
validation cases (default, honest; a run whose sources have no validation case is refused rather
than silently falling back); `last` = final step; `oracle` = best Dice on the held-out (target)
site's labels, labelled "oracle" wherever it appears.

A restart with the same config continues from the newest readable checkpoint (params, optimizer
state, step, PRNG key and sampler state) and ends bit-identical on CPU to an uninterrupted run.
The host never waits for the device inside the loop: batches are built and copied to the devices
one step ahead (parallel.Prefetcher), and the step's loss is read only every `log_every` steps.
Non-finite values are caught on the device (`TrainState.first_bad_step`: loss, gradient norm,
new parameters) and checked before every save and log, so training stops with
`TrainingDivergedError` and a bad state is never saved.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from pathlib import Path

import jax
import ml_collections
import numpy as np

from medgen_jax import config as config_lib
from medgen_jax import methods, parallel
from medgen_jax.checkpoint import Checkpoints, abstract_like
from medgen_jax.data.errors import DataError, DataWarning
from medgen_jax.data.nifti import write_bytes_atomic
from medgen_jax.data.patches import PatchSampler
from medgen_jax.data.pipeline import PreparedData, prepare_data
from medgen_jax.data.sampler import EpisodicSampler, SliceSampler, SourceTargetSampler
from medgen_jax.data.splits import save_splits
from medgen_jax.evaluation import (TrainedModel, abstract_state, evaluate_cases, evaluate_models, predictor,
                                   restore_selected, run_info, selection_key, trained_model)
from medgen_jax.inference import is_volumetric
from medgen_jax.methods.base import Phases, RunInfo, domain_index
from medgen_jax.report import mean_dice
from medgen_jax.runs import check_config, prepare_workdir, save_config
from medgen_jax.writers import MetricWriter

class TrainingDivergedError(RuntimeError):
  pass


# --- The run folder -----------------------------------------------------------------------------


def _save_run_files(config, data: PreparedData, workdir: Path) -> None:
  """splits.json, normalizer.json, data_info.json, then config.json: from now on the workdir
  belongs to this config, and a resume reuses exactly this split and normalizer."""
  if parallel.is_main_process():
    save_splits(workdir / "splits.json", data.splits, seed=config.data.split.seed)
    write_bytes_atomic(workdir / "normalizer.json", json.dumps(data.normalizer.to_dict(), indent=1).encode())
    info = {"layout": data.info.layout, "modality": data.info.modality,
            "labels": {str(k): v for k, v in sorted(data.info.labels.items())},
            "num_classes": data.num_classes, "sources": data.sources, "held_out": data.held_out,
            "cases": data.case_ids}
    write_bytes_atomic(workdir / "data_info.json", (json.dumps(info, indent=1) + "\n").encode())
  save_config(config, workdir)
  parallel.barrier("medgen_jax.train_lib:run_files")


# --- Models, states, selection ------------------------------------------------------------------


@dataclasses.dataclass
class RunParts:
  """What one model of a run trains, from its method (methods/base.py): the initial state
  (every network and optimizer), the train step, the evaluation network."""
  state: object
  step: object
  info: RunInfo


def init_run_parts(config, num_classes: int, *, sources=(), abstract: bool = False) -> RunParts:
  """The method's initial state and step for one model. `abstract=True` gives the state as
  shapes only (jax.eval_shape: nothing is compiled or run), enough to restore a checkpoint or
  to check the model's shape constraints."""
  module = methods.get(config.method)
  info = run_info(config, num_classes, sources)
  if abstract:
    state = abstract_state(config, num_classes, sources)
  else:
    state = module.init_state(jax.random.PRNGKey(config.seed), config, info)
  return RunParts(state, module.make_step(config, info), info)


# --- Training -------------------------------------------------------------------------------------


def make_sampler(config, data: PreparedData, sources):
  """The sampler the method asks for (its SAMPLER): pooled, episodic or source + target; with
  data.patch_size set, pooled 3-D patches (data/patches.PatchSampler; config.validate admits only
  pooled methods in 3-D)."""
  # The same seed in every process: each draws the same global batch and assembles its rows of it
  # (batch_at(step, block=parallel.process_block())), so the run does not depend on how many
  # processes share it.
  seed = config.seed
  kind = methods.get(config.method).SAMPLER
  if kind == "pooled" and is_volumetric(config.data):
    return PatchSampler(data.volumes, sites=sources, batch_size=config.batch_size,
                        patch_size=config.data.patch_size, seed=seed,
                        oversample_foreground=config.data.oversample_foreground)
  if kind == "pooled":
    return SliceSampler(data.train, sites=sources, batch_size=config.batch_size, seed=seed)
  if kind == "source_target":
    if data.adapt is None:
      raise DataError.single(
          f"config.method={config.method!r}", "adapts to unlabelled target data, but the run has none",
          "set data.target_adaptation=True and the target site(s) in data.held_out")
    return SourceTargetSampler(data.train, data.adapt, sources=sources, targets=data.held_out,
                               batch_size=config.batch_size, seed=seed)
  m = config.meta
  groups = m.meta_train_domains + m.meta_test_domains
  return EpisodicSampler(data.train, sites=sources, meta_train_domains=m.meta_train_domains,
                         meta_test_domains=m.meta_test_domains,
                         slices_per_domain=config.batch_size // groups, seed=seed)


def check_batch_fits_devices(config, num_devices: int) -> None:
  if methods.get(config.method).SAMPLER == "episodic":
    per_domain = config.batch_size // (config.meta.meta_train_domains + config.meta.meta_test_domains)
    if per_domain % num_devices:
      raise ValueError(f"config.batch_size={config.batch_size}: {per_domain} slices per domain do not split "
                       f"over {num_devices} devices. Fix: make batch_size / (meta-train + meta-test "
                       f"domains) a multiple of {num_devices}")
  elif config.batch_size % num_devices:
    raise ValueError(f"config.batch_size={config.batch_size}: not a multiple of the "
                     f"{num_devices} devices. Fix: use a multiple of {num_devices}")


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rest = divmod(seconds, 3600)
  return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class _Progress:
  """A tqdm bar on a terminal; without one (Slurm, nohup), a plain line every `log_every`
  steps: step, loss, slices/s and the remaining time."""

  def __init__(self, name: str, total: int, initial: int, enabled: bool):
    self.name, self.total = name, total
    self.bar = None
    self.main = parallel.is_main_process()
    if enabled and self.main:
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=None)
      if self.bar.disable:  # no terminal
        self.bar = None

  def step(self) -> None:
    if self.bar is not None:
      self.bar.update(1)

  def log(self, done: int, loss: float, steps_per_s: float | None, batch_size: int) -> None:
    if self.bar is not None:
      self.bar.set_postfix(loss=f"{loss:.3f}")
    elif self.main:
      speed = f"{steps_per_s * batch_size:.1f} slices/s  ETA {_duration((self.total - done) / steps_per_s)}" \
          if steps_per_s else "(first steps: compiling)"
      print(f"[{self.name}] step {done}/{self.total}  loss {loss:.4f}  {speed}", flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def train_one(config, data: PreparedData, *, name: str, sources: list[str], workdir: Path) -> TrainedModel:
  """Trains one model on `sources` (resuming from its checkpoints) and restores the selected one."""
  parts = init_run_parts(config, data.num_classes, sources=sources)
  template = parts.state
  sampler = make_sampler(config, data, sources)
  ckpts = Checkpoints(workdir / name / "checkpoints", keep=config.checkpoint.keep,
                      selection_key=selection_key(config.eval.selection),
                      save_async=config.checkpoint.async_save)
  state = template
  restored = ckpts.restore_latest(abstract_like(template))
  if restored is not None:
    state = restored[0]
  start = int(state.step)
  # A batch is a pure function of (seed, step), the same global batch in every process: the step
  # is the whole sampler state.
  sampler.step = start
  try:
    if start < config.num_steps:
      writer = MetricWriter(workdir, model=name, resume_step=start)
      try:
        _train_loop(config, data, parts, state, sampler, ckpts, name=name, sources=sources,
                    start=start, writer=writer)
      finally:
        writer.close()
    ckpts.wait()
    final_state, step = restore_selected(ckpts, template, selection=config.eval.selection, name=name,
                                         workdir=workdir)
  finally:
    ckpts.close()
  module = methods.get(config.method)
  if hasattr(module, "write_figures") and parallel.is_main_process():
    module.write_figures(config, data, jax.device_get(final_state), workdir / name)
  return trained_model(config, data.num_classes, final_state, name=name, sources=sources, step=step)


def _train_loop(config, data, parts: RunParts, state, sampler, ckpts, *, name, sources, start, writer):
  eval_model, variables_of = methods.get(config.method).eval_network(config, parts.info)
  predict, domain_of = predictor(eval_model, sources,
                                 config.model.unseen_domain if methods.uses_domains(config) else None,
                                 logits=is_volumetric(config.data))
  val_cases = {s: data.cases["val"][s] for s in sources if data.cases["val"].get(s)}
  oracle_cases = {s: data.cases["test"][s] for s in data.held_out}

  def evaluate_for_selection(host_state) -> dict:
    variables = variables_of(host_state)
    common = dict(normalizer=data.normalizer, data_config=config.data, num_classes=data.num_classes,
                  batch_size=config.eval.batch_size, distances=False, domain_of=domain_of,
                  overlap=config.eval.overlap)
    out = {}
    if val_cases:
      out["val_dice"] = mean_dice(evaluate_cases(predict, variables, val_cases, **common))
    if config.eval.selection == "oracle":
      out["oracle_dice"] = mean_dice(evaluate_cases(predict, variables, oracle_cases, **common))
    return out

  # A method with phases (methods/base.Phases) gets one compiled step per phase, picked here
  # from the step number; the others run the one step they declare.
  phases = parts.step if isinstance(parts.step, Phases) else Phases((parts.step,), lambda step: 0)
  runners = [parallel.DataParallel(fn) for fn in phases.steps]
  runner = runners[0]  # replication, transfers: the same devices for every phase
  replicated = runner.replicate(state)
  base_key = np.asarray(state.rng)
  saved = ckpts.steps()
  last_good = saved[-1] if saved else None
  progress = _Progress(name, config.num_steps, start, config.progress_bar)

  def check_finite(done: int, metrics) -> None:
    bad = int(jax.device_get(replicated.first_bad_step)[0])
    if bad:
      loss = float(jax.device_get(metrics["loss"])[0])
      kept = (f"the last good checkpoint (step {last_good}) is kept in {ckpts.directory}"
              if last_good is not None else "no checkpoint had been written yet")
      raise TrainingDivergedError(
          f"training of {name!r} stopped: non-finite loss, gradient norm or parameters at step {bad} "
          f"(loss at step {done}: {loss}); {kept}. Fix: train again in a new --workdir (this one is "
          "tied to its config) with a lower optimizer.learning_rate or with optimizer.grad_clip_norm "
          "set, or check the data (python -m medgen_jax.data.check <data root>)")

  def device_batch(step: int):
    # Each process assembles only its rows of the step's global batch (same draws everywhere).
    rows = sampler.batch_at(step, block=parallel.process_block())
    return runner.put(rows, rows_only=True), jax.random.fold_in(base_key, step)

  # Training time between two logs, without evaluation, saving and the first step (compilation).
  train_seconds, tic, logged_step = 0.0, time.perf_counter(), start
  try:
    with parallel.Prefetcher(device_batch, range(start, config.num_steps), size=2) as batches:
      for step, (batch, key) in zip(range(start, config.num_steps), batches):
        replicated, metrics = runners[int(phases.schedule(step))].step_on_devices(replicated, batch, key)
        done = step + 1
        progress.step()
        if step == start:  # leave the compilation out of the throughput figure (one sync, once)
          jax.block_until_ready(replicated.first_bad_step)
          tic, logged_step = time.perf_counter(), done
        is_log = done % config.log_every == 0 or done == config.num_steps
        is_eval = done % config.eval_every == 0 or done == config.num_steps
        is_save = is_eval or done % config.checkpoint.every == 0
        if not (is_log or is_save):
          continue
        check_finite(done, metrics)  # waits for the device: the loop's only sync point
        train_seconds += time.perf_counter() - tic
        if is_log:
          scalars = {k: v[0] for k, v in jax.device_get(metrics).items()}
          steps_per_s = (done - logged_step) / train_seconds if done > logged_step else None
          if steps_per_s is not None:
            scalars["slices_per_s"] = steps_per_s * config.batch_size
          writer.write(done, "train", scalars)
          progress.log(done, float(scalars["loss"]), steps_per_s, config.batch_size)
          train_seconds, logged_step = 0.0, done
        if is_save:
          host_state = runner.unreplicate(replicated)
          selection_metrics = evaluate_for_selection(host_state) if is_eval else None
          if selection_metrics:
            writer.write(done, "eval", selection_metrics)
          sampler.step = done
          ckpts.save(done, host_state, meta={"sampler": sampler.state_dict(), "model": name},
                     metrics=selection_metrics or None)
          last_good = done
        tic = time.perf_counter()
  finally:
    progress.close()


# --- The run ---------------------------------------------------------------------------------------


def _check_domains(config, data: PreparedData, sources) -> None:
  """A model with domain-specific layers: every site it will be tested on passes the unseen-site
  policy; and each device's share of a batch holds every site equally where the step needs it:
  per-device BatchNorm statistics (bn_sync False) or a method whose per-domain branches split each
  shard by domain (its GROUPS_BY_DOMAIN, methods/base.py)."""
  for site in sorted(data.cases["test"]):  # held-out sites, and other sites' models under Separate
    domain_index(sources, site, policy=config.model.unseen_domain)
  per_device = config.batch_size // parallel.device_count()
  splits = getattr(methods.get(config.method), "GROUPS_BY_DOMAIN", False)
  if (splits or not config.bn_sync) and per_device % len(sources):
    raise ValueError(f"config.batch_size={config.batch_size}: {per_device} slices per device do not hold "
                     f"the {len(sources)} sites {sources} equally (domain-specific layers need every "
                     f"device's shard balanced). Fix: make batch_size / {parallel.device_count()} devices "
                     f"a multiple of {len(sources)}")


def _check_protocol(config, data: PreparedData) -> None:
  """Everything that can fail once the data is known, checked before the run claims its workdir:
  a selection rule the data cannot honour, samplers (batch size vs sites and episodes), the
  model's shape constraints. Warns about sites without a test split."""
  for _, sources in methods.model_runs(config, data.sources):
    make_sampler(config, data, sources)
    init_run_parts(config, data.num_classes, sources=sources, abstract=True)
    if methods.uses_domains(config):
      _check_domains(config, data, sources)
  if config.eval.selection == "val":
    for name, sources in methods.model_runs(config, data.sources):
      if not any(data.cases["val"].get(s) for s in sources):
        raise DataError.single(
            "config.eval.selection='val'",
            f"model {name!r} has no validation case (source sites {sources}; a site gets validation "
            f"cases only with >= 3 cases and data.split.val_fraction > 0)",
            "set eval.selection='last' (or 'oracle', labelled so), or give the sites more cases")
  untested = [s for s in data.sources if not data.cases["test"].get(s)]
  if untested:
    warnings.warn(f"source site(s) {untested} have no in-domain test case (too few cases for "
                  f"data.split.test_fraction={config.data.split.test_fraction}); results.md says so",
                  DataWarning, stacklevel=3)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  config_lib.validate(config)
  workdir = prepare_workdir(workdir)
  check_config(config, workdir)
  check_batch_fits_devices(config, parallel.device_count())
  resuming = (workdir / "config.json").is_file()
  # Every process decides before process 0 may write config.json (_save_run_files).
  parallel.barrier("medgen_jax.train_lib:resuming")
  if resuming and not (workdir / "splits.json").is_file():
    raise ValueError(f"{workdir}: holds a started run without its splits.json. Fix: restore the file, or "
                     "train again in a new --workdir")
  data = prepare_data(config.data, run_dir=workdir if resuming else None)
  _check_protocol(config, data)
  _save_run_files(config, data, workdir)
  trained = [train_one(config, data, name=name, sources=sources, workdir=workdir)
             for name, sources in methods.model_runs(config, data.sources)]
  return evaluate_models(config, data, trained, workdir)
