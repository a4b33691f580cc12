"""The number-of-source-domains study (`python -m medgen_jax.sweep --num-sources K,...`): how the
held-out site's Dice grows with the number of sites a model is trained on, as in the talk's
"Influence of training domain numbers on generalization" (Liu, Dou & Heng, MICCAI 2020, Fig. 4).

For every config × held-out site × k × combination of k of the remaining sites × seed the sweep
trains with `data.sites = combination + (held-out,)` and `data.held_out = (held-out,)` in
`DIR/<config>/<site>/k<k>_<A+B+...>/seed<s>`. `--combinations all` (default) takes every
combination; `--combinations N` a sample of N of them per (held-out site, k), drawn with NumPy's
generator seeded by `--combination-seed` (the same sample for every config, so rows compare on
the same source sets). A method that needs more sources than k (an episodic method's meta-train +
meta-test domains) is not run at that k; the table says so.

Output: `DIR/num_sources.md` (a table per metric: rows method × held-out site and the method's
average over held-out sites, columns k, cells mean ± std over combinations × seeds),
`DIR/num_sources.csv` (every run: config, method, held_out, k, sources, seed, unseen_<metric>)
and `DIR/num_sources.png` (held-out Dice against k, one line per method averaged over held-out
sites, bars = std over held-out sites × combinations × seeds).
"""

from __future__ import annotations

import io
import itertools
import sys
from pathlib import Path

import numpy as np

from medgen_jax.data.errors import DataError
from medgen_jax.paths import as_path, write_bytes_atomic


def parse_counts(text: str, num_remaining: int) -> list[int]:
  """'all' -> 1..num_remaining; '1,3' -> [1, 3]; DataError naming the flag otherwise."""
  if text == "all":
    return list(range(1, num_remaining + 1))
  try:
    counts = sorted({int(t) for t in text.split(",") if t.strip()})
  except ValueError:
    counts = []
  if not counts or counts[0] < 1 or counts[-1] > num_remaining:
    raise DataError.single(f"--num-sources {text}", f"give numbers of source sites between 1 and "
                           f"{num_remaining} (the sites left after holding one out)",
                           f"e.g. --num-sources 1,{num_remaining} or --num-sources all")
  return counts


def choose_combinations(remaining: list[str], k: int, how: str, seed: int) -> list[tuple[str, ...]]:
  """Every k-combination of `remaining` (in its order), or a seeded sample of `how` of them."""
  every = list(itertools.combinations(remaining, k))
  if how == "all":
    return every
  try:
    n = int(how)
  except ValueError:
    n = 0
  if n < 1:
    raise DataError.single(f"--combinations {how}", "must be 'all' or a positive number",
                           "e.g. --combinations 3")
  if n >= len(every):
    return every
  picked = np.random.default_rng(seed).choice(len(every), size=n, replace=False)
  return [every[i] for i in sorted(picked)]


def min_sources(config) -> int:
  """The fewest source sites a method trains on: an episode's domains for episodic methods."""
  from medgen_jax import methods  # imports JAX; keep `--help` fast
  if methods.get(config.method).SAMPLER == "episodic":
    return config.meta.meta_train_domains + config.meta.meta_test_domains
  return 1


def run_dir_name(k: int, sources) -> str:
  return f"k{k}_" + "+".join(sources)


def plan(args, *, load_config, sites_of, run_config, config_name, PlannedRun):
  """[(PlannedRun, k, sources)], held-out sites, and notes on skipped (config, k) pairs. The
  sweep's own helpers are passed in (this module is imported by medgen_jax.sweep)."""
  planned, all_held, notes = [], [], []
  workdir = as_path(args.workdir)
  for spec in args.config:
    base = load_config(spec, args.set)
    if base.method == "intra_site":
      raise DataError.single(f"--config {spec}", "intra_site trains on the held-out site itself: it has "
                             "no source sites to count", "leave it out of a --num-sources sweep")
    sites = sites_of(base)
    held = sites if args.held_out == "all" else [s.strip() for s in args.held_out.split(",") if s.strip()]
    unknown = [s for s in held if s not in sites]
    if unknown or not held or len(sites) < 2:
      raise DataError.single(f"--held-out {args.held_out}", f"site(s) {unknown or held} cannot be held out "
                             f"of {spec}'s sites {sites}", f"choose from {sites}, with at least two sites")
    all_held += [s for s in held if s not in all_held]
    fewest = min_sources(base)
    for site in held:
      remaining = [s for s in sites if s != site]
      for k in parse_counts(args.num_sources, len(remaining)):
        if k < fewest:
          note = f"{config_name(spec)} needs at least {fewest} source sites: k={k} not run"
          if note not in notes:
            notes.append(note)
          continue
        for sources in choose_combinations(remaining, k, args.combinations, args.combination_seed):
          data = {"sites": tuple(s for s in sites if s in sources or s == site), "held_out": (site,)}
          for seed in range(args.seeds):
            config = run_config(spec, args.set, seed, data)
            run_dir = workdir / config_name(spec) / site / run_dir_name(k, sources) / f"seed{seed}"
            planned.append((PlannedRun(spec, site, seed, config, run_dir), k, tuple(sources)))
  return planned, all_held, notes


