"""The scanner-effect study: can a classifier tell the site from a volume's intensities?

    python -m medgen_jax.analysis.site_effects ROOT --out DIR [--features histogram|percentiles|rich]
        [--pipelines raw,whitening,histogram,scaled] [--no-n4] [--folds 3] [--seed 0] [--trees 200]
        [--synthesize [--synthesize-sites 6] [--synthesize-cases 6]]

Glocker et al. ("Machine Learning with Multi-site Imaging Data: An Empirical Study on the Impact
of Scanner Effects", Medical Imaging meets NeurIPS 2019, arXiv:1910.04597) trained a random forest
to tell UK Biobank from Cam-CAN brains: after skull stripping, bias-field correction, rigid or
affine alignment and whitening it still found the site 96.96 % / 98.82 % of the time (the talk's
table: Accuracy, Avg. Entropy, Avg. Prob.). This repeats the study on any dataset the loader reads
(`medgen_jax.data.loading.load_dataset`: sites = its sites, one volume per case), one row per
preprocessing pipeline.

Pipelines: `raw` (no normalization), `whitening`, `histogram` (Nyul), `scaled`, built by the
factory training uses (`make_normalizer(name, foreground=...)`; `--foreground` defaults to the
training default, `data.normalization.foreground`), each also after N4 (`raw+n4`, ...;
`medgen_jax.data.bias_field`, `data.n4` defaults; skipped with a note without SimpleITK). The Nyul
landmarks are fitted on the training fold's volumes only, inside the cross-validation loop, as
training fits them on training cases only. Not done: the talk's template alignment (rigid/affine);
the features are intensity distributions, which alignment changes only through interpolation.

Features of the voxels inside the brain mask, label > 0 (brain-sites is skull-stripped: its
labels CSF, GM, WM cover the brain; for other datasets it is the labelled structures):
* `histogram` (default): the fraction of them in each of `bins` (32) equal-width bins, the same
  bins for every volume of a fold: [min over the training volumes of their 0.5th percentile, max of
  their 99.5th] (fitted on the training fold; values outside fall in the end bins);
* `percentiles`: the 1, 5, 10, 20, ..., 90, 95, 99th percentiles (numpy's linear interpolation);
* `rich`: the percentiles, mean, std (ddof 0), skewness, excess kurtosis, and the mean of each
  label > 0 (the whole-mask mean where a volume lacks that label).

Classifier: `RandomForestClassifier(n_estimators=trees, random_state=seed)` on stratified k-fold
splits (`StratifiedKFold(shuffle=True, random_state=seed)`; `StratifiedGroupKFold` when
`--subject-pattern` names the cases of one subject, so that no subject is in train and test).
brain-sites draws a new subject for every case (`synthesize_case` seeds it with (seed, site,
case)): no subject is scanned at two sites, so plain stratified folds are right for it.

Columns (per fold, on its held-out volumes; reported as mean ± std, ddof 0, over the folds):
* Accuracy: the fraction whose most probable site (the first on ties) is the true one;
* Avg. Entropy: the mean of H(p) = -sum_k p_k ln p_k over the predicted site distribution, in nats
  (0: certain; ln K: uniform over K sites). The talk's binary numbers read as nats: with one
  typical confidence p per row (H(p) = the reported entropy), acc·p + (1 - acc)(1 - p) is within
  0.04 of the reported Avg. Prob. for all five rows with ln, and 0.05-0.12 above it with log2;
* Avg. Prob.: the mean predicted probability of the true site.
Chance level: the majority-site rate and 1/K.

Writes site_effects.md, site_effects.csv (rows raw, whitening, histogram, scaled, raw+n4, ...;
columns Accuracy, Avg. Entropy, Avg. Prob. and their stds) and site_histograms.png (each site's
pooled intensity histogram inside the brain, one panel per pipeline; for display the Nyul panels
use landmarks fitted on all volumes) into --out. The same data and seed give the same table. A
missing ROOT is an error unless --synthesize, which first writes the brain-sites benchmark there
(generator seed 0, as the training configs do).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import re
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from medgen_jax.cli import one_line
from medgen_jax.data.errors import DataError
from medgen_jax.data.normalize import FOREGROUNDS, make_normalizer

NORMALIZATIONS = ("raw", "whitening", "histogram", "scaled")  # raw = make_normalizer('none')
FEATURE_SETS = ("histogram", "percentiles", "rich")
PERCENTILES = (1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 99.0)
EDGE_PERCENTILES = (0.5, 99.5)
COLUMNS = ("Accuracy", "Avg. Entropy", "Avg. Prob.")


# ----------------------------------------------------------------------------------- features

def brain_values(image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(intensities, labels) of the voxels with label > 0, the brain mask."""
  mask = label > 0
  return np.asarray(image)[mask].astype(np.float64), np.asarray(label)[mask]


