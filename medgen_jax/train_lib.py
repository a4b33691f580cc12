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
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from medgen_jax import config as config_lib
from medgen_jax import methods, parallel, report
from medgen_jax.checkpoint import Checkpoints, abstract_like
from medgen_jax.data.errors import DataError, DataWarning
from medgen_jax.data.nifti import write_bytes_atomic
from medgen_jax.data.pipeline import PreparedData, load_run_normalizer, prepare_data
from medgen_jax.data.sampler import EpisodicSampler, SliceSampler
from medgen_jax.data.splits import save_splits
from medgen_jax.evaluation import evaluate_cases
from medgen_jax.inference import make_predict_fn
from medgen_jax.methods.episodic import make_task_optimizer
from medgen_jax.models.metric import MetricNet
from medgen_jax.report import mean_dice
from medgen_jax.train_state import create_train_state, make_model, make_optimizer
from medgen_jax.writers import MetricWriter

# Keys that may change between a run and its resumption (they do not change what is computed).
RESUMABLE_KEYS = ("progress_bar", "log_every", "eval.batch_size", "eval.selection", "eval.distances",
                  "checkpoint.async_save")


class TrainingDivergedError(RuntimeError):
  pass


# --- The run folder -----------------------------------------------------------------------------


def config_from_json(payload: dict) -> ml_collections.ConfigDict:
  """A saved config.json back to a locked ConfigDict with the base config's types."""
  config = config_lib.base_config()

  def merge(target, values, prefix=""):
    for key, value in values.items():
      if key not in target:
        raise KeyError(f"config.json key {prefix}{key} is unknown to this medgen_jax version")
      if isinstance(target[key], ml_collections.ConfigDict):
        merge(target[key], value, f"{prefix}{key}.")
      else:
        target[key] = tuple(value) if isinstance(value, list) else value

  merge(config, payload)
  config.lock()
  return config


def load_run_config(workdir: str | Path) -> ml_collections.ConfigDict:
  """The config a run was started with; a ValueError naming the fix when there is none."""
  path = Path(workdir) / "config.json"
  if not path.is_file():
    raise ValueError(f"{path}: no run was started here (no config.json). Fix: give the --workdir of a "
                     "run made by python -m medgen_jax.train")
  try:
    return config_from_json(json.loads(path.read_text()))
  except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{path}: unreadable run config ({e}). Fix: use a run made by this medgen_jax "
                     "version, or train again in a new --workdir") from None


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_differences(saved: dict, current: dict) -> list[str]:
  """Dotted keys whose values differ between two config payloads (JSON dicts), ignoring the
  keys a run may change when it resumes (RESUMABLE_KEYS)."""
  saved, current = _flatten(saved), _flatten(current)
  return sorted(k for k in set(saved) | set(current)
                if saved.get(k) != current.get(k) and k not in RESUMABLE_KEYS)


def check_config(config, workdir: Path) -> None:
  """Refuses a workdir whose saved run had a different config."""
  path = workdir / "config.json"
  if path.is_file():
    differ = config_differences(json.loads(path.read_text()), json.loads(config.to_json()))
    if differ:
      raise ValueError(f"{path}: this workdir holds a run with a different config ({', '.join(differ)}). "
                       "Fix: use a new --workdir, or the same config to resume")


def save_config(config, workdir: Path) -> None:
  """Writes config.json (after `check_config`; process 0 only)."""
  check_config(config, workdir)
  if parallel.is_main_process():
    payload = json.loads(config.to_json())
    write_bytes_atomic(workdir / "config.json", (json.dumps(payload, indent=1, sort_keys=True) + "\n").encode())


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
class TrainedModel:
  name: str
  sources: list[str]
  model: object          # the evaluation model (no cross-device BatchNorm)
  variables: dict        # selected checkpoint's params and batch_stats (host arrays)
  step: int
  selection: str         # the rule that chose `step`: val | last | oracle


@dataclasses.dataclass
class RunParts:
  """What one model of a run trains: its networks, optimizers and initial state."""
  train_model: object
  eval_model: object
  tx: optax.GradientTransformation
  metric_model: object
  metric_tx: object
  task_tx: object
  state: object
  sync_bn: bool


def make_metric_network(config):
  """M_φ and its optimizer for MASF/SAML; (None, None) for the other methods."""
  if config.method not in methods.WITH_METRIC_NET:
    return None, None
  block = config[config.method]
  return MetricNet(tuple(block.metric_features)), optax.adam(block.metric_lr)


