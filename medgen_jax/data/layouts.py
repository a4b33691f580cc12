"""Dataset folder layouts: which files form a case, which labels a dataset has.

Two layouts:

* `prostate6`: the six-site prostate MRI collection (MS-Net, SAML, FedDG):
  `ROOT/{BIDMC,BMC,HK,I2CVB,RUNMC,UCL}/CaseNN.nii.gz` with `CaseNN_segmentation.nii.gz`
  (the suffix's capitalisation differs between sites, so it is matched case-insensitively).
  NCI-ISBI masks hold {0, 1, 2} (central gland, peripheral zone): 2 is merged into 1 as in all
  official code, giving whole-gland labels {0, 1}.
* `sites`: `ROOT/<site>/<case>_image.nii.gz` + `ROOT/<site>/<case>_label.nii.gz`, with an
  optional `ROOT/dataset.json`:
  `{"modality": "T1", "labels": {"0": "background", "1": "CSF", ...}, "label_remap": {"4": 0}}`.
  Without it the labels are binary {0: background, 1: foreground}.

Sites are the sub-folders of ROOT (hidden folders ignored); a config may select a subset.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from medgen_jax.data.errors import DataError, Problem
from medgen_jax.data.nifti import strip_nifti_suffix

LAYOUTS = ("prostate6", "sites")
PROSTATE6_SITES = ("BIDMC", "BMC", "HK", "I2CVB", "RUNMC", "UCL")
DATASET_JSON = "dataset.json"
_DATASET_JSON_KEYS = {"name", "description", "modality", "labels", "label_remap", "sites",
                      "license", "reference", "generator"}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the labels mean. `label_remap` maps raw file values to training label values."""

  layout: str
  modality: str
  labels: dict[int, str]
  label_remap: dict[int, int]

  @property
  def num_classes(self) -> int:
    return max(self.labels) + 1

  @property
  def raw_label_values(self) -> frozenset[int]:
    return frozenset(self.labels) | frozenset(self.label_remap)


@dataclasses.dataclass(frozen=True)
class CaseFiles:
  site: str
  case_id: str
  image: Path
  label: Path

  @property
  def key(self) -> str:
    return f"{self.site}/{self.case_id}"


def detect_layout(root: str | Path) -> str:
  """'sites' if ROOT/dataset.json or any *_image.nii* file exists, else 'prostate6'."""
  root = Path(root)
  if (root / DATASET_JSON).is_file():
    return "sites"
  for site_dir in _site_dirs(root):
    for f in site_dir.iterdir():
      stem = strip_nifti_suffix(f.name)
      if stem is not None and stem.lower().endswith("_image"):
        return "sites"
  return "prostate6"


def read_dataset_info(root: str | Path, layout: str) -> DatasetInfo:
  root = Path(root)
  if layout == "prostate6":
    return DatasetInfo("prostate6", "T2", {0: "background", 1: "prostate"}, {2: 1})
  if layout != "sites":
    raise DataError.single(f"data.layout={layout!r}", "unknown layout",
                           f"use one of {', '.join(LAYOUTS)}")
  path = root / DATASET_JSON
  if not path.is_file():
    return DatasetInfo("sites", "unknown", {0: "background", 1: "foreground"}, {})
  try:
    meta = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError.single(path, f"is not valid JSON ({e})", "fix the JSON syntax") from None
  if not isinstance(meta, dict):
    raise DataError.single(path, "must hold a JSON object", 'write {"labels": {"0": "background", ...}}')
  unknown = sorted(set(meta) - _DATASET_JSON_KEYS)
  if unknown:
    raise DataError.single(path, f"unknown key(s) {unknown}",
                           f"use only {sorted(_DATASET_JSON_KEYS)}")
  try:
    labels = {int(k): str(v) for k, v in meta.get("labels", {"0": "background", "1": "foreground"}).items()}
    remap = {int(k): int(v) for k, v in meta.get("label_remap", {}).items()}
  except (AttributeError, TypeError, ValueError):
    raise DataError.single(path, '"labels" and "label_remap" must map integer strings to names / integers',
                           'write e.g. "labels": {"0": "background", "1": "tumour"}, "label_remap": {"2": 1}') from None
  if 0 not in labels or sorted(labels) != list(range(len(labels))):
    raise DataError.single(path, f'"labels" keys {sorted(labels)} must be 0..C-1 with 0 = background',
                           "number the training labels consecutively from 0")
  bad_targets = sorted(v for v in remap.values() if v not in labels)
  if bad_targets:
    raise DataError.single(path, f'"label_remap" maps to undeclared label(s) {bad_targets}',
                           'declare them under "labels" or change the remapping')
  return DatasetInfo("sites", str(meta.get("modality", "unknown")), labels, remap)


