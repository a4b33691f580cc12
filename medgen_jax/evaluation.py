"""Scoring whole volumes and trained runs: the evaluation library below the trainer and the CLIs.

`evaluate_cases` predicts every volume of every site (medgen_jax/inference.predict_case: slice by
slice, or by sliding-window inference on 3-D patches when `data.patch_size` is set) and scores it
in 3-D per foreground class (medgen_jax/metrics.py): Dice and, with `distances`, ASSD and HD95 in mm.
`restore_models` / `evaluate_models` / `evaluate_run` / `load_trained_models` restore a run's
selected checkpoints through its method's interface (the evaluation network and its variables,
methods/base.py) and write the results tables; train_lib, evaluate, predict and sweep import them
from here (this module imports none of them).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax

from medgen_jax import config as config_lib
from medgen_jax import methods, metrics, parallel, report
from medgen_jax.checkpoint import Checkpoints, abstract_like
from medgen_jax.data.nifti import write_bytes_atomic
from medgen_jax.data.pipeline import load_run_normalizer, prepare_data
from medgen_jax.inference import is_volumetric, make_predict_fn, predict_case
from medgen_jax.methods.base import RunInfo, domain_index
from medgen_jax.paths import as_path
from medgen_jax.runs import load_run_config


def evaluate_cases(predict_fn, variables, cases_by_site, *, normalizer, data_config, num_classes: int,
                   batch_size: int, distances: bool = True, method: str = "", role_of=None,
                   domain_of=None, overlap: float = 0.5) -> list[dict]:
  """One record per volume: per-class Dice (and ASSD/HD95 in mm), the empty-mask flags.
  `domain_of(site)`: the domain id a domain-specific network is applied with (None: not one).
  3-D patch models (data_config.patch_size): `predict_fn` returns logits (predictor(...,
  logits=True)), `batch_size` patches per forward, sliding windows overlapping by `overlap`."""
  records = []
  for site, cases in cases_by_site.items():
    for case in cases:
      pred = predict_case(predict_fn, variables, case.image, case.spacing, normalizer=normalizer,
                          data_config=data_config, batch_size=batch_size, overlap=overlap, site=case.site,
                          domain=domain_of(case.site) if domain_of else None)
      scores = metrics.score_volume(pred, case.label, num_classes=num_classes, spacing=case.spacing,
                                    distances=distances)
      records.append({"method": method, "site": site, "case": case.case_id,
                      "role": role_of(site) if role_of else "", **scores})
  return records


# --- Trained models of a run: restore, score, report ---------------------------------------------


@dataclasses.dataclass
class TrainedModel:
  name: str
  sources: list[str]
  model: object          # the evaluation network (no cross-device BatchNorm), from the method
  variables: dict        # its variables in the selected checkpoint (host arrays)
  step: int
  selection: str         # the rule that chose `step`: val | last | oracle
  # Domain-specific layers (methods.uses_domains): the unseen-site policy (model.unseen_domain);
  # None = a network without them.
  domain_policy: str | None = None

  def predictor(self, *, logits: bool = False):
    """(predict_fn, domain_of): the jitted prediction and the site -> domain-id map it needs
    (None for a network without domain-specific layers). `logits`: as `predictor`."""
    return predictor(self.model, self.sources, self.domain_policy, logits=logits)


def predictor(model, sources, domain_policy: str | None, *, logits: bool = False):
  """(predict_fn, domain_of) of an evaluation network; `logits=True` (3-D patch models, whose
  sliding windows blend logits: inference.is_volumetric) returns logits instead of labels."""
  if domain_policy is None:
    return make_predict_fn(model, logits=logits), None
  return (make_predict_fn(model, domains=True, logits=logits),
          functools.partial(domain_index, tuple(sources), policy=domain_policy))


def run_info(config, num_classes: int, sources=()) -> RunInfo:
  """What a method is told about one model (methods/base.py): classes, input shape (one slice
  (H, W, context_slices), or one 3-D patch (D, H, W, 1) with data.patch_size set), the trainer's
  data-parallel axis, the model's training sites (its domains)."""
  if is_volumetric(config.data):
    input_shape = (*config.data.patch_size, 1)
  else:
    input_shape = (*config.data.in_plane_shape, config.data.context_slices)
  return RunInfo(num_classes=num_classes, input_shape=tuple(input_shape),
                 axis_name=parallel.AXIS_NAME, domains=tuple(sources))