def _cell(values) -> str:
  if not len(values):
    return "—"
  v = np.asarray(values, np.float64)
  return f"{v.mean():.2f} ± {v.std():.2f} (n={v.size})"


def table(results, metric: str, counts: list[int], sites: list[str]) -> str:
  """results: [(method, site, k, sources, seed, {metric: value})] -> rows method × site and the
  method's average (mean over held-out sites of their means) per k."""
  header = ["Method", "Held out"] + [f"k = {k}" for k in counts]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for method in dict.fromkeys(r[0] for r in results):
    means = {}
    for site in sites:
      cells = [method, site]
      for k in counts:
        values = [r[5][metric] for r in results
                  if r[0] == method and r[1] == site and r[2] == k and np.isfinite(r[5][metric])]
        cells.append(_cell(values))
        if values:
          means.setdefault(k, {})[site] = float(np.mean(values))
      if any(c != "—" for c in cells[2:]):
        lines.append("| " + " | ".join(cells) + " |")
    if len(sites) > 1:
      average = [f"{np.mean(list(means[k].values())):.2f}" if len(means.get(k, {})) == len(sites) else "—"
                 for k in counts]
      lines.append("| " + " | ".join([method, "Average"] + average) + " |")
  return "\n".join(lines)


def write_png(results, counts: list[int], path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5.5, 4.0))
  for method in dict.fromkeys(r[0] for r in results):
    ks, means, stds = [], [], []
    for k in counts:
      values = [r[5]["dice"] for r in results if r[0] == method and r[2] == k and np.isfinite(r[5]["dice"])]
      if values:
        ks.append(k)
        means.append(np.mean(values))
        stds.append(np.std(values))
    ax.errorbar(ks, means, yerr=stds, marker="o", capsize=3, label=method)
  ax.set_xticks(counts)
  ax.set_xlabel("number of source sites k")
  ax.set_ylabel("held-out Dice (%)")
  ax.set_title("Held-out Dice vs number of training sites")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110)
  plt.close(fig)
  write_bytes_atomic(path, buffer.getvalue())


def write_report(args, planned, sites, notes, finished, failed, metrics, metric_names, *, missing=()) -> int:
  """finished: [(run, k, sources, config name, method, {metric: value})] -> num_sources.{md,csv,png};
  failed [(run, why)] and missing (not finished, `sweep --report`) are listed in its notes."""
  from medgen_jax.sweep import absent_notes, write_tables   # sweep imports this module when it runs the study

  workdir = as_path(args.workdir)
  counts = sorted({k for _, k, _ in planned})
  results = [(method, run.site, k, sources, run.seed, values) for run, k, sources, _, method, values in finished]
  lines = [f"held-out site's mean {' and '.join(metric_names[m] for m in metrics)} over its volumes and "
           f"foreground classes; cells mean ± std over combinations of k source sites × seeds "
           f"({args.seeds} seed(s), combinations: {args.combinations}); Average = mean over held-out sites"]
  lines += notes + absent_notes(workdir, failed, missing)
  if not finished:
    print("error: no run finished, so no table was written", file=sys.stderr)
    return 1
  tables = [f"## {metric_names[m]}\n\n{table(results, m, counts, sites)}" for m in metrics]
  markdown = ("# Number of source sites\n\n" + "".join(f"- {n}\n" for n in lines) + "\n"
              + "\n\n".join(tables) + "\n")
  header = ["config", "method", "held_out", "k", "sources", "seed"] + [f"unseen_{m}" for m in metrics]
  rows = [header] + [[name, method, run.site, k, "+".join(sources), run.seed] + [f"{values[m]:.4f}" for m in metrics]
                     for run, k, sources, name, method, values in finished]
  if not write_tables(workdir, markdown, rows, stem="num_sources"):
    return 1
  try:
    write_png(results, counts, workdir / "num_sources.png")
  except OSError as e:
    print(f"error: cannot write {workdir / 'num_sources.png'} ({e.strerror or e}); the table is printed above",
          file=sys.stderr)
    return 1
  if failed:
    print(f"error: {len(failed)} of {len(planned)} run(s) failed (listed above)", file=sys.stderr)
    return 1
  return 0