def histogram_edges(value_sets: Sequence[np.ndarray], *, bins: int) -> np.ndarray:
  """`bins` + 1 equal-width edges over [min of the sets' 0.5th percentiles, max of their 99.5th]."""
  ends = np.array([np.percentile(v, EDGE_PERCENTILES) for v in value_sets])
  lo, hi = float(ends[:, 0].min()), float(ends[:, 1].max())
  return np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)


def intensity_features(values: np.ndarray, *, kind: str = "histogram", edges: np.ndarray | None = None,
                       tissue: np.ndarray | None = None, tissue_labels: Sequence[int] = ()) -> np.ndarray:
  """One volume's feature vector from its brain voxels `values` (see the module docstring).
  `edges`: the histogram's bin edges; `tissue`/`tissue_labels`: each voxel's label and the labels
  whose means `rich` adds."""
  values = np.asarray(values, np.float64)
  if kind == "histogram":
    counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
    return counts / values.size
  percentiles = np.percentile(values, PERCENTILES)
  if kind == "percentiles":
    return percentiles
  if kind != "rich":
    raise DataError.single(f"--features={kind}", "unknown feature set", f"use one of {', '.join(FEATURE_SETS)}")
  mean, std = values.mean(), values.std()
  z = (values - mean) / (std if std > 0 else 1.0)
  tissue_means = [values[tissue == k].mean() if np.any(tissue == k) else mean for k in tissue_labels]
  return np.concatenate([percentiles, [mean, std, np.mean(z ** 3), np.mean(z ** 4) - 3.0], tissue_means])


# --------------------------------------------------------------------------------- classifier

def probability_scores(proba: np.ndarray, truth: np.ndarray) -> dict[str, float]:
  """Accuracy, Avg. Entropy (nats) and Avg. Prob. of predicted distributions `proba` [n, K]
  (rows sum to 1) against the true class indices `truth` [n]."""
  proba = np.asarray(proba, np.float64)
  truth = np.asarray(truth)
  logs = np.log(np.where(proba > 0, proba, 1.0))  # 0 ln 0 = 0
  return {"Accuracy": float(np.mean(np.argmax(proba, axis=1) == truth)),
          "Avg. Entropy": float(np.mean(-(proba * logs).sum(axis=1))),
          "Avg. Prob.": float(np.mean(proba[np.arange(len(truth)), truth]))}


def cv_folds(classes: Sequence[int], *, folds: int, seed: int, groups: Sequence[str] | None = None):
  """[(train indices, test indices)] of stratified k-fold (grouped by subject when `groups`)."""
  from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
  classes = np.asarray(classes)
  if groups is None:
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(classes)), classes))
  splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
  return list(splitter.split(np.zeros(len(classes)), classes, np.asarray(groups)))


def classify_sites(features_for_fold: Callable[[np.ndarray], np.ndarray] | np.ndarray,
                   classes: Sequence[int], *, fold_indices, seed: int, trees: int = 200,
                   num_classes: int | None = None) -> list[dict[str, float]]:
  """Per fold: a seeded random forest fitted on the training fold, scored on the held-out one.

  `features_for_fold(train_indices) -> X [n, d]` for all volumes (fold-dependent features: Nyul
  landmarks, histogram bins fitted on the training fold), or a fixed X [n, d]."""
  from sklearn.ensemble import RandomForestClassifier
  classes = np.asarray(classes)
  num_classes = int(num_classes or classes.max() + 1)
  scores = []
  for train, test in fold_indices:
    x = features_for_fold(train) if callable(features_for_fold) else np.asarray(features_for_fold)
    forest = RandomForestClassifier(n_estimators=trees, random_state=seed, n_jobs=1)
    forest.fit(x[train], classes[train])
    proba = np.zeros((len(test), num_classes))
    proba[:, forest.classes_] = forest.predict_proba(x[test])
    scores.append(probability_scores(proba, classes[test]))
  return scores