def init_run_parts(config, num_classes: int, *, abstract: bool = False) -> RunParts:
  """The networks, optimizers and initial state of one model. `abstract=True` gives the state
  as shapes only (jax.eval_shape: nothing is compiled or run), enough to restore a checkpoint."""
  in_shape = (1, *config.data.in_plane_shape, config.data.context_slices)
  sync = config.bn_sync and config.model.norm == "batch"
  train_model = make_model(config.model, num_classes=num_classes, dtype=config.dtype,
                           bn_axis_name=parallel.AXIS_NAME if sync else None)
  eval_model = make_model(config.model, num_classes=num_classes, dtype=config.dtype)
  tx = make_optimizer(config.optimizer, num_steps=config.num_steps)
  metric_model, metric_tx = make_metric_network(config)
  task_tx = make_task_optimizer(config)

  def initial_state():
    state = create_train_state(config.seed, train_model, tx, input_shape=in_shape)
    if metric_model is not None:
      phi = metric_model.init(jax.random.PRNGKey(config.seed + 7),
                              jnp.zeros((1, config.model.base_features)))["params"]
      state = state.replace(metric_params=phi, metric_opt_state=metric_tx.init(phi))
    if task_tx is not None:
      state = state.replace(task_opt_state=task_tx.init(state.params))
    return state

  state = jax.eval_shape(initial_state) if abstract else initial_state()
  return RunParts(train_model, eval_model, tx, metric_model, metric_tx, task_tx, state, sync)


def selection_key(selection: str) -> str:
  return "oracle_dice" if selection == "oracle" else "val_dice"


def restore_selected(ckpts: Checkpoints, template, *, selection: str, name: str, workdir: Path):
  """(state, step) of the checkpoint chosen by `selection`; one clear ValueError otherwise."""
  if not ckpts.steps():
    raise ValueError(f"{ckpts.directory}: model {name!r} has no checkpoint (the run stopped before its "
                     f"first save). Fix: resume the training: python -m medgen_jax.train --config <its config> "
                     f"--workdir {workdir}")
  restored = ckpts.restore_selected(abstract_like(template),
                                    rule="last" if selection == "last" else "best")
  if restored is None and selection != "last":
    raise ValueError(f"{workdir}: no checkpoint of {name!r} recorded {selection_key(selection)} (the run was "
                     f"trained with another eval.selection, or none of its checkpoints is readable). "
                     f"Fix: choose the selection the run was trained with, or 'last'")
  if restored is None:
    raise ValueError(f"{ckpts.directory}: no readable checkpoint. Fix: train again in a new --workdir")
  state, _, step = restored
  return state, step


# --- Training -------------------------------------------------------------------------------------


