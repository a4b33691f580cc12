"""Validated loading of a multi-site dataset: one pass per case finds every problem.

`inspect_case` is shared by the checker CLI and the loader, so both report the same problems in
the same words. `load_dataset` raises one DataError listing all of them, unless
`skip_bad_cases=True`, in which case each bad case is dropped with a DataWarning that names its
files (a bad case never disappears silently).
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np

from medgen_jax.data.errors import DataError, DataWarning, Problem
from medgen_jax.data.layouts import CaseFiles, DatasetInfo, discover
from medgen_jax.data.nifti import load_nifti, voxel_spacing

AFFINE_TOLERANCE_MM = 1e-3


@dataclasses.dataclass(frozen=True)
class Case:
  """One validated volume pair in RAS+ orientation; labels already remapped."""

  site: str
  case_id: str
  image: np.ndarray  # float32 [X, Y, Z]
  label: np.ndarray  # uint8 [X, Y, Z], values in DatasetInfo.labels
  affine: np.ndarray
  image_path: str
  label_path: str

  @property
  def spacing(self) -> tuple[float, float, float]:
    return voxel_spacing(self.affine)

  @property
  def key(self) -> str:
    return f"{self.site}/{self.case_id}"


def _value_counts(values: np.ndarray) -> dict[int, int]:
  if values.size and values.min() >= 0 and values.max() < 1 << 16:
    counts = np.bincount(values.ravel().astype(np.int64))
    return {int(v): int(c) for v, c in enumerate(counts) if c}
  uniq, counts = np.unique(values, return_counts=True)
  return {int(v): int(c) for v, c in zip(uniq, counts)}


def inspect_case(files: CaseFiles, info: DatasetInfo, *, channel: int | None = None
                 ) -> tuple[Case | None, list[Problem]]:
  """Loads and checks one case. Returns (case or None, every problem found)."""
  problems: list[Problem] = []
  image = label = None
  try:
    image = load_nifti(files.image, channel=channel, dtype=np.float32)
  except DataError as e:
    problems.extend(e.problems)
  try:
    label = load_nifti(files.label, dtype=np.float64)
  except DataError as e:
    problems.extend(e.problems)

  if image is not None:
    bad = ~np.isfinite(image.data)
    if bad.any():
      problems.append(Problem(str(files.image), f"{int(bad.sum())} voxel(s) are NaN or Inf",
                              "fix the export (or replace them, e.g. np.nan_to_num) before training"))
  label_values = None
  if label is not None:
    data = label.data
    finite = np.isfinite(data)
    if not finite.all() or not np.array_equal(data[finite], np.round(data[finite])):
      problems.append(Problem(str(files.label), "label volume has non-integer values",
                              "save labels as integers (nearest-neighbour resampling only)"))
    else:
      label_values = data.astype(np.int64)
      counts = _value_counts(label_values)
      outside = sorted(set(counts) - info.raw_label_values)
      if outside:
        problems.append(Problem(
            str(files.label),
            f"label values {outside} are outside the label set {sorted(info.raw_label_values)}",
            'declare them in ROOT/dataset.json ("labels" or "label_remap") or fix the mask'))
  if image is not None and label is not None:
    if image.data.shape != label.data.shape:
      problems.append(Problem(str(files.label),
                              f"label shape {label.data.shape} differs from image shape {image.data.shape}",
                              "resample the label onto the image grid (nearest neighbour)"))
    elif not np.allclose(image.affine, label.affine, atol=AFFINE_TOLERANCE_MM):
      problems.append(Problem(str(files.label),
                              "label affine differs from the image affine (different voxel grids)",
                              "resample the label onto the image grid or fix its header"))
  if problems:
    return None, problems
  lut = np.arange(max(max(info.raw_label_values), 0) + 1, dtype=np.uint8)
  for raw, target in info.label_remap.items():
    lut[raw] = target
  return Case(files.site, files.case_id, image.data, lut[label_values], image.affine,
              str(files.image), str(files.label)), []


def inspect_dataset(root, *, layout="auto", sites=None, channel=None, site_csv="", site_pattern=""):
  """Checks a dataset folder. Returns (info, {site: [Case]}, problems).

  Raises DataError only where `discover` does (nothing discoverable). `site_csv`/`site_pattern`
  give the sites of the `msd` layout (see msd.py).
  """
  info, files_by_site, problems = discover(root, layout=layout, sites=sites, channel=channel,
                                           site_csv=site_csv, site_pattern=site_pattern)
  cases_by_site: dict[str, list[Case]] = {}
  for site, files in files_by_site.items():
    cases_by_site[site] = []
    for f in files:
      case, case_problems = inspect_case(f, info, channel=channel)
      problems.extend(case_problems)
      if case is not None:
        cases_by_site[site].append(case)
  return info, cases_by_site, problems


def load_dataset(root, *, layout="auto", sites=None, channel=None, skip_bad_cases=False,
                 site_csv="", site_pattern="") -> tuple[DatasetInfo, dict[str, list[Case]]]:
  """Loads every case of the selected sites.

  Raises DataError listing every problem, or with `skip_bad_cases=True` warns (DataWarning)
  with each skipped file and goes on. A requested site that is missing, or left with no usable
  case, is always an error: silently training without a hospital is never what was meant.
  """
  info, cases_by_site, problems = inspect_dataset(root, layout=layout, sites=sites, channel=channel,
                                                  site_csv=site_csv, site_pattern=site_pattern)
  missing_site = sites is not None and any(s not in cases_by_site for s in sites)
  if problems:
    if not skip_bad_cases or missing_site:
      raise DataError(problems)
    warnings.warn(
        "skipping bad cases (data.skip_bad_cases=True):\n" + "\n".join(str(p) for p in problems),
        DataWarning, stacklevel=2)
  empty = [site for site, cases in cases_by_site.items() if not cases]
  if empty:
    raise DataError([Problem(str(Path(root) / s), "site has no usable case",
                             "fix its cases (see `python -m medgen_jax.data.check`) or drop the site")
                     for s in empty])
  return info, cases_by_site