def summarize(scores: Sequence[dict[str, float]]) -> dict[str, tuple[float, float]]:
  """{column: (mean, std over folds, ddof 0)}."""
  return {c: (float(np.mean([s[c] for s in scores])), float(np.std([s[c] for s in scores]))) for c in COLUMNS}


# -------------------------------------------------------------------------------------- study

@dataclasses.dataclass
class StudyResult:
  rows: dict[str, dict[str, tuple[float, float]]]      # pipeline -> column -> (mean, std)
  sites: list[str]
  counts: dict[str, int]                                # volumes per site
  display: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]  # pipeline -> (edges, site -> density)
  notes: list[str]
  setup: dict


def _pipeline_values(images, cases, normalization: str, foreground: str):
  """A function train_indices -> per-volume brain intensities after `normalization` fitted on
  those volumes (recomputed only when the fitted normalizer changes: Nyul refits per fold)."""
  normalizer = (make_normalizer("none") if normalization == "raw"
                else make_normalizer(normalization, foreground=foreground))
  memo: dict[str, list[np.ndarray]] = {}

  def values(train) -> list[np.ndarray]:
    fitted = normalizer.fit([images[i] for i in train])
    key = json.dumps(fitted.to_dict(), sort_keys=True)
    if key not in memo:
      memo.clear()
      memo[key] = [brain_values(fitted(image), case.label)[0] for image, case in zip(images, cases)]
    return memo[key]
  return values


def _display_histograms(value_sets, sites, *, bins: int = 64):
  """Edges over the pooled 0.5-99.5th percentiles and each site's pooled density."""
  pooled = np.concatenate(value_sets)
  lo, hi = np.percentile(pooled, EDGE_PERCENTILES)
  edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
  density = {}
  for site in sorted(set(sites)):
    site_values = np.concatenate([v for v, s in zip(value_sets, sites) if s == site])
    density[site], _ = np.histogram(site_values, bins=edges, density=True)
  return edges, density


def run_study(cases, *, features: str = "histogram", bins: int = 32, pipelines: Sequence[str] = NORMALIZATIONS,
              n4: bool = True, n4_options=None, foreground: str = "none", folds: int = 3, seed: int = 0,
              trees: int = 200, groups: Sequence[str] | None = None, progress=print) -> StudyResult:
  """The study on loaded `cases` (medgen_jax.data.loading.Case: image, label, site, spacing)."""
  from medgen_jax.data.bias_field import N4Unavailable
  from medgen_jax.data.preprocess import correct_bias_field
  _check_study(cases, features=features, bins=bins, pipelines=pipelines, foreground=foreground,
               folds=folds, trees=trees)
  sites = sorted({c.site for c in cases})
  classes = np.array([sites.index(c.site) for c in cases])
  counts = {s: int(np.sum(classes == k)) for k, s in enumerate(sites)}
  fold_indices = cv_folds(classes, folds=folds, seed=seed, groups=groups)
  tissue_labels = sorted({int(k) for c in cases for k in np.unique(c.label) if k > 0})
  tissues = [brain_values(c.image, c.label)[1] for c in cases] if features == "rich" else [None] * len(cases)
  bases, notes = {"": [c.image for c in cases]}, []
  if n4:
    start = time.perf_counter()
    try:
      bases["+n4"] = [correct_bias_field(c.image, method="n4", spacing=c.spacing, options=n4_options)
                      for c in cases]
      notes.append(f"N4: {time.perf_counter() - start:.1f} s for {len(cases)} volumes (cached per volume)")
    except N4Unavailable as e:
      notes.append(f"+n4 pipelines skipped: {e}")
  rows, display = {}, {}
  for suffix, images in bases.items():
    for normalization in pipelines:
      name = normalization + suffix
      values_for = _pipeline_values(images, cases, normalization, foreground)

      def features_for_fold(train, values_for=values_for):
        values = values_for(train)
        edges = histogram_edges([values[i] for i in train], bins=bins) if features == "histogram" else None
        return np.stack([intensity_features(v, kind=features, edges=edges, tissue=t, tissue_labels=tissue_labels)
                         for v, t in zip(values, tissues)])

      rows[name] = summarize(classify_sites(features_for_fold, classes, fold_indices=fold_indices, seed=seed,
                                            trees=trees, num_classes=len(sites)))
      display[name] = _display_histograms(values_for(np.arange(len(cases))), [c.site for c in cases])
      if progress:
        acc = rows[name]["Accuracy"]
        progress(f"  {name:<16} accuracy {100 * acc[0]:.1f} ± {100 * acc[1]:.1f} %")
  setup = {"features": features, "bins": bins, "folds": folds, "seed": seed, "trees": trees,
           "foreground": foreground, "grouped": groups is not None, "n4_options": dict(n4_options or {})}
  return StudyResult(rows, sites, counts, display, notes, setup)


