"""Leave-one-domain-out sweep over one or more configs, seeds and held-out sites.

    python -m medgen_jax.sweep --config configs/deepall_brain.py:quick --config configs/masf_brain.py:quick \\
        --held-out all --seeds 3 --workdir runs/sweep [--set num_steps=300 ...]

For every config × held-out site × seed it trains (medgen_jax.train_lib.train_and_evaluate) in
`DIR/<config>/<site>/seed<k>`, with `data.held_out = (site,)` and `seed = k` (initialization and
sampling; the case split stays fixed by `data.split.seed`). The config's `data.sites` is honoured:
the held-out sites are chosen among them (`--held-out all` = every site of `data.sites`, or every
site of the dataset when it is empty) and the other sites of `data.sites` are the sources.

Runs already in DIR: a finished run (results.json present) is not redone and an interrupted one
resumes from its checkpoints, but only if its `config.json` equals the config the sweep would run
now (`runs.config_differences`, the trainer's own rule: keys in `runs.RESUMABLE_KEYS` may differ)
and, for a finished run, its results were selected by the same `eval.selection`. Otherwise the
sweep REFUSES before training anything, one line per such run naming the run dir and the
differing keys (fix: a new --workdir, or delete the run dir); it never reports old runs under new
settings and never overwrites them.

Bad `--config`/`--set` (unknown key, wrong type, item without '=') and invalid configs: one line,
exit 2, before any training. A run that fails while training (bad data, divergence, disk error)
is reported on one line and the sweep goes on with the other runs; the table is written for the
runs that finished, lists the failed ones, and the exit status is 1.

Output: `DIR/sweep.md` and `DIR/sweep.csv`: rows are methods, columns the held-out sites and their
average, cells the held-out site's mean Dice (%) as mean ± std over seeds (`(n=k)` when fewer
seeds finished than asked for), with the model selection rule stated. `--metrics dice,asd` adds
an ASD (mm) table of the same layout (mean ASSD over the held-out volumes and foreground classes;
'—' for runs trained with eval.distances=False) and an `unseen_asd` CSV column.

Method `intra_site` (the upper reference) trains on the held-out site's own training cases:
for it the sweep sets `data.sites = (site,)`, `data.held_out = ()` and scores the site's own test
split, its row labelled "[target labels]".

Number of source sites (`--num-sources 1,2,3` or `all`, with `--combinations all|N` and
`--combination-seed`): every config × held-out site × k × combination of k of the other sites ×
seed, held-out Dice (and ASD) against k in `DIR/num_sources.{md,csv,png}` (medgen_jax/num_sources.py):
    python -m medgen_jax.sweep --num-sources all --config configs/deepall_brain.py:quick \
        --held-out D --seeds 2 --workdir runs/num_sources_brain
Unsupervised domain adaptation (`--uda`): every config × direction × seed, a direction being
`SOURCE:TARGET` (`--directions MR:CT,CT:MR`; default every ordered pair of sites):

    python -m medgen_jax.sweep --uda --config configs/source_only_cardiac.py:quick \
        --config configs/dann_cardiac.py:quick ... --config configs/supervised_target_cardiac.py:quick \
        --directions MR:CT,CT:MR --seeds 2 --workdir runs/uda_cardiac

trains in `DIR/<config>/<SOURCE>_to_<TARGET>/seed<k>` with `data.sites = (SOURCE,)`,
`data.held_out = (TARGET,)`, `data.target_adaptation = True` (the target's train+val cases
unlabelled, its test cases scored), except `supervised_target`, which trains on the target with
its labels (`data.sites = (TARGET,)`) and is tested on the same target test cases. The table, one
per direction like the talk's cardiac table: rows the configs in the order given, columns Dice
(%) and ASD (mm) per structure and their mean over structures, on the target's test volumes,
mean ± std over seeds; `DIR/sweep.csv` has every run × structure.

Multi-site learning (`--multisite`): every config × seed with the config's own sites (no site
held out; each site tested on its own test cases), as in the talk's MS-Net tables:

    python -m medgen_jax.sweep --multisite --config configs/multisite/separate.py:quick \
        --config configs/multisite/joint.py:quick --config configs/multisite/dsbn.py:quick \
        --seeds 2 --workdir runs/multisite

trains in `DIR/<config>/seed<k>`. The table: one row per method label, bias-field correction and
intensity normalization (columns `BFC`, `Intensities`), columns per site and `Overall`, cells the
mean ± std over the test volumes of every seed of the per-volume mean foreground Dice (%);
`Separate` gets one row per site model over all sites (the cross-site matrix) and a `Separate`
row made of each site's own model. `DIR/sweep.csv` has every run × volume.

Clusters (any mode above). Every run is resumable and idempotent, so the grid can be split over
machines and gathered afterwards; the scheduling is Slurm's or submitit's, not this module's:

  * `--shard K/N`: this process runs only the K-th of N disjoint slices that together cover the
    planned runs (`shard_indices`: runs ranked by their folder, every N-th from the K-th), e.g.
    one per machine or per Slurm array task (`--shard $((SLURM_ARRAY_TASK_ID + 1))/N`). Every
    shard must get the same command; a shard writes no table.
  * `--executor slurm|local`: one submitit job per run not finished yet, submitted as one job array
    (`executor.map_array`), each job calling `attempt_run` — the function the sweep calls for a run
    in its own process — pickled by submitit; the sweep waits and writes the table, or exits at
    once with `--no-wait`. A job that reaches its time limit or is preempted is requeued by
    submitit and resumes from its checkpoints. `local` starts every job at once as a subprocess
    of this machine (the tests' stand-in for Slurm).
  * `--report`: trains nothing; the table of the runs that have finished (`results.json`) in
    `DIR`, the others listed as not finished (started, i.e. resumable, or not started). The same
    refusal of runs with other settings applies.
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import difflib
import io
import json
import runpy
import sys
from pathlib import Path

import ml_collections
import numpy as np

from medgen_jax.data.errors import DataError
from medgen_jax.data.layouts import discover
from medgen_jax.paths import as_path, write_bytes_atomic
from medgen_jax.report import mean_dice

SELECTION_RULES = {"val": "best mean Dice on the source sites' validation cases",
                   "last": "last checkpoint", "oracle": "ORACLE (held-out labels)"}


class SweepConfigError(ValueError):
  """A bad --config or --set: reported on one line, exit status 2."""


def _parse_value(text: str, current):
  """A Python literal; else, for a tuple-valued key, comma-separated items; else the text."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    pass
  if isinstance(current, tuple):
    items = [t.strip() for t in text.split(",") if t.strip()]
    return tuple(_parse_value(t, None) for t in items)
  return text


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
  """Applies one `--set KEY=VALUE` to an unlocked-or-locked config; SweepConfigError if bad."""
  key, sep, text = item.partition("=")
  key = key.strip()
  if not sep or not key:
    raise SweepConfigError(f"--set {item!r}: not of the form KEY=VALUE. Fix: write e.g. --set num_steps=300")
  target = config
  *parents, last = key.split(".")
  for depth, name in enumerate(parents + [last]):
    if not isinstance(target, ml_collections.ConfigDict) or name not in target:
      options = list(target.keys()) if isinstance(target, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(name, options, n=1)
      hint = f"did you mean {'.'.join(parents[:depth] + close)!r}?" if close else \
             "see medgen_jax/config.py for the keys"
      raise SweepConfigError(f"--set {item}: unknown config key {key!r}. Fix: {hint}")
    if depth < len(parents):
      target = target[name]
  current = target[last]
  if isinstance(current, ml_collections.ConfigDict):
    raise SweepConfigError(f"--set {item}: {key!r} is a group of keys, not a value. "
                           f"Fix: set one of its keys, e.g. {key}.{next(iter(current.keys()))}=...")
  value = _parse_value(text, current)
  if isinstance(value, list):
    value = tuple(value)
  if value is None and current is not None:
    raise SweepConfigError(f"--set {item}: {key} cannot be None. Fix: give a "
                           f"{type(current).__name__} value like the default {current!r}")
  try:
    target[last] = value
  except (TypeError, ValueError):
    kind = type(current).__name__ if current is not None else "this key's type"
    raise SweepConfigError(f"--set {item}: {value!r} is a {type(value).__name__}, but {key} takes a "
                           f"value of type {kind}. Fix: e.g. --set {key}={current!r}") from None


def load_config(spec: str, overrides=()) -> ml_collections.ConfigDict:
  """'path.py' or 'path.py:arg' -> locked ConfigDict, with `key=value` overrides applied."""
  path, _, arg = spec.partition(":")
  if not Path(path).is_file():
    raise SweepConfigError(f"--config {spec}: {path} does not exist. Fix: give a config file, e.g. "
                           "configs/deepall_brain.py:quick")
  try:
    get_config = runpy.run_path(path).get("get_config")
    if get_config is None:
      raise SweepConfigError(f"--config {spec}: {path} defines no get_config(). "
                             "Fix: define get_config(arg=None) returning a ConfigDict")
    config = get_config(arg) if arg else get_config()
  except SweepConfigError:
    raise
  except Exception as e:  # the config file is user code: any error is reported on one line
    message = " ".join(str(e).split())
    raise SweepConfigError(f"--config {spec}: loading {path} failed ({type(e).__name__}: {message}). "
                           "Fix: correct the config file or its argument") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise SweepConfigError(f"--config {spec}: get_config returned {type(config).__name__}, "
                           "not a ConfigDict. Fix: return config.base_config() with overrides")
  config.lock()
  for item in overrides:
    apply_override(config, item)
  return config


def config_name(spec: str) -> str:
  path, _, arg = spec.partition(":")
  return Path(path).stem + (f"_{arg}" if arg else "")


def sites_of(config) -> list[str]:
  """The config's `data.sites` (checked to exist) or, when empty, every site of the dataset."""
  from medgen_jax.data.pipeline import ensure_dataset  # imports JAX; keep `--help` fast
  root = ensure_dataset(config.data)
  _, by_site, problems = discover(root, layout=config.data.layout, sites=list(config.data.sites) or None,
                                  channel=None if config.data.channel < 0 else config.data.channel,
                                  site_csv=config.data.msd.site_csv, site_pattern=config.data.msd.site_pattern)
  if problems:
    raise DataError(problems)
  return list(by_site)


def check_existing_run(config, run_dir: Path) -> str | None:
  """None if `run_dir` is new or holds a run of `config` (reusable); else why it is refused."""
  fix = f"Fix: use a new --workdir, or delete {run_dir} to redo it with these settings"
  config_path, results_path = run_dir / "config.json", run_dir / "results.json"
  if not config_path.is_file():
    if results_path.is_file():
      return f"{run_dir}: has results.json but no config.json, so its settings cannot be checked. {fix}"
    return None
  try:
    saved = json.loads(config_path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    return f"{config_path}: cannot be read ({' '.join(str(e).split())}). {fix}"
  from medgen_jax import runs  # imports JAX; keep `--help` fast

  # The trainer's own rule (runs.check_config): keys in runs.RESUMABLE_KEYS may differ.
  differ = runs.config_differences(saved, json.loads(config.to_json()))
  if differ:
    return (f"{run_dir}: holds a run with a different config ({', '.join(differ)} differ from the "
            f"sweep's settings now). {fix}")
  if results_path.is_file():
    try:
      results = json.loads(results_path.read_text())
      selection, records = results["selection"], results["records"]
      assert isinstance(records, list)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AssertionError):
      return f"{results_path}: unreadable or incomplete results. {fix}"
    if selection != config.eval.selection:
      return (f"{run_dir}: finished with eval.selection={selection!r}, the sweep now asks for "
              f"{config.eval.selection!r}. Fix: python -m medgen_jax.evaluate --workdir {run_dir} "
              f"--selection {config.eval.selection}, a new --workdir, or delete {run_dir}")
  return None


def run_one(config, run_dir: Path, *, train=None) -> list[dict]:
  """The run's per-volume records: read from a finished run, else trained (or resumed) by `train`
  (default: train_lib.train_and_evaluate)."""
  done = run_dir / "results.json"
  if done.is_file():
    return json.loads(done.read_text())["records"]
  if train is None:
    from medgen_jax import train_lib  # imports JAX; keep `--help` fast
    train = train_lib.train_and_evaluate
  return train(config, run_dir)["records"]


def unseen_dice(records, site: str, role: str = "unseen") -> float:
  return mean_dice([r for r in records if r["site"] == site and r["role"] == role]) * 100


def unseen_asd(records, site: str, role: str = "unseen") -> float:
  """Mean over the held-out site's volumes of the mean ASSD (mm) over foreground classes; NaN when
  the run computed no distances (eval.distances False)."""
  chosen = [r for r in records if r["site"] == site and r["role"] == role]
  if not chosen or any("asd" not in r for r in chosen):
    return float("nan")
  return float(np.mean([np.mean(r["asd"]) for r in chosen]))


METRICS = {"dice": ("Dice (%)", unseen_dice), "asd": ("ASD (mm)", unseen_asd)}


def _cell(values, seeds: int) -> str:
  if not len(values):
    return "—"
  v = np.asarray(values, np.float64)
  return f"{v.mean():.2f} ± {v.std():.2f}" + (f" (n={v.size})" if v.size < seeds else "")


def sweep_table(rows: dict, sites: list[str], seeds: int, row_sites: dict | None = None) -> str:
  """rows: method -> site -> {seed: dice}. Average = per seed, the mean over the row's held-out
  sites (`row_sites[method]`, default `sites`), for the seeds that finished on all of them; '—'
  when none did (an average over fewer sites would not be comparable)."""
  header = ["Method"] + [f"{s} (held out)" for s in sites] + ["Average"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for method, per_site in rows.items():
    cells = [method] + [_cell(list(per_site.get(s, {}).values()), seeds) for s in sites]
    own = (row_sites or {}).get(method, sites)
    common = set.intersection(*(set(per_site.get(s, {})) for s in own)) if own else set()
    cells.append(_cell([np.mean([per_site[s][k] for s in own]) for k in sorted(common)], seeds))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


@dataclasses.dataclass
class PlannedRun:
  spec: str
  site: str
  seed: int
  config: ml_collections.ConfigDict
  run_dir: Path


def _one_line(error: BaseException) -> str:
  return " | ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def run_config(spec: str, overrides, seed: int, data: dict | None = None) -> ml_collections.ConfigDict:
  """One run's config: `spec` with the --set overrides, `seed`, the `data.<key>` values of the run
  (its sites, held-out sites, ...) and no progress bar, validated; SweepConfigError otherwise."""
  from medgen_jax import config as config_lib  # imports JAX; keep `--help` fast

  config = load_config(spec, overrides)
  with config.unlocked():
    for key, value in (data or {}).items():
      config.data[key] = value
    config.seed = seed
    config.progress_bar = False
  try:
    config_lib.validate(config)
  except (ValueError, TypeError) as e:
    raise SweepConfigError(f"--config {spec}: {_one_line(e)}") from None
  return config


def plan_runs(args) -> tuple[list[PlannedRun], list[str]]:
  """Every run of the sweep with its config; SweepConfigError / DataError before any training."""
  if getattr(args, "uda", False):
    return plan_uda_runs(args)
  if getattr(args, "multisite", False):
    return plan_multisite_runs(args)
  plan, all_sites = [], []
  workdir = as_path(args.workdir)
  for spec in args.config:
    base = load_config(spec, args.set)
    if base.method == "intra_site":
      # its data.sites is the ONE site a single run trains on (configs/intra_site_brain.py: D);
      # the sweep chooses among the dataset's sites and sets data.sites per run
      base.data.sites = ()
    sites = sites_of(base)
    where = f"data.sites={list(base.data.sites)}" if base.data.sites else f"the dataset {base.data.root}"
    if args.held_out == "all":
      held = sites
    else:
      held = list(dict.fromkeys(s.strip() for s in args.held_out.split(",") if s.strip()))
    unknown = [s for s in held if s not in sites]
    if unknown or not held:
      raise DataError.single(f"--held-out {args.held_out}", f"site(s) {unknown} do not exist in {where}",
                             f"choose from {sites}")
    if len(sites) < 2:
      raise DataError.single(f"--config {spec}", f"{where} has only the site(s) {sites}: "
                             "holding one out leaves no source site", "use at least two sites")
    all_sites += [s for s in held if s not in all_sites]
    for site in held:
      for seed in range(args.seeds):
        # intra_site: the held-out site's own train cases (target labels)
        data = {"sites": (site,), "held_out": ()} if base.method == "intra_site" else {"held_out": (site,)}
        config = run_config(spec, args.set, seed, data)
        plan.append(PlannedRun(spec, site, seed, config, workdir / config_name(spec) / site / f"seed{seed}"))
  return plan, all_sites


def write_tables(workdir: Path, markdown: str, csv_rows: list, *, stem: str = "sweep") -> bool:
  """Prints the table and writes DIR/<stem>.md and DIR/<stem>.csv; False (one error line) if they
  cannot be written."""
  buffer = io.StringIO()
  csv.writer(buffer).writerows(csv_rows)
  print(markdown)
  try:
    write_bytes_atomic(workdir / f"{stem}.md", markdown.encode())
    write_bytes_atomic(workdir / f"{stem}.csv", buffer.getvalue().encode())
  except OSError as e:
    print(f"error: cannot write {workdir / f'{stem}.md'} ({e.strerror or e}); the table is printed above",
          file=sys.stderr)
    return False
  return True


def parse_directions(text: str, sites: list[str], spec: str) -> list[tuple[str, str]]:
  if text == "all":
    return [(a, b) for a in sites for b in sites if a != b]
  pairs = []
  for item in (t.strip() for t in text.split(",") if t.strip()):
    source, sep, target = item.partition(":")
    if not sep or source not in sites or target not in sites or source == target:
      raise DataError.single(f"--directions {text}", f"{item!r} is not SOURCE:TARGET with two different "
                             f"sites of {spec}'s dataset", f"choose from {sites}, e.g. {sites[0]}:{sites[-1]}")
    pairs.append((source, target))
  return pairs


def direction_name(source: str, target: str) -> str:
  return f"{source}_to_{target}"


def plan_uda_runs(args) -> tuple[list[PlannedRun], list[str]]:
  """--uda: every config × direction × seed (module docstring); `site` holds the direction."""
  plan, directions = [], []
  workdir = as_path(args.workdir)
  for spec in args.config:
    base = load_config(spec, args.set)
    with base.unlocked():
      base.data.sites = ()
    sites = sites_of(base)
    for source, target in parse_directions(args.directions, sites, spec):
      name = direction_name(source, target)
      if name not in directions:
        directions.append(name)
      for seed in range(args.seeds):
        if base.method == "supervised_target":
          data = {"sites": (target,), "held_out": (), "target_adaptation": False}
        else:
          data = {"sites": (source,), "held_out": (target,), "target_adaptation": True}
        config = run_config(spec, args.set, seed, data)
        plan.append(PlannedRun(spec, name, seed, config, workdir / config_name(spec) / name / f"seed{seed}"))
  return plan, directions


def target_scores(records, target: str) -> dict[str, np.ndarray]:
  """Per structure, the mean over the target's test volumes: {'dice': [C-1] (%), 'asd': [C-1] (mm)}."""
  chosen = [r for r in records if r["site"] == target]
  out = {"dice": np.mean([r["dice"] for r in chosen], axis=0) * 100}
  if chosen and "asd" in chosen[0]:
    out["asd"] = np.mean([r["asd"] for r in chosen], axis=0)
  return out


def uda_table(rows: dict, class_names: list[str], seeds: int) -> str:
  """rows: method -> {seed: {'dice': [C-1], 'asd': [C-1]}} -> the talk's layout: Dice and ASD
  per structure and their mean over structures, mean ± std over seeds."""
  metrics = [m for m in ("dice", "asd") if any(m in v for per_seed in rows.values() for v in per_seed.values())]
  header = ["Method"]
  for m in metrics:
    unit = "Dice (%)" if m == "dice" else "ASD (mm)"
    header += [f"{unit} {c}" for c in class_names] + [f"{unit} mean"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for method, per_seed in rows.items():
    cells = [method]
    for m in metrics:
      values = np.asarray([per_seed[k][m] for k in sorted(per_seed) if m in per_seed[k]], np.float64)
      for c in range(len(class_names)):
        cells.append(_cell(values[:, c], seeds) if values.size else "—")
      cells.append(_cell(values.mean(axis=1), seeds) if values.size else "—")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plan_multisite_runs(args) -> tuple[list[PlannedRun], list[str]]:
  """--multisite: every config × seed with the config's sites, nothing held out beyond the
  config's own `data.held_out`; `site` is unused ('')."""
  plan, all_sites = [], []
  workdir = as_path(args.workdir)
  for spec in args.config:
    base = load_config(spec, args.set)
    all_sites += [s for s in sites_of(base) if s not in all_sites and s not in base.data.held_out]
    for seed in range(args.seeds):
      config = run_config(spec, args.set, seed)
      plan.append(PlannedRun(spec, "", seed, config, workdir / config_name(spec) / f"seed{seed}"))
  return plan, all_sites


def multisite_rows(finished) -> dict:
  """finished: [(run, records)] -> {(method, BFC, intensities): {site: [per-volume Dice %]}}, with
  a `Separate` row of each site's own model next to the `Separate (X)` rows."""
  rows: dict[tuple, dict[str, list]] = {}
  for run, records in finished:
    bfc = "✓" if run.config.data.bias_correction != "none" else "✗"
    intensities = run.config.data.normalization.name
    for r in records:
      dice = float(np.mean(r["dice"])) * 100
      rows.setdefault((r["method"], bfc, intensities), {}).setdefault(r["site"], []).append(dice)
  for (method, bfc, intensities), per_site in list(rows.items()):
    if method == f"Separate ({method[10:-1]})" and method[10:-1] in per_site:
      own = rows.setdefault(("Separate", bfc, intensities), {})
      own[method[10:-1]] = per_site[method[10:-1]]
  # the talk's order: the per-site models, their own-site row, then the methods as configured
  def position(key):
    method = key[0]
    return 0 if method.startswith("Separate (") else 1 if method == "Separate" else 2
  return dict(sorted(rows.items(), key=lambda item: position(item[0])))


def multisite_table(rows: dict, sites: list[str]) -> str:
  header = ["Method", "BFC", "Intensities"] + [f"Site {s}" for s in sites] + ["Overall"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for (method, bfc, intensities), per_site in rows.items():
    cells = [method, bfc, intensities] + [_cell(per_site.get(s, []), 0) for s in sites]
    cells.append(_cell([d for s in sites for d in per_site.get(s, [])], 0))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def absent_notes(workdir: Path, failed, missing=()) -> list[str]:
  """The table notes naming the runs that are not in it: failed ([(run, why)]) and, for
  `--report`, not finished ([run]: started = it has a config.json and resumes when rerun)."""
  notes = []
  if failed:
    notes.append(f"FAILED, not in the table ({len(failed)}): " +
                 "; ".join(f"{run.run_dir.relative_to(workdir)} ({why})" for run, why in failed))
  if missing:
    notes.append(f"NOT FINISHED, not in the table ({len(missing)}): " + "; ".join(
        f"{run.run_dir.relative_to(workdir)} "
        f"({'started' if (run.run_dir / 'config.json').is_file() else 'not started'})" for run in missing))
  return notes


def write_multisite_report(args, plan, sites, finished, failed, missing=()) -> int:
  workdir = as_path(args.workdir)
  seeds_done = {}
  for run, _ in finished:
    seeds_done.setdefault(config_name(run.spec), set()).add(run.seed)
  notes = [f"each site's own test volumes; cells: per-volume mean foreground Dice (%), mean ± std over the "
           f"test volumes of every finished seed ({args.seeds} asked; "
           + ", ".join(f"{name}: {len(s)}" for name, s in seeds_done.items()) + ")",
           "BFC: bias-field correction (data.bias_correction); Intensities: data.normalization.name",
           f"model selection: {'; '.join(SELECTION_RULES[s] for s in sorted({r.config.eval.selection for r in plan}))}"]
  notes += absent_notes(workdir, failed, missing)
  if not finished:
    print("error: no run finished, so no table was written", file=sys.stderr)
    return 1
  csv_rows = [["config", "method", "bias_correction", "normalization", "seed", "site", "case", "dice"]]
  for run, records in finished:
    for r in records:
      csv_rows.append([config_name(run.spec), r["method"], run.config.data.bias_correction,
                       run.config.data.normalization.name, run.seed, r["site"], r["case"],
                       f"{float(np.mean(r['dice'])) * 100:.4f}"])
  markdown = ("# Multi-site sweep\n\n" + "".join(f"- {n}\n" for n in notes) + "\n"
              + multisite_table(multisite_rows(finished), sites) + "\n")
  if not write_tables(workdir, markdown, csv_rows):
    return 1
  if failed:
    print(f"error: {len(failed)} of {len(plan)} run(s) failed (listed above)", file=sys.stderr)
    return 1
  return 0


def write_uda_report(args, plan, finished, failed, missing=()) -> int:
  """finished: [(run, method label, records)] -> DIR/sweep.md (a table per direction) and sweep.csv."""
  workdir = as_path(args.workdir)
  notes = [f"target test volumes, mean ± std over {args.seeds} seed(s) (n=k: only k finished); Dice and ASD "
           "per structure, 'mean' = mean over structures; no target label was used for training or model "
           "selection except in rows marked [target labels] or [oracle]",
           f"model selection: {'; '.join(SELECTION_RULES[s] for s in sorted({r.config.eval.selection for r in plan}))}"]
  notes += absent_notes(workdir, failed, missing)
  sections, csv_rows = [], [["config", "method", "direction", "seed", "structure", "dice", "asd"]]
  configs_of: dict[str, set] = {}
  for run, method, _ in finished:
    configs_of.setdefault(method, set()).add(config_name(run.spec))
  for direction in dict.fromkeys(run.site for run in plan):
    target = direction.split("_to_")[1]
    rows: dict[str, dict[int, dict]] = {}
    class_names = None
    for run, method, records in finished:
      if run.site != direction:
        continue
      scores = target_scores(records, target)
      # Two configs giving the same method label get one row each, labelled with the config.
      label = method if len(configs_of[method]) == 1 else f"{method} ({config_name(run.spec)})"
      rows.setdefault(label, {})[run.seed] = scores
      if class_names is None:
        info = json.loads((run.run_dir / "data_info.json").read_text())
        class_names = [v for k, v in sorted(info["labels"].items(), key=lambda kv: int(kv[0])) if int(k)]
      for c, dice in enumerate(scores["dice"]):
        asd = scores["asd"][c] if "asd" in scores else float("nan")
        csv_rows.append([config_name(run.spec), method, direction, run.seed, class_names[c],
                         f"{dice:.4f}", f"{asd:.4f}"])
    if rows:
      source = direction.split("_to_")[0]
      sections.append(f"## {source} → {target}\n\n{uda_table(rows, class_names, args.seeds)}\n")
  if not sections:
    print("error: no run finished, so no table was written", file=sys.stderr)
    return 1
  markdown = ("# Unsupervised domain adaptation sweep\n\n" + "".join(f"- {n}\n" for n in notes) + "\n"
              + "\n".join(sections))
  if not write_tables(workdir, markdown, csv_rows):
    return 1
  if failed:
    print(f"error: {len(failed)} of {len(plan)} run(s) failed (listed above)", file=sys.stderr)
    return 1
  return 0


def refuse_mismatched(plan, workdir: Path) -> bool:
  """Prints why existing run folders do not match the plan; True if any does not (nothing runs)."""
  refused = [m for m in (check_existing_run(run.config, run.run_dir) for run in plan) if m]
  for message in refused:
    print(f"error: {message}", file=sys.stderr)
  if refused:
    print(f"error: refusing to run the sweep: {len(refused)} existing run(s) in {workdir} do not match "
          "its settings (nothing was trained or changed)", file=sys.stderr)
  return bool(refused)


def attempt_run(run: PlannedRun, *, train=None) -> tuple[list | None, str | None]:
  """THE function for one planned run, called in the sweep's process or as a submitit job:
  (its per-volume records, None) once trained, resumed or read back, or (None, why it failed, on
  one line). `train`: see run_one."""
  try:
    return run_one(run.config, run.run_dir, train=train), None
  except (ValueError, OSError) as e:  # DataError is a ValueError
    return None, _one_line(e)
  except Exception as e:  # e.g. XLA out of memory: this run failed, the sweep goes on
    from medgen_jax import train_lib  # imports JAX: not in a job that does not train

    if isinstance(e, train_lib.TrainingDivergedError):
      return None, _one_line(e)
    return None, f"{type(e).__name__}: {_one_line(e)}"


def train_planned(run, what: str, failed: list):
  """One planned run's records (trained, resumed or read back) in this process, or None after
  reporting a failure."""
  print(f"[sweep] {config_name(run.spec)}: {what}, seed {run.seed} -> {run.run_dir}", flush=True)
  records, why = attempt_run(run)
  if why is not None:
    failed.append((run, why))
    print(f"error: run {run.run_dir} failed: {why}", file=sys.stderr, flush=True)
  return records


class RunJob:
  """A submitit job of one planned run: `attempt_run(run, train=train)`. On a Slurm time-out or
  preemption submitit calls `checkpoint` and requeues the same call (up to its max_num_timeout),
  which resumes from the run's own checkpoints."""

  def __init__(self, train):
    self.train = train

  def __call__(self, run: PlannedRun):
    return attempt_run(run, train=self.train)

  def checkpoint(self, run: PlannedRun):
    import submitit
    return submitit.helpers.DelayedSubmission(self, run)


@dataclasses.dataclass
class SweepPlan:
  """Every run of one sweep mode ('loo', 'uda', 'multisite', 'num_sources') and what its table
  needs: `columns` (held-out sites, directions or sites), `extra` (num_sources: per run its
  (k, sources); and the plan's notes)."""
  mode: str
  runs: list[PlannedRun]
  columns: list[str]
  extra: list = dataclasses.field(default_factory=list)
  notes: list = dataclasses.field(default_factory=list)

  def describe(self, index: int) -> str:
    run = self.runs[index]
    if self.mode == "uda":
      return run.site.replace("_to_", " -> ")
    if self.mode == "multisite":
      return "all sites"
    if self.mode == "num_sources":
      return f"held out {run.site}, sources {'+'.join(self.extra[index][1])}"
    return f"held out {run.site}"

  @property
  def stem(self) -> str:
    return "num_sources" if self.mode == "num_sources" else "sweep"


def plan_sweep(args) -> SweepPlan:
  """The sweep's runs for its mode; SweepConfigError / DataError before any training."""
  if args.num_sources is not None:
    from medgen_jax import num_sources

    planned, sites, notes = num_sources.plan(args, load_config=load_config, sites_of=sites_of,
                                             run_config=run_config, config_name=config_name,
                                             PlannedRun=PlannedRun)
    return SweepPlan("num_sources", [run for run, _, _ in planned], sites,
                     [(k, sources) for _, k, sources in planned], notes)
  plan, columns = plan_runs(args)
  return SweepPlan("uda" if args.uda else "multisite" if args.multisite else "loo", plan, columns)


def parse_shard(text: str) -> tuple[int, int]:
  """'K/N' -> (K, N) with 1 <= K <= N; SweepConfigError otherwise."""
  k, sep, n = text.partition("/")
  try:
    k, n = int(k), int(n)
  except ValueError:
    sep = ""
  if not sep or not 1 <= k <= n:
    raise SweepConfigError(f"--shard {text}: not K/N with 1 <= K <= N. Fix: give each of N machines one "
                           "of --shard 1/N, ..., --shard N/N, e.g. --shard 2/4")
  return k, n


def shard_indices(runs, workdir: Path, k: int, n: int) -> list[int]:
  """The K-th of N disjoint slices that together cover `runs` (indices, in plan order): the runs
  ranked by their folder under `workdir`, every N-th from the K-th. The folder names alone decide,
  so every machine given the same command gets the same slices, whatever the order of the
  --config / --held-out values; slice sizes differ by at most one."""
  order = sorted(range(len(runs)), key=lambda i: runs[i].run_dir.relative_to(workdir).as_posix())
  mine = set(order[k - 1::n])
  return [i for i in range(len(runs)) if i in mine]


_JOB_OPTIONS = {"--shard": True, "--executor": True, "--no-wait": False, "--job-minutes": True,
                "--slurm-partition": True, "--slurm-gpus": True, "--slurm-cpus": True,
                "--slurm-array-parallelism": True}


def report_command(argv) -> str:
  """The same sweep command with `--report` instead of its shard / executor options."""
  import shlex

  kept, skip = [], False
  for item in argv:
    if skip:
      skip = False
      continue
    name = item.split("=", 1)[0]
    if name in _JOB_OPTIONS:
      skip = _JOB_OPTIONS[name] and "=" not in item
      continue
    kept.append(item)
  return shlex.join(["python", "-m", "medgen_jax.sweep", *kept, "--report"])


def import_submitit():
  """submitit, imported without its import-time logging.config.dictConfig, which closes every
  logging handler already installed in this process (absl's, pytest's); its jobs are new
  processes and configure their logging as usual."""
  import importlib
  import os

  previous = os.environ.get("SUBMITIT_LOG_LEVEL")
  os.environ["SUBMITIT_LOG_LEVEL"] = "NOCONFIG"
  try:
    return importlib.import_module("submitit")
  finally:
    if previous is None:
      del os.environ["SUBMITIT_LOG_LEVEL"]
    else:
      os.environ["SUBMITIT_LOG_LEVEL"] = previous


def make_executor(args, submitit):
  """The submitit executor of --executor with the job options (logs and pickles in DIR/submitit)."""
  executor = submitit.AutoExecutor(folder=as_path(args.workdir) / "submitit", cluster=args.executor)
  executor.update_parameters(name="medgen_jax_sweep", timeout_min=args.job_minutes,
                             slurm_partition=args.slurm_partition, gpus_per_node=args.slurm_gpus,
                             cpus_per_task=args.slurm_cpus, slurm_array_parallelism=args.slurm_array_parallelism)
  return executor


def run_as_jobs(args, plan: SweepPlan, indices, argv):
  """One submitit job per planned run not finished yet (finished ones are read here), submitted
  as one job array (`executor.map_array`). Waits for them and returns (done, failed) like the
  in-process loop, or None with --no-wait."""
  from medgen_jax import train_lib  # imports JAX; keep `--help` fast

  submitit = import_submitit()
  workdir = as_path(args.workdir)
  done, failed, pending = [], [], []
  for i in indices:
    if (plan.runs[i].run_dir / "results.json").is_file():
      done.append((i, run_one(plan.runs[i].config, plan.runs[i].run_dir)))
    else:
      pending.append(i)
  if done:
    print(f"[sweep] {len(done)} run(s) already finished, not submitted", flush=True)
  if pending:
    executor = make_executor(args, submitit)
    jobs = executor.map_array(RunJob(train_lib.train_and_evaluate), [plan.runs[i] for i in pending])
    print(f"[sweep] submitted {len(jobs)} job(s) to the {args.executor} executor as one array "
          f"(job ids {jobs[0].job_id} .. {jobs[-1].job_id}); logs: {workdir / 'submitit'}", flush=True)
    if args.no_wait:
      print(f"[sweep] not waiting (--no-wait). When they have finished, the table: {report_command(argv)}",
            flush=True)
      return None
    for i, job in zip(pending, jobs):
      run = plan.runs[i]
      try:
        records, why = job.result()
      except Exception as e:  # the job itself died (killed, out of memory, time limit reached)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        records, why = None, f"job {job.job_id}: {lines[-1] if lines else type(e).__name__} (log: {job.paths.stderr})"
      print(f"[sweep] job {job.job_id} ({config_name(run.spec)}: {plan.describe(i)}, seed {run.seed}): "
            + ("finished" if why is None else "FAILED"), flush=True)
      if why is None:
        done.append((i, records))
      else:
        failed.append((run, why))
        print(f"error: run {run.run_dir} failed: {why}", file=sys.stderr, flush=True)
  return sorted(done, key=lambda item: item[0]), failed


def gather_finished(plan: SweepPlan, indices):
  """--report: the runs that have results.json, read back ([(index, records)]), and the others."""
  done, missing = [], []
  for i in indices:
    results = plan.runs[i].run_dir / "results.json"
    if results.is_file():
      done.append((i, json.loads(results.read_text())["records"]))
    else:
      missing.append(plan.runs[i])
  return done, missing


def write_loo_report(args, plan: SweepPlan, done, failed, missing, metrics) -> int:
  """The leave-one-domain-out tables (module docstring) from done = [(index, records)]."""
  workdir = as_path(args.workdir)
  finished = []
  for i, records in done:
    run = plan.runs[i]
    for method in dict.fromkeys(r["method"] for r in records):
      mine = [r for r in records if r["method"] == method]
      # Intra-site trains on the held-out site itself: its own test split (in-domain) is the score
      role = "in-domain" if run.config.method == "intra_site" else "unseen"
      values = {m: METRICS[m][1](mine, run.site, role) for m in metrics}
      finished.append((config_name(run.spec), method, run.site, run.seed, values))
  configs_of, held_of = {}, {}
  for name, method, *_ in finished:
    configs_of.setdefault(method, set()).add(name)
  for run in plan.runs:
    held_of.setdefault(config_name(run.spec), [])
    if run.site not in held_of[config_name(run.spec)]:
      held_of[config_name(run.spec)].append(run.site)
  rows: dict[str, dict[str, dict[str, dict[int, float]]]] = {m: {} for m in metrics}
  row_sites: dict[str, list[str]] = {}
  csv_rows = []
  for name, method, site, seed, values in finished:
    # Two configs giving the same method label get one row each, labelled with the config.
    label = method if len(configs_of[method]) == 1 else f"{method} ({name})"
    for m, value in values.items():
      if np.isfinite(value):   # no ASD when the run computed no distances: '—'
        rows[m].setdefault(label, {}).setdefault(site, {})[seed] = value
      else:
        rows[m].setdefault(label, {})
    row_sites[label] = held_of[name]
    csv_rows.append([name, method, site, seed] + [f"{values[m]:.4f}" for m in metrics])
  selections = sorted({run.config.eval.selection for run in plan.runs})
  notes = [f"held-out site's mean {' and '.join(METRICS[m][0] for m in metrics)} over its volumes and "
           f"foreground classes, mean ± std over {args.seeds} seed(s) (n=k: only k finished); "
           "Average = mean over held-out sites per seed, over the seeds that finished on all of them",
           f"model selection: {'; '.join(SELECTION_RULES[s] for s in selections)}"]
  notes += absent_notes(workdir, failed, missing)
  if finished:
    tables = [sweep_table(rows[m], plan.columns, args.seeds, row_sites) for m in metrics]
    if len(metrics) > 1:
      tables = [f"## {METRICS[m][0]}\n\n{t}" for m, t in zip(metrics, tables)]
    markdown = ("# Leave-one-domain-out sweep\n\n" + "".join(f"- {n}\n" for n in notes) + "\n"
                + "\n\n".join(tables) + "\n")
    header = ["config", "method", "held_out", "seed"] + [f"unseen_{m}" for m in metrics]
    if not write_tables(workdir, markdown, [header] + csv_rows):
      return 1
  if failed:
    written = f"; the table of the {len(done)} finished run(s) is in {workdir / 'sweep.md'}" \
              if finished else "; no run finished, so no table was written"
    print(f"error: {len(failed)} of {len(plan.runs)} run(s) failed (listed above){written}", file=sys.stderr)
    return 1
  return 0


def write_sweep_report(args, plan: SweepPlan, done, failed, missing, metrics) -> int:
  """The mode's tables from done = [(index, records)] (plan order), the failed [(run, why)] and the
  not-finished runs (--report)."""
  workdir = as_path(args.workdir)
  if not done and not failed:
    print(f"error: none of the {len(plan.runs)} planned run(s) has finished in {workdir}, so no table "
          "was written. Fix: run the sweep without --report (or wait for its jobs)", file=sys.stderr)
    return 1
  if plan.mode == "multisite":
    status = write_multisite_report(args, plan.runs, plan.columns, [(plan.runs[i], r) for i, r in done],
                                    failed, missing)
  elif plan.mode == "uda":
    finished = [(plan.runs[i], method, [r for r in records if r["method"] == method])
                for i, records in done for method in dict.fromkeys(r["method"] for r in records)]
    status = write_uda_report(args, plan.runs, finished, failed, missing)
  elif plan.mode == "num_sources":
    from medgen_jax import num_sources

    finished = []
    for i, records in done:
      run, (k, sources) = plan.runs[i], plan.extra[i]
      for method in dict.fromkeys(r["method"] for r in records):
        mine = [r for r in records if r["method"] == method]
        values = {m: METRICS[m][1](mine, run.site) for m in metrics}
        finished.append((run, k, sources, config_name(run.spec), method, values))
    planned = [(run, k, sources) for run, (k, sources) in zip(plan.runs, plan.extra)]
    status = num_sources.write_report(args, planned, plan.columns, plan.notes, finished, failed, metrics,
                                      {m: METRICS[m][0] for m in METRICS}, missing=missing)
  else:
    status = write_loo_report(args, plan, done, failed, missing, metrics)
  if missing and status == 0:
    print(f"note: {len(missing)} of {len(plan.runs)} planned run(s) have not finished yet; "
          f"{workdir / (plan.stem + '.md')} lists them", file=sys.stderr)
  return status


def build_parser() -> argparse.ArgumentParser:
  """The sweep's command line (also read by tests/test_launch.py to check the launch scripts)."""
  parser = argparse.ArgumentParser(prog="python -m medgen_jax.sweep", description=__doc__, allow_abbrev=False,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", action="append", required=True, help="configs/x.py[:arg], repeatable")
  parser.add_argument("--held-out", default="all",
                      help="'all' (every site of data.sites, or of the dataset) or comma-separated sites")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override applied to every config, e.g. num_steps=300 or data.sites=A,B,C")
  parser.add_argument("--uda", action="store_true",
                      help="unsupervised domain adaptation: source -> target directions instead of held-out sites")
  parser.add_argument("--metrics", default="dice",
                      help="leave-one-domain-out table: dice, or dice,asd (a Dice and an ASD table)")
  parser.add_argument("--multisite", action="store_true",
                      help="multi-site learning: every config x seed on its own sites (no site held out)")
  parser.add_argument("--num-sources", default=None, metavar="K,...",
                      help="number-of-source-sites study: train on k of the sites left after holding one out "
                           "(comma-separated k, or 'all'); see medgen_jax/num_sources.py")
  parser.add_argument("--combinations", default="all",
                      help="with --num-sources: 'all' k-combinations of the remaining sites, or N (a seeded sample)")
  parser.add_argument("--combination-seed", type=int, default=0,
                      help="with --num-sources and --combinations N: the sample's seed")
  parser.add_argument("--directions", default="all",
                      help="with --uda: SOURCE:TARGET pairs, comma-separated (default: every ordered pair)")
  cluster = parser.add_argument_group("clusters (several machines; every run resumable, finished runs skipped)")
  cluster.add_argument("--shard", default=None, metavar="K/N",
                       help="run only the K-th of N disjoint slices of the runs (1 <= K <= N), e.g. one per "
                            "machine; no table (gather it with --report)")
  cluster.add_argument("--report", action="store_true",
                       help="train nothing: the table of the runs finished in --workdir, listing the others")
  cluster.add_argument("--executor", choices=("local", "slurm"), default=None,
                       help="one submitit job per run not finished yet, as one job array: 'slurm' (sbatch), "
                            "'local' (subprocesses of this machine, all at once)")
  cluster.add_argument("--no-wait", action="store_true",
                       help="with --executor: submit and exit (then --report); default: wait, then the table")
  cluster.add_argument("--job-minutes", type=int, default=24 * 60, metavar="MIN",
                       help="with --executor: each job's time limit (Slurm --time; a job that reaches it "
                            "is requeued and resumes from its checkpoints)")
  cluster.add_argument("--slurm-partition", default=None, metavar="NAME", help="with --executor slurm: the partition")
  cluster.add_argument("--slurm-gpus", type=int, default=None, metavar="N",
                       help="with --executor slurm: GPUs per job (one node; the run is pmapped over them)")
  cluster.add_argument("--slurm-cpus", type=int, default=None, metavar="N",
                       help="with --executor slurm: CPUs per job (data loading threads)")
  cluster.add_argument("--slurm-array-parallelism", type=int, default=None, metavar="N",
                       help="with --executor slurm: at most this many jobs of the array at once")
  return parser


def check_args(args) -> str | None:
  """Why the command line is inconsistent (one line), or None."""
  if args.seeds < 1:
    return f"--seeds {args.seeds}: must be >= 1"
  if sum([args.uda, args.multisite, args.num_sources is not None]) > 1:
    return "--uda, --multisite and --num-sources are different settings: choose one"
  metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
  if not metrics or any(m not in METRICS for m in metrics):
    return (f"--metrics {args.metrics}: use a comma-separated list of {', '.join(METRICS)}, "
            "e.g. --metrics dice,asd")
  job_options = [f"--{name.replace('_', '-')}" for name in ("no_wait", "slurm_partition", "slurm_gpus", "slurm_cpus",
                                                            "slurm_array_parallelism")
                 if getattr(args, name) not in (None, False)]
  if args.report and (args.executor or args.shard or job_options):
    return ("--report trains nothing and reads every run of the sweep: drop "
            f"{' '.join(['--executor'] * bool(args.executor) + ['--shard'] * bool(args.shard) + job_options)}")
  if args.executor is None and job_options:
    return f"{' '.join(job_options)}: only with --executor. Fix: add --executor slurm (or local)"
  if args.executor == "local" and any(o.startswith("--slurm") for o in job_options):
    return f"{' '.join(o for o in job_options if o.startswith('--slurm'))}: only with --executor slurm"
  if args.job_minutes < 1:
    return f"--job-minutes {args.job_minutes}: must be >= 1"
  for name in ("slurm_gpus", "slurm_cpus", "slurm_array_parallelism"):
    if getattr(args, name) is not None and getattr(args, name) < 1:
      return f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1"
  if args.shard is not None:
    try:
      parse_shard(args.shard)
    except SweepConfigError as e:
      return str(e)
  if args.executor == "slurm":
    import shutil

    absent = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if absent:
      return (f"--executor slurm: {' and '.join(absent)} not found, so this is no Slurm machine. Fix: run "
              "the sweep on the cluster's login node, or use --executor local or --shard K/N")
  return None


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(argv)
  problem = check_args(args)
  if problem:
    print(f"error: {problem}", file=sys.stderr)
    return 2
  metrics = list(dict.fromkeys(m.strip() for m in args.metrics.split(",") if m.strip()))
  workdir = as_path(args.workdir)
  try:
    plan = plan_sweep(args)
  except SweepConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  indices = list(range(len(plan.runs)))
  if args.shard:
    k, n = parse_shard(args.shard)
    indices = shard_indices(plan.runs, workdir, k, n)
    print(f"[sweep] shard {k}/{n}: {len(indices)} of the {len(plan.runs)} run(s)", flush=True)
  if refuse_mismatched([plan.runs[i] for i in indices], workdir):
    return 1

  missing, failed = [], []
  if args.report:
    done, missing = gather_finished(plan, indices)
  elif args.executor:
    outcome = run_as_jobs(args, plan, indices, argv)
    if outcome is None:
      return 0
    done, failed = outcome
  else:
    done = []
    for i in indices:
      records = train_planned(plan.runs[i], plan.describe(i), failed)
      if records is not None:
        done.append((i, records))
  if args.shard:   # one slice: the table is of the whole sweep, gathered once every slice is done
    print(f"[sweep] shard {args.shard}: {len(done)} run(s) finished, {len(failed)} failed. When every shard "
          f"has finished, the table: {report_command(argv)}", flush=True)
    if failed:
      print(f"error: {len(failed)} of the shard's {len(indices)} run(s) failed (listed above)", file=sys.stderr)
      return 1
    return 0
  return write_sweep_report(args, plan, done, failed, missing, metrics)


if __name__ == "__main__":
  sys.exit(main())
