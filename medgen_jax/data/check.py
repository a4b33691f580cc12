"""Validates a dataset folder before any training touches it.

    python -m medgen_jax.data.check ROOT [--layout auto|prostate6|sites|msd] [--sites A,B]
        [--channel K] [--site-csv FILE | --site-pattern REGEX]

For the `msd` layout (Medical Segmentation Decathlon / nnU-Net raw folder: imagesTr/, labelsTr/,
dataset.json) the site of each case comes from --site-csv (columns case,site) or --site-pattern
(a regular expression with a named group `site`, searched in the case id), e.g.

    python -m medgen_jax.data.check data/Task05_Prostate --channel 0 --site-csv sites.csv
    python -m medgen_jax.data.check data/Dataset042_Sites --site-pattern '^(?P<site>[A-Z]+)_'

Exit 0 with a per-site summary table (cases, shapes, spacing range, intensity range, label voxel
counts), or exit 1 with one line per problem, each naming the file and the fix. The loader
(`load_dataset`) finds exactly the same problems.

A raw cross-modality release (MM-WHS `.tfrecords`/`.npz` of PnP-AdaNet/SIFA, a CHAOS DICOM+PNG
folder, BTCV `img/`+`label/`) is recognised too (or named with --layout mmwhs|chaos|btcv): every
file is read and each bad one gets a line with its fix; training needs it converted first
(`python -m medgen_jax.data.convert`).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from medgen_jax.data.convert import FORMATS as RAW_FORMATS, check_raw, detect_raw_format
from medgen_jax.data.errors import DataError
from medgen_jax.data.layouts import LAYOUTS
from medgen_jax.data.loading import inspect_dataset


def _range(values, fmt="{:.2f}") -> str:
  lo, hi = min(values), max(values)
  return fmt.format(lo) if np.isclose(lo, hi) else f"{fmt.format(lo)}-{fmt.format(hi)}"


def _compact(n: int) -> str:
  return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e3 else str(n)


def summary_table(info, cases_by_site) -> str:
  """A markdown table, one row per site."""
  header = ["site", "cases", "shape (RAS)", "spacing mm", "intensity p1-p99"] + \
           [f"{info.labels[k]} vox" for k in sorted(info.labels) if k]
  rows = [header, ["---"] * len(header)]
  for site, cases in cases_by_site.items():
    shapes = sorted({"x".join(map(str, c.image.shape)) for c in cases})
    spacings = np.array([c.spacing for c in cases])
    spacing = " x ".join(_range(spacings[:, a]) for a in range(3))
    p1 = [float(np.percentile(c.image[::2, ::2, ::2], 1)) for c in cases]
    p99 = [float(np.percentile(c.image[::2, ::2, ::2], 99)) for c in cases]
    counts = np.zeros(info.num_classes, dtype=np.int64)
    for c in cases:
      counts += np.bincount(c.label.ravel(), minlength=info.num_classes)[: info.num_classes]
    rows.append([site, str(len(cases)), shapes[0] if len(shapes) == 1 else f"{len(shapes)} shapes",
                 spacing, f"{min(p1):.4g}-{max(p99):.4g}"] + [_compact(int(counts[k])) for k in sorted(info.labels) if k])
  widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
  return "\n".join("| " + " | ".join(cell.ljust(w) for cell, w in zip(r, widths)) + " |" for r in rows)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m medgen_jax.data.check", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("root")
  parser.add_argument("--layout", default="auto", choices=("auto",) + LAYOUTS + RAW_FORMATS)
  parser.add_argument("--sites", default="", help="comma-separated subset of sites (default: all folders)")
  parser.add_argument("--channel", type=int, default=None,
                      help="channel to use from 4-D images (msd: also the nnU-Net _000K file)")
  parser.add_argument("--site-csv", default="", help="msd layout: CSV with columns case,site")
  parser.add_argument("--site-pattern", default="",
                      help="msd layout: regular expression with a named group 'site', searched in the case id")
  args = parser.parse_args(argv)
  raw = args.layout if args.layout in RAW_FORMATS else (
      detect_raw_format(args.root) if args.layout == "auto" else None)
  if raw:
    lines, problems = check_raw(args.root, raw)
    for p in problems:
      print(p, file=sys.stderr)
    if problems:
      print(f"check failed: {len(problems)} problem(s)", file=sys.stderr)
      return 1
    print("\n".join(lines))
    print("ok")
    return 0
  sites = [s for s in args.sites.split(",") if s] or None
  try:
    info, cases_by_site, problems = inspect_dataset(args.root, layout=args.layout, sites=sites,
                                                    channel=args.channel, site_csv=args.site_csv,
                                                    site_pattern=args.site_pattern)
  except DataError as e:
    problems = e.problems
  if problems:
    for p in problems:
      print(p, file=sys.stderr)
    print(f"check failed: {len(problems)} problem(s)", file=sys.stderr)
    return 1
  n_cases = sum(len(c) for c in cases_by_site.values())
  print(f"{args.root}: layout {info.layout}, modality {info.modality}, {len(cases_by_site)} sites, "
        f"{n_cases} cases, labels {info.labels}"
        + (f", remap {info.label_remap}" if info.label_remap else ""))
  print(summary_table(info, cases_by_site))
  print("ok")
  return 0


if __name__ == "__main__":
  sys.exit(main())