def _check_study(cases, *, features, bins, pipelines, foreground, folds, trees) -> None:
  def bad(key, problem, fix):
    raise DataError.single(key, problem, fix)

  if features not in FEATURE_SETS:
    bad(f"--features={features}", "unknown feature set", f"use one of {', '.join(FEATURE_SETS)}")
  unknown = [p for p in pipelines if p not in NORMALIZATIONS]
  if unknown or not pipelines:
    bad(f"--pipelines={','.join(pipelines)}", f"unknown pipeline(s) {unknown}" if unknown else "no pipeline",
        f"choose from {','.join(NORMALIZATIONS)} (the +n4 variants follow unless --no-n4)")
  if foreground not in FOREGROUNDS:
    bad(f"--foreground={foreground}", "unknown foreground", f"use one of {', '.join(FOREGROUNDS)}")
  if bins < 2:
    bad(f"--bins={bins}", "needs at least 2 bins", "use e.g. 32")
  if trees < 1:
    bad(f"--trees={trees}", "needs at least one tree", "use e.g. 200")
  sites = sorted({c.site for c in cases})
  if len(sites) < 2:
    bad("ROOT", f"has {len(sites)} site(s): telling sites apart needs at least 2", "give a dataset with 2+ sites")
  smallest = min(sum(c.site == s for c in cases) for s in sites)
  if smallest < 2:
    bad("ROOT", "has a site with a single case: stratified folds need 2+ cases per site",
        "give every site at least 2 cases (or select sites with --sites)")
  if not 2 <= folds <= smallest:
    bad(f"--folds={folds}", f"must be between 2 and the smallest site's case count ({smallest})",
        f"use e.g. --folds {min(3, smallest)}")
  for c in cases:
    if not np.any(c.label > 0):
      bad(c.label_path, "has no voxel with label > 0: no brain mask to take features from", "check the label file")


def subject_groups(cases, pattern: str) -> list[str]:
  """Each case's subject: the named group 'subject' of `pattern` searched in its case id."""
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise DataError.single(f"--subject-pattern={pattern}", f"is not a regular expression ({e})",
                           "write e.g. '^(?P<subject>sub-[0-9]+)'") from None
  if "subject" not in regex.groupindex:
    raise DataError.single(f"--subject-pattern={pattern}", "has no named group 'subject'",
                           "write e.g. '^(?P<subject>sub-[0-9]+)'")
  groups = []
  for c in cases:
    match = regex.search(c.case_id)
    if not match:
      raise DataError.single(c.image_path, f"case id {c.case_id!r} does not match --subject-pattern",
                             "fix the pattern so that every case id matches")
    groups.append(match.group("subject"))
  return groups


# ------------------------------------------------------------------------------------- output

def _format(column: str, mean: float, std: float) -> str:
  if column == "Accuracy":
    return f"{100 * mean:.2f} ± {100 * std:.2f} %"
  return f"{mean:.4f} ± {std:.4f}"


