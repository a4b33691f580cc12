"""Draws one axial slice per site with its label overlaid, so the domain shift is visible.

    python -m medgen_jax.data.preview ROOT --out preview.png [--layout auto] [--case 0]

Each panel shows the raw intensities of one case (the site's own scale, windowed to its
1st-99th percentile) above the same slice with the labels overlaid, and the site's intensity
histogram inside the labelled region.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from medgen_jax.data.errors import DataError
from medgen_jax.data.layouts import LAYOUTS
from medgen_jax.data.loading import load_dataset


def _axial_slice_with_most_foreground(label: np.ndarray) -> int:
  return int(np.argmax((label > 0).sum(axis=(0, 1))))


def draw_preview(cases_by_site, info, out: str | Path, *, case_index: int = 0,
                 root_name: str = "dataset") -> Path:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.colors import ListedColormap

  sites = list(cases_by_site)
  fig, axes = plt.subplots(3, len(sites), figsize=(2.6 * len(sites), 7.6), squeeze=False,
                           gridspec_kw={"height_ratios": [1, 1, 0.55]})
  colours = ListedColormap(["#00000000", "#1f77b4", "#d62728", "#f1c40f", "#2ca02c", "#9467bd",
                            "#8c564b", "#e377c2"][: info.num_classes])
  for col, site in enumerate(sites):
    case = cases_by_site[site][min(case_index, len(cases_by_site[site]) - 1)]
    z = _axial_slice_with_most_foreground(case.label)
    image = case.image[:, :, z].T[::-1]  # RAS -> anterior up, patient's right on the right
    label = case.label[:, :, z].T[::-1]
    lo, hi = np.percentile(case.image, [1, 99])
    for row in (0, 1):
      ax = axes[row, col]
      ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
      if row == 1:
        ax.imshow(np.ma.masked_equal(label, 0), cmap=colours, vmin=0, vmax=info.num_classes - 1,
                  alpha=0.45, interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
    axes[0, col].set_title(f"site {site}\n{case.case_id}, z={z}", fontsize=9)
    inside = case.image[case.label > 0]
    axes[2, col].hist(inside, bins=60, color="0.3")
    axes[2, col].set_yticks([])
    axes[2, col].tick_params(labelsize=7)
    axes[2, col].set_xlabel("intensity in labels", fontsize=8)
  names = ", ".join(f"{v}" for k, v in sorted(info.labels.items()) if k)
  fig.suptitle(f"{root_name}: one slice per site (labels: {names})", fontsize=10)
  fig.tight_layout()
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=80)
  plt.close(fig)
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m medgen_jax.data.preview", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("root")
  parser.add_argument("--out", default="preview.png")
  parser.add_argument("--layout", default="auto", choices=("auto",) + LAYOUTS)
  parser.add_argument("--case", type=int, default=0, help="index of the case shown per site")
  parser.add_argument("--channel", type=int, default=None, help="channel to use from 4-D images")
  parser.add_argument("--site-csv", default="", help="msd layout: CSV with columns case,site")
  parser.add_argument("--site-pattern", default="", help="msd layout: regex with a named group 'site'")
  args = parser.parse_args(argv)
  try:
    info, cases_by_site = load_dataset(args.root, layout=args.layout, channel=args.channel,
                                       site_csv=args.site_csv, site_pattern=args.site_pattern)
    out = draw_preview(cases_by_site, info, args.out, case_index=args.case,
                       root_name=Path(args.root).name)
  except DataError as e:
    print(e, file=sys.stderr)
    return 1
  except OSError as e:  # the PNG could not be written (no such folder, disk full, ...)
    print(f"{args.out}: cannot write the preview ({e.strerror or e}). Fix: choose a writable --out path",
          file=sys.stderr)
    return 1
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