def make_sampler(config, data: PreparedData, sources):
  seed = config.seed + 1_000_003 * jax.process_index()
  if not methods.is_episodic(config.method):
    return SliceSampler(data.train, sites=sources, batch_size=config.batch_size, seed=seed)
  m = config.meta
  groups = m.meta_train_domains + m.meta_test_domains
  return EpisodicSampler(data.train, sites=sources, meta_train_domains=m.meta_train_domains,
                         meta_test_domains=m.meta_test_domains,
                         slices_per_domain=config.batch_size // groups, seed=seed)


def check_batch_fits_devices(config, num_devices: int) -> None:
  if methods.is_episodic(config.method):
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
  parts = init_run_parts(config, data.num_classes)
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
  # A batch is a pure function of (this process's seed, step): the step is the whole sampler
  # state (the checkpoint's copy is process 0's, whose seed differs from the other processes').
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
  return TrainedModel(name, list(sources), parts.eval_model,
                      {"params": final_state.params, "batch_stats": final_state.batch_stats},
                      step, config.eval.selection)


def _train_loop(config, data, parts: RunParts, state, sampler, ckpts, *, name, sources, start, writer):
  predict = make_predict_fn(parts.eval_model)
  val_cases = {s: data.cases["val"][s] for s in sources if data.cases["val"].get(s)}
  oracle_cases = {s: data.cases["test"][s] for s in data.held_out}

  def evaluate_for_selection(host_state) -> dict:
    variables = {"params": host_state.params, "batch_stats": host_state.batch_stats}
    common = dict(normalizer=data.normalizer, data_config=config.data, num_classes=data.num_classes,
                  batch_size=config.eval.batch_size, distances=False)
    out = {}
    if val_cases:
      out["val_dice"] = mean_dice(evaluate_cases(predict, variables, val_cases, **common))
    if config.eval.selection == "oracle":
      out["oracle_dice"] = mean_dice(evaluate_cases(predict, variables, oracle_cases, **common))
    return out

  runner = parallel.DataParallel(methods.MODULES[config.method].make_train_step(
      parts.train_model, parts.tx, config, num_classes=data.num_classes, axis_name=parallel.AXIS_NAME,
      bn_sync=parts.sync_bn, metric_model=parts.metric_model, metric_tx=parts.metric_tx,
      task_tx=parts.task_tx))
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
    return runner.put(sampler.batch_at(step)), jax.random.fold_in(base_key, step)

  # Training time between two logs, without evaluation, saving and the first step (compilation).
  train_seconds, tic, logged_step = 0.0, time.perf_counter(), start
  try:
    with parallel.Prefetcher(device_batch, range(start, config.num_steps), size=2) as batches:
      for step, (batch, key) in zip(range(start, config.num_steps), batches):
        replicated, metrics = runner.step_on_devices(replicated, batch, key)
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


# --- Evaluation -----------------------------------------------------------------------------------


def _selection_note(selection: str) -> str:
  return {"val": "checkpoint selected by mean Dice on the source sites' validation cases",
          "last": "last checkpoint (no selection)",
          "oracle": "ORACLE: checkpoint selected with the held-out (target) site's labels"}[selection]


METHOD_NAMES = {"deepall": "DeepAll", "mldg": "MLDG", "masf": "MASF", "saml": "SAML"}


def method_label(config, trained: TrainedModel) -> str:
  if config.method == "separate":
    base = f"Separate ({trained.sources[0]})"
  else:
    base = METHOD_NAMES[config.method]
    if methods.is_episodic(config.method) and config.meta.first_order:
      base += " (1st order)"
  if config.augment.enabled:
    base += " + BigAug"
  return base + (" [oracle]" if trained.selection == "oracle" else "")


def evaluate_models(config, data: PreparedData, trained_models, workdir: Path, *,
                    results_name: str = "results") -> dict:
  """Scores every trained model on the test cases of every site; writes <results_name>.{md,csv,json}."""
  records = []
  for trained in trained_models:
    def role_of(site, trained=trained):
      return "in-domain" if site in trained.sources else "unseen"
    predict = make_predict_fn(trained.model)
    records += evaluate_cases(predict, trained.variables, data.cases["test"],
                              normalizer=data.normalizer, data_config=config.data,
                              num_classes=data.num_classes, batch_size=config.eval.batch_size,
                              distances=config.eval.distances, method=method_label(config, trained),
                              role_of=role_of)
  sites = sorted(data.cases["test"])
  class_names = [data.info.labels[k] for k in sorted(data.info.labels) if k]
  rules = sorted({t.selection for t in trained_models})
  steps = ", ".join(f"{t.name}: step {t.step}" for t in trained_models)
  notes = [f"method {config.method}, sources {data.sources}, held out {data.held_out or 'none'}",
           f"selection rule: {'; '.join(_selection_note(r) for r in rules)} ({steps})",
           f"{config.num_steps} steps, batch {config.batch_size}, {config.data.in_plane_shape} slices, "
           f"normalization {config.data.normalization.name}, seed {config.seed}",
           "test volumes: a source site's own test split (in-domain) and every case of a held-out site (unseen)"]
  untested = [s for s in data.sources if not data.cases["test"].get(s)]
  if untested:
    notes.append(f"no in-domain test volume for source site(s) {untested} (too few cases for "
                 f"data.split.test_fraction={config.data.split.test_fraction}): their columns are empty")
  markdown = report.markdown_report(records, sites=sites, class_names=class_names,
                                    title="medgen_jax results", notes=notes)
  if parallel.is_main_process():
    write_bytes_atomic(workdir / f"{results_name}.md", (markdown + "\n").encode())
    write_bytes_atomic(workdir / f"{results_name}.csv", report.records_csv(records).encode())
    write_bytes_atomic(workdir / f"{results_name}.json", json.dumps(
        {"selection": rules[0] if len(rules) == 1 else rules,
         "steps": {t.name: t.step for t in trained_models}, "records": records}, indent=1).encode())
  return {"records": records, "markdown": markdown}


def _model_runs(config, sources):
  if config.method == "separate":
    return [(f"separate_{site}", [site]) for site in sources]
  return [(config.method, list(sources))]


def _check_protocol(config, data: PreparedData) -> None:
  """Everything that can fail once the data is known, checked before the run claims its workdir:
  a selection rule the data cannot honour, samplers (batch size vs sites and episodes), the
  model's shape constraints. Warns about sites without a test split."""
  for _, sources in _model_runs(config, data.sources):
    make_sampler(config, data, sources)
  init_run_parts(config, data.num_classes, abstract=True)
  if config.eval.selection == "val":
    for name, sources in _model_runs(config, data.sources):
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


def _prepare_workdir(workdir) -> Path:
  workdir = Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f"--workdir {workdir} is a file, not a folder. Fix: give a folder path")
  workdir.mkdir(parents=True, exist_ok=True)
  return workdir


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  config_lib.validate(config)
  workdir = _prepare_workdir(workdir)
  check_config(config, workdir)
  check_batch_fits_devices(config, jax.local_device_count())
  resuming = (workdir / "config.json").is_file()
  if resuming and not (workdir / "splits.json").is_file():
    raise ValueError(f"{workdir}: holds a started run without its splits.json. Fix: restore the file, or "
                     "train again in a new --workdir")
  data = prepare_data(config.data, run_dir=workdir if resuming else None)
  _check_protocol(config, data)
  _save_run_files(config, data, workdir)
  trained = [train_one(config, data, name=name, sources=sources, workdir=workdir)
             for name, sources in _model_runs(config, data.sources)]
  return evaluate_models(config, data, trained, workdir)