def table_markdown(result: StudyResult) -> str:
  lines = ["| pipeline | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
  for name, row in result.rows.items():
    lines.append(f"| {name} | " + " | ".join(_format(c, *row[c]) for c in COLUMNS) + " |")
  return "\n".join(lines)


def table_csv(result: StudyResult) -> str:
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(["pipeline"] + [f"{c}{suffix}" for c in COLUMNS for suffix in ("", " std")])
  for name, row in result.rows.items():
    writer.writerow([name] + [f"{v:.6f}" for c in COLUMNS for v in row[c]])
  return out.getvalue()


def chance_line(result: StudyResult) -> str:
  k = len(result.sites)
  majority = max(result.counts.values()) / sum(result.counts.values())
  return (f"Chance: majority site {100 * majority:.2f} %, 1/K = {100 / k:.2f} % (K = {k}); a uniform guess has "
          f"Avg. Entropy ln K = {np.log(k):.4f} nats and Avg. Prob. 1/K = {1 / k:.4f}.")


def report_markdown(result: StudyResult, *, root, seconds: float) -> str:
  s = result.setup
  split = ("StratifiedGroupKFold (cases grouped by --subject-pattern)" if s["grouped"]
           else "StratifiedKFold (every case a distinct subject)")
  feature_text = {"histogram": f"fraction of brain voxels in {s['bins']} equal-width bins fitted on the training fold",
                  "percentiles": "13 percentiles", "rich": "13 percentiles, mean, std, skewness, excess "
                  "kurtosis and per-label means"}[s["features"]]
  return "\n".join([
      "# Site identifiability (scanner-effect study, Glocker et al. 2019)", "",
      f"Data: `{root}`, {len(result.sites)} sites ({', '.join(f'{k}: {v}' for k, v in result.counts.items())} "
      f"volumes). Features inside the brain mask (label > 0): {feature_text}. Classifier: "
      f"RandomForestClassifier(n_estimators={s['trees']}, random_state={s['seed']}), {s['folds']}-fold "
      f"{split}, shuffled with seed {s['seed']}. Normalization: make_normalizer(name, foreground="
      f"'{s['foreground']}'), Nyul landmarks fitted on each training fold; +n4: N4 (SimpleITK) before it.",
      "", table_markdown(result), "",
      "Mean ± std (ddof 0) over the folds, each fold scored on its held-out volumes. Avg. Entropy: "
      "of the predicted site distribution, natural log (nats). Avg. Prob.: of the true site.",
      chance_line(result), *(f"Note: {n}." for n in result.notes),
      f"Runtime: {seconds:.1f} s.", ""])


def write_histogram_png(result: StudyResult, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = list(result.display)
  columns = min(4, len(names))
  rows = -(-len(names) // columns)
  fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.8 * rows), squeeze=False)
  for ax, name in zip(axes.ravel(), names):
    edges, density = result.display[name]
    centres = (edges[:-1] + edges[1:]) / 2
    for site, d in density.items():
      ax.plot(centres, d, label=site, lw=1.2)
    ax.set_title(name, fontsize=10)
    ax.set_yticks([])
    ax.tick_params(labelsize=7)
  for ax in axes.ravel()[len(names):]:
    ax.axis("off")
  axes.ravel()[0].legend(fontsize=7, title="site", title_fontsize=7)
  fig.suptitle("Intensity histograms inside the brain, per site", fontsize=11)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110)
  plt.close(fig)
  path.write_bytes(buffer.getvalue())


# ---------------------------------------------------------------------------------------- CLI

class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, exit 2 (argparse prints the usage too)
    print(f"{self.prog}: error: {one_line(message)}", file=sys.stderr)
    sys.exit(2)