def abstract_state(config, num_classes: int, sources=()):
  """The method's TrainState as shapes only (jax.eval_shape: nothing runs), to restore into."""
  module = methods.get(config.method)
  info = run_info(config, num_classes, sources)
  return jax.eval_shape(lambda: module.init_state(jax.random.PRNGKey(config.seed), config, info))


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


def trained_model(config, num_classes: int, state, *, name: str, sources, step: int) -> TrainedModel:
  """The method's evaluation network and its variables in `state`."""
  model, variables_of = methods.get(config.method).eval_network(config, run_info(config, num_classes, sources))
  policy = config.model.unseen_domain if methods.uses_domains(config) else None
  return TrainedModel(name, list(sources), model, jax.device_get(variables_of(state)), step,
                      config.eval.selection, policy)


def restore_models(config, workdir: Path, *, num_classes: int, sources: list[str]) -> list[TrainedModel]:
  """The selected checkpoint of every model of a finished run (no training step is taken)."""
  trained = []
  for name, model_sources in methods.model_runs(config, sources):
    ckpts = Checkpoints(workdir / name / "checkpoints", keep=config.checkpoint.keep,
                        selection_key=selection_key(config.eval.selection), read_only=True)
    try:
      state, step = restore_selected(ckpts, abstract_state(config, num_classes, model_sources),
                                     selection=config.eval.selection, name=name, workdir=workdir)
    finally:
      ckpts.close()
    trained.append(trained_model(config, num_classes, state, name=name, sources=model_sources, step=step))
  return trained


def _selection_note(selection: str) -> str:
  return {"val": "checkpoint selected by mean Dice on the source sites' validation cases",
          "last": "last checkpoint (no selection)",
          "oracle": "ORACLE: checkpoint selected with the held-out (target) site's labels"}[selection]


def method_label(config, trained: TrainedModel) -> str:
  return methods.label(config, trained.sources) + (" [oracle]" if trained.selection == "oracle" else "")


def evaluate_models(config, data, trained_models, workdir: Path, *, results_name: str = "results") -> dict:
  """Scores every trained model on the test cases of every site; writes <results_name>.{md,csv,json}."""
  records = []
  for trained in trained_models:
    def role_of(site, trained=trained):
      return "in-domain" if site in trained.sources else "unseen"
    predict, domain_of = trained.predictor(logits=is_volumetric(config.data))
    records += evaluate_cases(predict, trained.variables, data.cases["test"],
                              normalizer=data.normalizer, data_config=config.data,
                              num_classes=data.num_classes, batch_size=config.eval.batch_size,
                              distances=config.eval.distances, method=method_label(config, trained),
                              role_of=role_of, domain_of=domain_of, overlap=config.eval.overlap)
  sites = sorted(data.cases["test"])
  class_names = [data.info.labels[k] for k in sorted(data.info.labels) if k]
  rules = sorted({t.selection for t in trained_models})
  steps = ", ".join(f"{t.name}: step {t.step}" for t in trained_models)
  if is_volumetric(config.data):
    inputs = (f"{tuple(config.data.patch_size)} patches (sliding-window inference, overlap "
              f"{config.eval.overlap})")
  else:
    inputs = f"{config.data.in_plane_shape} slices"
  notes = [f"method {config.method}, sources {data.sources}, held out {data.held_out or 'none'}",
           f"selection rule: {'; '.join(_selection_note(r) for r in rules)} ({steps})",
           f"{config.num_steps} steps, batch {config.batch_size}, {inputs}, "
           f"normalization {config.data.normalization.name}, seed {config.seed}"]
  if config.data.get("target_adaptation"):
    notes.append("unsupervised adaptation: the held-out sites' train+val cases were seen without labels "
                 "during training; their test cases (scored here) were not seen at all")
    notes.append("test volumes: a source site's own test split (in-domain) and a held-out site's test split (unseen)")
  else:
    notes.append("test volumes: a source site's own test split (in-domain) and every case of a held-out site (unseen)")
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


def evaluate_run(config, workdir: str | Path) -> dict:
  """Re-evaluates a run from its checkpoints, split and normalizer (no training step). Under the
  run's own selection rule it rewrites results.*; under another (`config.eval.selection` changed)
  it writes results_<rule>.*, so results.md keeps describing what predict uses."""
  workdir = as_path(workdir)
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
  workdir = as_path(workdir)
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
