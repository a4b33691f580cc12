"""`train_and_evaluate(config, workdir)`: train, select, evaluate, write results. Resumable.

Run layout (`workdir`):
  config.json                the resolved config (a different config in the same workdir is an error)
  splits.json                the case split used
  normalizer.json            the fitted intensity normalization
  <model>/checkpoints/<step> orbax checkpoints (latest N + best by the selection metric)
  metrics.jsonl              one record per log step and per evaluation
  tensorboard/               event files
  results.md, results.csv, results.json

Model selection ("selection rule" in every table): `val` = best mean Dice on the source sites'
validation cases (default, honest); `last` = final step; `oracle` = best Dice on the held-out
(target) site's labels, labelled "oracle" wherever it appears.

A restart with the same config continues from the newest readable checkpoint (params, optimizer
state, step, PRNG key and sampler state) and ends bit-identical on CPU to an uninterrupted run.
A non-finite loss stops training with `TrainingDivergedError`; the bad state is not saved.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from medgen_jax import config as config_lib
from medgen_jax import methods, parallel, report
from medgen_jax.checkpoint import Checkpoints, abstract_like
from medgen_jax.data.nifti import write_bytes_atomic
from medgen_jax.data.pipeline import PreparedData, prepare_data
from medgen_jax.data.sampler import EpisodicSampler, SliceSampler
from medgen_jax.evaluate import evaluate_cases
from medgen_jax.report import mean_dice
from medgen_jax.inference import make_predict_fn
from medgen_jax.methods.episodic import make_task_optimizer
from medgen_jax.models.metric import MetricNet
from medgen_jax.train_state import create_train_state, make_model, make_optimizer
from medgen_jax.writers import MetricWriter

# Keys that may change between a run and its resumption (they do not change what is computed).
RESUMABLE_KEYS = ("progress_bar", "log_every", "eval.batch_size", "eval.selection", "eval.distances",
                  "checkpoint.async_save")


class TrainingDivergedError(RuntimeError):
  pass


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


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def save_config(config, workdir: Path) -> None:
  """Writes config.json; refuses to reuse a workdir whose saved run had a different config."""
  payload = json.loads(config.to_json())
  path = workdir / "config.json"
  if path.is_file():
    saved = _flatten(json.loads(path.read_text()))
    current = _flatten(payload)
    differ = sorted(k for k in set(saved) | set(current)
                    if saved.get(k) != current.get(k) and k not in RESUMABLE_KEYS)
    if differ:
      raise ValueError(f"{path}: this workdir holds a run with a different config ({', '.join(differ)}). "
                       "Fix: use a new --workdir, or the same config to resume")
  if parallel.is_main_process():
    write_bytes_atomic(path, (json.dumps(payload, indent=1, sort_keys=True) + "\n").encode())


@dataclasses.dataclass
class TrainedModel:
  name: str
  sources: list[str]
  model: object          # the evaluation model (no cross-device BatchNorm)
  variables: dict        # selected checkpoint's params and batch_stats (host arrays)
  step: int
  selection: str


def _progress(total, initial, enabled):
  if not enabled or not parallel.is_main_process():
    return None
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=None)  # off without a TTY


def train_one(config, data: PreparedData, *, name: str, sources: list[str], workdir: Path,
              writer) -> TrainedModel:
  """Trains one model on `sources` (resuming from its checkpoints) and restores the selected one."""
  num_classes = data.num_classes
  in_shape = (1, *config.data.in_plane_shape, config.data.context_slices)
  sync = config.bn_sync and config.model.norm == "batch"
  train_model = make_model(config.model, num_classes=num_classes, dtype=config.dtype,
                           bn_axis_name=parallel.AXIS_NAME if sync else None)
  eval_model = make_model(config.model, num_classes=num_classes, dtype=config.dtype)
  tx = make_optimizer(config.optimizer, num_steps=config.num_steps)
  state = create_train_state(config.seed, train_model, tx, input_shape=in_shape)
  metric_model, metric_tx = make_metric_network(config)
  if metric_model is not None:
    phi = metric_model.init(jax.random.PRNGKey(config.seed + 7),
                            jnp.zeros((1, config.model.base_features)))["params"]
    state = state.replace(metric_params=phi, metric_opt_state=metric_tx.init(phi))
  task_tx = make_task_optimizer(config)
  if task_tx is not None:
    state = state.replace(task_opt_state=task_tx.init(state.params))
  sampler = make_sampler(config, data, sources)
  selection_key = "oracle_dice" if config.eval.selection == "oracle" else "val_dice"
  ckpts = Checkpoints(workdir / name / "checkpoints", keep=config.checkpoint.keep,
                      selection_key=selection_key, save_async=config.checkpoint.async_save)
  restored = ckpts.restore_latest(abstract_like(state))
  if restored is not None:
    state, meta, _ = restored
    sampler.load_state_dict(meta["sampler"])
  start = int(state.step)
  predict = make_predict_fn(eval_model)
  val_cases = {s: data.cases["val"][s] for s in sources if data.cases["val"].get(s)}
  oracle_cases = {s: data.cases["test"][s] for s in data.held_out}

  def evaluate_for_selection(host_state) -> dict:
    variables = {"params": host_state.params, "batch_stats": host_state.batch_stats}
    out = {}
    common = dict(normalizer=data.normalizer, data_config=config.data, num_classes=num_classes,
                  batch_size=config.eval.batch_size, distances=False)
    if val_cases:
      out["val_dice"] = mean_dice(evaluate_cases(predict, variables, val_cases, **common))
    if config.eval.selection == "oracle":
      out["oracle_dice"] = mean_dice(evaluate_cases(predict, variables, oracle_cases, **common))
    return out

  if start < config.num_steps:
    runner = parallel.DataParallel(methods.MODULES[config.method].make_train_step(
        train_model, tx, config, num_classes=num_classes, axis_name=parallel.AXIS_NAME,
        bn_sync=sync, metric_model=metric_model, metric_tx=metric_tx, task_tx=task_tx))
    check_batch_fits_devices(config, runner.num_devices)
    replicated = runner.replicate(state)
    base_key = np.asarray(state.rng)
    bar = _progress(config.num_steps, start, config.progress_bar)
    saved_steps = ckpts.steps()
    last_good = saved_steps[-1] if saved_steps else None
    tic, tic_step = time.perf_counter(), start
    for step in range(start, config.num_steps):
      batch = next(sampler)
      key = jax.random.fold_in(base_key, step)
      replicated, step_metrics = runner.step(replicated, batch, key)
      loss = float(step_metrics["loss"])
      if not math.isfinite(loss):
        ckpts.close()
        kept = (f"the last good checkpoint (step {last_good}) is kept in {ckpts.directory}"
                if last_good is not None else "no checkpoint had been written yet")
        raise TrainingDivergedError(
            f"training of {name!r} stopped: non-finite loss ({loss}) at step {step + 1}; {kept}. "
            "Fix: lower optimizer.learning_rate, set optimizer.grad_clip_norm, or check the data "
            "(python -m medgen_jax.data.check)")
      done = step + 1
      if bar is not None:
        bar.update(1)
        if done % 10 == 0 or done == config.num_steps:
          bar.set_postfix(loss=f"{loss:.3f}")
      if done % config.log_every == 0 or done == config.num_steps:
        elapsed = time.perf_counter() - tic
        scalars = {k: v for k, v in jax.device_get(step_metrics).items()}
        scalars["slices_per_s"] = (done - tic_step) * config.batch_size / max(elapsed, 1e-9)
        writer.write(done, "train", scalars)
        tic, tic_step = time.perf_counter(), done
      is_eval = done % config.eval_every == 0 or done == config.num_steps
      if is_eval or done % config.checkpoint.every == 0:
        host_state = runner.unreplicate(replicated)
        selection_metrics = evaluate_for_selection(host_state) if is_eval else None
        if selection_metrics:
          writer.write(done, "eval", selection_metrics)
        ckpts.save(done, host_state, meta={"sampler": sampler.state_dict(), "model": name},
                   metrics=selection_metrics if selection_metrics and selection_key in selection_metrics else None)
        last_good = done
        tic = time.perf_counter()  # evaluation and saving are not training throughput
    if bar is not None:
      bar.close()
  ckpts.wait()

  if config.eval.selection == "last":
    chosen = ckpts.steps()[-1]
  else:
    chosen = ckpts.best_step() or ckpts.steps()[-1]
  final_state, _ = ckpts.restore(chosen, abstract_like(state))
  ckpts.close()
  return TrainedModel(name, list(sources), eval_model,
                      {"params": final_state.params, "batch_stats": final_state.batch_stats},
                      chosen, config.eval.selection)


def make_metric_network(config):
  """M_φ and its optimizer for MASF/SAML; (None, None) for the other methods."""
  if config.method not in methods.WITH_METRIC_NET:
    return None, None
  block = config[config.method]
  return MetricNet(tuple(block.metric_features)), optax.adam(block.metric_lr)


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


def evaluate_models(config, data: PreparedData, trained_models, workdir: Path) -> dict:
  """Scores every trained model on the test cases of every site; writes results.*."""
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
  steps = ", ".join(f"{t.name}: step {t.step}" for t in trained_models)
  notes = [f"method {config.method}, sources {data.sources}, held out {data.held_out or 'none'}",
           f"selection rule: {_selection_note(config.eval.selection)} ({steps})",
           f"{config.num_steps} steps, batch {config.batch_size}, {config.data.in_plane_shape} slices, "
           f"normalization {config.data.normalization.name}, seed {config.seed}",
           "test volumes: a source site's own test split (in-domain) and every case of a held-out site (unseen)"]
  markdown = report.markdown_report(records, sites=sites, class_names=class_names,
                                    title="medgen_jax results", notes=notes)
  if parallel.is_main_process():
    write_bytes_atomic(workdir / "results.md", (markdown + "\n").encode())
    write_bytes_atomic(workdir / "results.csv", report.records_csv(records).encode())
    write_bytes_atomic(workdir / "results.json", json.dumps(
        {"selection": config.eval.selection, "steps": {t.name: t.step for t in trained_models},
         "records": records}, indent=1).encode())
  return {"records": records, "markdown": markdown}


def _model_runs(config, data):
  if config.method == "separate":
    return [(f"separate_{site}", [site]) for site in data.sources]
  return [(config.method, list(data.sources))]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  config_lib.validate(config)
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  save_config(config, workdir)
  data = prepare_data(config.data, workdir=workdir)
  if parallel.is_main_process():
    write_bytes_atomic(workdir / "normalizer.json", json.dumps(data.normalizer.to_dict(), indent=1).encode())
  trained = []
  for name, sources in _model_runs(config, data):
    writer = MetricWriter(workdir, prefix=name if config.method == "separate" else "")
    try:
      trained.append(train_one(config, data, name=name, sources=sources, workdir=workdir, writer=writer))
    finally:
      writer.close()
  return evaluate_models(config, data, trained, workdir)


def evaluate_run(config, workdir: str | Path) -> dict:
  """Re-evaluates a finished run from its checkpoints (no training step is taken)."""
  workdir = Path(workdir)
  config.data.split_file = config.data.split_file or str(workdir / "splits.json")
  data = prepare_data(config.data, workdir=None)
  trained = []
  for name, sources in _model_runs(config, data):
    if not (workdir / name / "checkpoints").is_dir():
      raise FileNotFoundError(f"{workdir / name / 'checkpoints'}: no checkpoints. Fix: train first "
                              f"(python -m medgen_jax.train --workdir {workdir} ...)")
    steps_config = config.copy_and_resolve_references()
    with steps_config.unlocked():
      steps_config.num_steps = 0  # restore only
    trained.append(train_one(steps_config, data, name=name, sources=sources, workdir=workdir,
                             writer=None))
  return evaluate_models(config, data, trained, workdir)