def _parser() -> argparse.ArgumentParser:
  from medgen_jax.data.layouts import LAYOUTS
  from medgen_jax.data.pipeline import default_data_config
  parser = _Parser(prog="python -m medgen_jax.analysis.site_effects", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("root", nargs="?", default=default_data_config().root,
                      help="dataset folder (default data/brain-sites)")
  parser.add_argument("--out", required=True, help="folder for site_effects.{md,csv} and site_histograms.png")
  parser.add_argument("--features", default="histogram", help=f"one of {', '.join(FEATURE_SETS)} (default histogram)")
  parser.add_argument("--bins", type=int, default=32, help="histogram features: number of bins (default 32)")
  parser.add_argument("--pipelines", default=",".join(NORMALIZATIONS),
                      help=f"comma-separated subset of {','.join(NORMALIZATIONS)}")
  parser.add_argument("--no-n4", action="store_true", help="leave out the +n4 pipelines")
  parser.add_argument("--n4-cache-dir", default="", help="N4 cache (default ~/.cache/medgen_jax/n4)")
  parser.add_argument("--foreground", default=default_data_config().normalization.foreground,
                      help=f"normalization statistics over {'/'.join(FOREGROUNDS)} (default: the training default)")
  parser.add_argument("--folds", type=int, default=3)
  parser.add_argument("--trees", type=int, default=200)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--subject-pattern", default="",
                      help="regex with a named group 'subject' on the case id: grouped folds")
  parser.add_argument("--layout", default="auto", choices=("auto",) + LAYOUTS)
  parser.add_argument("--sites", default="", help="comma-separated subset of sites (default: all)")
  parser.add_argument("--channel", type=int, default=None, help="channel of 4-D images")
  parser.add_argument("--site-csv", default="", help="msd layout: CSV with columns case,site")
  parser.add_argument("--site-pattern", default="", help="msd layout: regex with a named group 'site'")
  parser.add_argument("--synthesize", action="store_true",
                      help="write the brain-sites benchmark at ROOT first if ROOT is missing")
  parser.add_argument("--synthesize-sites", type=int, default=4, help="with --synthesize: sites (1-6, default 4)")
  parser.add_argument("--synthesize-cases", type=int, default=6, help="with --synthesize: cases per site")
  return parser


def _load(args, progress):
  from medgen_jax.data.loading import load_dataset
  from medgen_jax.data.synthesize import ensure_benchmark
  root = Path(args.root)
  if not root.exists():
    if not args.synthesize:
      raise DataError.single(root, "does not exist", "give a dataset folder, or add --synthesize to write "
                             "the brain-sites benchmark there first")
    ensure_benchmark(root, benchmark="brain-sites", sites=args.synthesize_sites,
                     cases_per_site=args.synthesize_cases, seed=0, progress=progress)
  sites = [s for s in args.sites.split(",") if s] or None
  info, cases_by_site = load_dataset(root, layout=args.layout, sites=sites, channel=args.channel,
                                     site_csv=args.site_csv, site_pattern=args.site_pattern)
  return [c for site in sorted(cases_by_site) for c in cases_by_site[site]]


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  start = time.perf_counter()
  out = Path(args.out)
  try:
    cases = _load(args, print)
    groups = subject_groups(cases, args.subject_pattern) if args.subject_pattern else None
    n4_options = {"cache_dir": args.n4_cache_dir} if args.n4_cache_dir else None
    print(f"{args.root}: {len(cases)} volumes; site identifiability per pipeline ({args.features} features)")
    result = run_study(cases, features=args.features, bins=args.bins,
                       pipelines=[p for p in args.pipelines.split(",") if p], n4=not args.no_n4,
                       n4_options=n4_options, foreground=args.foreground, folds=args.folds, seed=args.seed,
                       trees=args.trees, groups=groups)
  except DataError as e:
    more = f" (and {len(e.problems) - 1} more problem(s): python -m medgen_jax.data.check {args.root})" \
        if len(e.problems) > 1 else ""
    print(one_line(e.problems[0]) + more, file=sys.stderr)
    return 2
  seconds = time.perf_counter() - start
  report = report_markdown(result, root=args.root, seconds=seconds)
  try:
    out.mkdir(parents=True, exist_ok=True)
    (out / "site_effects.md").write_text(report)
    (out / "site_effects.csv").write_text(table_csv(result))
    write_histogram_png(result, out / "site_histograms.png")
  except OSError as e:
    print(f"{out}: cannot write the results ({e.strerror or e}). Fix: choose a writable --out folder",
          file=sys.stderr)
    return 1
  print(report)
  print(f"wrote {out / 'site_effects.md'}, {out / 'site_effects.csv'}, {out / 'site_histograms.png'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