def restore_models(config, workdir: Path, *, num_classes: int, sources: list[str]) -> list[TrainedModel]:
  """The selected checkpoint of every model of a finished run (no training step is taken)."""
  trained = []
  for name, model_sources in _model_runs(config, sources):
    parts = init_run_parts(config, num_classes, abstract=True)
    ckpts = Checkpoints(workdir / name / "checkpoints", keep=config.checkpoint.keep,
                        selection_key=selection_key(config.eval.selection), read_only=True)
    try:
      state, step = restore_selected(ckpts, parts.state, selection=config.eval.selection, name=name,
                                     workdir=workdir)
    finally:
      ckpts.close()
    trained.append(TrainedModel(name, model_sources, parts.eval_model,
                                {"params": state.params, "batch_stats": state.batch_stats}, step,
                                config.eval.selection))
  return trained


def evaluate_run(config, workdir: str | Path) -> dict:
  """Re-evaluates a run from its checkpoints, split and normalizer (no training step). Under the
  run's own selection rule it rewrites results.*; under another (`config.eval.selection` changed)
  it writes results_<rule>.*, so results.md keeps describing what predict uses."""
  workdir = Path(workdir)
  if not (workdir / "splits.json").is_file():
    raise ValueError(f"{workdir}: no splits.json (the run never started). Fix: train first "
                     f"(python -m medgen_jax.train --workdir {workdir} ...)")
  data = prepare_data(config.data, run_dir=workdir, build_train=False)
  trained = restore_models(config, workdir, num_classes=data.num_classes, sources=data.sources)
  own_rule = load_run_config(workdir).eval.selection
  name = "results" if config.eval.selection == own_rule else f"results_{config.eval.selection}"
  return evaluate_models(config, data, trained, workdir, results_name=name)


def load_trained_models(workdir: str | Path, *, selection: str | None = None):
  """(config, normalizer, [TrainedModel]) of a run, without its dataset: for prediction."""
  workdir = Path(workdir)
  config = load_run_config(workdir)
  if selection is not None:
    if selection not in config_lib.SELECTIONS:
      raise ValueError(f"selection {selection!r}: use one of {', '.join(config_lib.SELECTIONS)}")
    config.eval.selection = selection
  info_path = workdir / "data_info.json"
  if not info_path.is_file():
    raise ValueError(f"{info_path}: missing (the run never started, or predates this file). Fix: train "
                     f"the run with this medgen_jax version")
  info = json.loads(info_path.read_text())
  normalizer = load_run_normalizer(workdir / "normalizer.json", config.data.normalization)
  models = restore_models(config, workdir, num_classes=int(info["num_classes"]), sources=info["sources"])
  return config, normalizer, models