def _site_dirs(root: Path) -> list[Path]:
  return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


_PROSTATE_LABEL = re.compile(r"^(?P<case>.+)_segmentation$", re.IGNORECASE)


def _pair_site_files(site_dir: Path, layout: str) -> tuple[list[CaseFiles], list[Problem]]:
  images: dict[str, Path] = {}
  labels: dict[str, Path] = {}
  for f in sorted(site_dir.iterdir()):
    if f.name.startswith(".") or not f.is_file():
      continue
    stem = strip_nifti_suffix(f.name)
    if stem is None:
      continue  # notes, spreadsheets etc. are not part of any case
    if layout == "prostate6":
      m = _PROSTATE_LABEL.match(stem)
      (labels if m else images)[m.group("case") if m else stem] = f
    else:
      lower = stem.lower()
      if lower.endswith("_image"):
        images[stem[: -len("_image")]] = f
      elif lower.endswith("_label"):
        labels[stem[: -len("_label")]] = f
  problems = []
  label_hint = ("CaseNN_segmentation.nii.gz" if layout == "prostate6" else "<case>_label.nii.gz")
  for case_id in sorted(set(images) - set(labels)):
    problems.append(Problem(str(images[case_id]), "case has no label file",
                            f"add {label_hint} next to it or move the image out of the dataset"))
  for case_id in sorted(set(labels) - set(images)):
    problems.append(Problem(str(labels[case_id]), "label file has no image",
                            "add the image or remove the label file"))
  cases = [CaseFiles(site_dir.name, c, images[c], labels[c]) for c in sorted(set(images) & set(labels))]
  return cases, problems


def discover(root: str | Path, *, layout: str = "auto", sites=None
             ) -> tuple[DatasetInfo, dict[str, list[CaseFiles]], list[Problem]]:
  """Finds the cases of each site. Returns (info, cases by site, problems found on the way).

  Raises DataError only when nothing can be discovered at all (missing root, bad dataset.json).
  Problems per site (missing or empty folder, image without label, label without image) are
  returned, so a checker can list them all; `load_dataset` turns them into one DataError.
  """
  root = Path(root)
  if not root.is_dir():
    raise DataError.single(root, "dataset folder does not exist",
                           "give the right data root, or run `python -m medgen_jax.data.synthesize --out "
                           f"{root}` to create the embedded brain-sites benchmark there")
  if layout == "auto":
    layout = detect_layout(root)
  info = read_dataset_info(root, layout)
  found = [p.name for p in _site_dirs(root)]
  problems: list[Problem] = []
  if sites:
    wanted = list(sites)
    for site in wanted:
      if site not in found:
        problems.append(Problem(str(root / site), f"site {site!r} named in the config does not exist",
                                f"use existing sites {found} in data.sites, or add the folder"))
    wanted = [s for s in wanted if s in found]
  else:
    wanted = found
    if not found:
      problems.append(Problem(str(root), "no site folders found",
                              f"put each site's cases in ROOT/<site>/ ({layout} layout)"))
  by_site: dict[str, list[CaseFiles]] = {}
  for site in wanted:
    cases, site_problems = _pair_site_files(root / site, layout)
    problems.extend(site_problems)
    if not cases and not site_problems:
      problems.append(Problem(str(root / site), "site folder holds no cases",
                              "add its NIfTI cases or remove the empty folder"))
    by_site[site] = cases
  return info, by_site, problems
