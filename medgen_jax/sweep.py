"""Leave-one-domain-out sweep over one or more configs, seeds and held-out sites.

    python -m medgen_jax.sweep --config configs/deepall_brain.py:quick --config configs/masf_brain.py:quick \\
        --held-out all --seeds 3 --workdir runs/sweep [--set num_steps=300 ...]

For every config × held-out site × seed it trains (medgen_jax.train_lib.train_and_evaluate) in
`DIR/<config>/<site>/seed<k>`, with `data.held_out = (site,)` and `seed = k` (initialization and
sampling; the case split stays fixed by `data.split.seed`). A finished run (results.json present)
is not redone; an interrupted one resumes from its checkpoints. Then it writes one table,
`DIR/sweep.md` and `DIR/sweep.csv`: rows are methods, columns the held-out sites and their
average, cells the held-out site's mean Dice (%) as mean ± std over seeds, with the model
selection rule stated.
"""

from __future__ import annotations

import argparse
import ast
import csv
import io
import json
import runpy
import sys
from pathlib import Path

import numpy as np

from medgen_jax.data.errors import DataError
from medgen_jax.data.layouts import discover
from medgen_jax.data.nifti import write_bytes_atomic
from medgen_jax.data.synthesize import ensure_brain_sites
from medgen_jax.report import mean_dice


def load_config(spec: str, overrides=()):
  """'path.py' or 'path.py:arg' -> locked ConfigDict, with `key=value` overrides applied."""
  path, _, arg = spec.partition(":")
  if not Path(path).is_file():
    raise FileNotFoundError(f"--config {spec}: {path} does not exist")
  get_config = runpy.run_path(path)["get_config"]
  config = get_config(arg) if arg else get_config()
  for item in overrides:
    key, _, text = item.partition("=")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    target = config
    *parents, last = key.split(".")
    for p in parents:
      if p not in target:
        raise ValueError(f"--set {item}: unknown config key {key!r}")
      target = target[p]
    if last not in target:
      raise ValueError(f"--set {item}: unknown config key {key!r}")
    target[last] = tuple(value) if isinstance(value, list) else value
  config.lock()
  return config


def config_name(spec: str) -> str:
  path, _, arg = spec.partition(":")
  return Path(path).stem + (f"_{arg}" if arg else "")


def sites_of(config) -> list[str]:
  root = Path(config.data.root)
  if not root.exists() and config.data.synthesize.if_missing and root.name.startswith("brain-sites"):
    ensure_brain_sites(root, sites=config.data.synthesize.sites,
                       cases_per_site=config.data.synthesize.cases_per_site,
                       seed=config.data.synthesize.seed)
  _, by_site, problems = discover(root, layout=config.data.layout, sites=list(config.data.sites) or None)
  if problems:
    raise DataError(problems)
  return sorted(by_site)


def run_one(config, run_dir: Path) -> dict:
  from medgen_jax import train_lib  # imports JAX; keep `--help` fast

  done = run_dir / "results.json"
  if done.is_file():
    payload = json.loads(done.read_text())
    return {"records": payload["records"], "resumed": False}
  result = train_lib.train_and_evaluate(config, run_dir)
  return {"records": result["records"], "resumed": True}


def unseen_dice(records, site: str) -> float:
  return mean_dice([r for r in records if r["site"] == site and r["role"] == "unseen"]) * 100


def sweep_table(rows: dict, sites: list[str]) -> str:
  """rows: method -> site -> [dice per seed]."""
  header = ["Method"] + [f"{s} (held out)" for s in sites] + ["Average"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for method, per_site in rows.items():
    cells = [method]
    for s in sites:
      v = np.asarray(per_site.get(s, []))
      cells.append(f"{v.mean():.2f} ± {v.std():.2f}" if v.size else "—")
    complete = [s for s in sites if per_site.get(s)]
    seeds = min(len(per_site[s]) for s in complete) if complete else 0
    averages = np.array([np.mean([per_site[s][k] for s in complete]) for k in range(seeds)])
    cells.append(f"{averages.mean():.2f} ± {averages.std():.2f}" if averages.size else "—")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m medgen_jax.sweep", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", action="append", required=True, help="configs/x.py[:arg], repeatable")
  parser.add_argument("--held-out", default="all", help="'all' or comma-separated sites")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override applied to every config, e.g. num_steps=300")
  args = parser.parse_args(argv)
  workdir = Path(args.workdir)
  rows: dict[str, dict[str, list[float]]] = {}
  csv_rows = []
  selections = set()
  all_sites: list[str] = []
  try:
    for spec in args.config:
      base = load_config(spec, args.set)
      sites = sites_of(base)
      held = sites if args.held_out == "all" else [s for s in args.held_out.split(",") if s]
      unknown = [s for s in held if s not in sites]
      if unknown:
        raise DataError.single(f"--held-out {args.held_out}", f"site(s) {unknown} do not exist",
                               f"choose from {sites}")
      all_sites += [s for s in held if s not in all_sites]
      for site in held:
        for seed in range(args.seeds):
          config = load_config(spec, args.set)
          with config.unlocked():
            config.data.held_out = (site,)
            config.data.sites = ()
            config.seed = seed
            config.progress_bar = False
          selections.add(config.eval.selection)
          run_dir = workdir / config_name(spec) / site / f"seed{seed}"
          print(f"[sweep] {config_name(spec)}: held out {site}, seed {seed} -> {run_dir}", flush=True)
          out = run_one(config, run_dir)
          method = next(iter({r["method"] for r in out["records"]}))
          dice = unseen_dice(out["records"], site)
          rows.setdefault(method, {}).setdefault(site, []).append(dice)
          csv_rows.append([config_name(spec), method, site, seed, f"{dice:.4f}"])
  except (DataError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  rules = {"val": "best mean Dice on the source sites' validation cases",
           "last": "last checkpoint", "oracle": "ORACLE (held-out labels)"}
  table = sweep_table(rows, all_sites)
  markdown = (f"# Leave-one-domain-out sweep\n\n- held-out site's mean Dice (%), mean ± std over "
              f"{args.seeds} seed(s); Average = mean over held-out sites per seed\n"
              f"- model selection: {'; '.join(rules[s] for s in sorted(selections))}\n\n{table}\n")
  buffer = io.StringIO()
  csv.writer(buffer).writerows([["config", "method", "held_out", "seed", "unseen_dice"]] + csv_rows)
  write_bytes_atomic(workdir / "sweep.md", markdown.encode())
  write_bytes_atomic(workdir / "sweep.csv", buffer.getvalue().encode())
  print(markdown)
  return 0


if __name__ == "__main__":
  sys.exit(main())
