"""Dataset folder layouts: which files form a case, which labels a dataset has.

Three layouts:

* `prostate6`: the six-site prostate MRI collection (MS-Net, SAML, FedDG):
  `ROOT/{BIDMC,BMC,HK,I2CVB,RUNMC,UCL}/CaseNN.nii.gz` with `CaseNN_segmentation.nii.gz`
  (the suffix's capitalisation differs between sites, so it is matched case-insensitively).
  NCI-ISBI masks hold {0, 1, 2} (central gland, peripheral zone): 2 is merged into 1 as in all
  official code, giving whole-gland labels {0, 1}.
* `sites`: `ROOT/<site>/<case>_image.nii.gz` + `ROOT/<site>/<case>_label.nii.gz`, with an
  optional `ROOT/dataset.json`:
  `{"modality": "T1", "labels": {"0": "background", "1": "CSF", ...}, "label_remap": {"4": 0}}`.
  Without it the labels are binary {0: background, 1: foreground}. Label values are
  non-negative integers; `label_remap` maps raw file values (keys) to declared labels (values).
* `msd`: a Medical Segmentation Decathlon or nnU-Net (v1/v2) raw folder,
  `ROOT/{imagesTr,labelsTr}/` + `ROOT/dataset.json`, with the site of each case from a CSV or
  a regular expression on the case id (see msd.py).

Sites are the sub-folders of ROOT (hidden folders ignored) except for `msd`; a config may
select a subset.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from medgen_jax.data.errors import DataError, Problem
from medgen_jax.data.nifti import strip_nifti_suffix

LAYOUTS = ("prostate6", "sites", "msd")
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
  """'msd' if ROOT holds imagesTr/, labelsTr/ and dataset.json; 'sites' if ROOT/dataset.json or
  any *_image.nii* file exists; else 'prostate6'."""
  root = Path(root)
  if (root / "imagesTr").is_dir() and (root / "labelsTr").is_dir() and (root / DATASET_JSON).is_file():
    return "msd"
  if (root / DATASET_JSON).is_file():
    return "sites"
  for site_dir in _site_dirs(root):
    for f in site_dir.iterdir():
      stem = strip_nifti_suffix(f.name)
      if stem is not None and stem.lower().endswith("_image"):
        return "sites"
  return "prostate6"


MAX_LABEL = 255          # training labels are stored as uint8
MAX_RAW_LABEL = 65535    # raw values a label_remap may name (the remap table has one entry each)


def label_int(x) -> int | None:
  """A non-negative integer from a JSON key (a string of digits) or value (an int, or a string
  of digits); None for anything else ('-1', '1.5', 'x', 1.5, true, ...)."""
  if isinstance(x, bool):
    return None
  if isinstance(x, int):
    return x if x >= 0 else None
  if isinstance(x, str) and x.strip().isascii() and x.strip().isdigit():
    return int(x.strip())
  return None


def check_label_set(path: Path, labels: dict[int, str]) -> None:
  if 0 not in labels or sorted(labels) != list(range(len(labels))):
    raise DataError.single(path, f'"labels" values {sorted(labels)} must be 0..C-1 with 0 = background',
                           "number the training labels consecutively from 0 (map other raw values "
                           'with "label_remap")')
  if max(labels) > MAX_LABEL:
    raise DataError.single(path, f'"labels" has {len(labels)} classes; at most {MAX_LABEL + 1} are supported',
                           "merge classes")


def parse_labels(path: Path, raw) -> dict[int, str]:
  """`{"0": "background", "1": "tumour"}` -> {0: 'background', 1: 'tumour'}, validated."""
  if not isinstance(raw, dict) or not raw:
    raise DataError.single(path, '"labels" must be a non-empty object mapping label values to names',
                           'write e.g. "labels": {"0": "background", "1": "tumour"}')
  labels = {}
  for k, v in raw.items():
    value = label_int(k)
    if value is None or not isinstance(v, str):
      raise DataError.single(path, f'"labels" entry {json.dumps(k)}: {json.dumps(v)} is invalid: keys must '
                             "be non-negative integers written as strings, values names",
                             'write e.g. "labels": {"0": "background", "1": "tumour"}')
    labels[value] = v
  check_label_set(path, labels)
  return labels


def parse_label_remap(path: Path, raw, labels: dict[int, str]) -> dict[int, int]:
  """`{"2": 1}` -> {2: 1}: raw file value -> declared training label, each entry validated.

  A negative or non-integer entry would index the remap table wrongly (-1 is its last entry)
  or be truncated (1.5 -> 1), so every entry must be a non-negative integer exactly.
  """
  if raw is None:
    return {}
  if not isinstance(raw, dict):
    raise DataError.single(path, f'"label_remap" must be an object, not {json.dumps(raw)}',
                           'write e.g. "label_remap": {"2": 1} (raw value -> training label)')
  remap = {}
  for k, v in raw.items():
    key, target = label_int(k), label_int(v)
    entry = f'"label_remap" entry {json.dumps(k)}: {json.dumps(v)}'
    if key is None:
      raise DataError.single(path, f"{entry} has an invalid key: raw label values are non-negative integers",
                             'write the raw value as a string of digits, e.g. "2": 1, or remove the entry')
    if target is None:
      raise DataError.single(path, f"{entry} has an invalid value: training labels are non-negative integers",
                             f'map to a declared label number, e.g. {json.dumps(k)}: 0, or remove the entry')
    if key > MAX_RAW_LABEL:
      raise DataError.single(path, f"{entry}: raw label values above {MAX_RAW_LABEL} are not supported",
                             "renumber the raw labels in the files")
    remap[key] = target
  bad_targets = sorted(v for v in remap.values() if v not in labels)
  if bad_targets:
    raise DataError.single(path, f'"label_remap" maps to undeclared label(s) {bad_targets}',
                           'declare them under "labels" or change the remapping')
  return remap


def read_dataset_info(root: str | Path, layout: str, *, channel: int | None = None) -> DatasetInfo:
  root = Path(root)
  if layout == "prostate6":
    return DatasetInfo("prostate6", "T2", {0: "background", 1: "prostate"}, {2: 1})
  if layout == "msd":
    from medgen_jax.data import msd  # msd.py imports this module
    return msd.read_msd_dataset_json(root, channel=channel)[0]
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
  labels = parse_labels(path, meta.get("labels", {"0": "background", "1": "foreground"}))
  remap = parse_label_remap(path, meta.get("label_remap"), labels)
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


def discover(root: str | Path, *, layout: str = "auto", sites=None, channel: int | None = None,
             site_csv: str | Path = "", site_pattern: str = ""
             ) -> tuple[DatasetInfo, dict[str, list[CaseFiles]], list[Problem]]:
  """Finds the cases of each site. Returns (info, cases by site, problems found on the way).

  `channel`, `site_csv` and `site_pattern` are used by the `msd` layout only (which channel file
  of an nnU-Net case is the image; where each case's site comes from, see msd.py).

  Raises DataError only when nothing can be discovered at all (missing root, bad dataset.json,
  no site source for `msd`). Problems per site (missing or empty folder, image without label,
  label without image, case without site) are returned, so a checker can list them all;
  `load_dataset` turns them into one DataError.
  """
  root = Path(root)
  if not root.is_dir():
    raise DataError.single(root, "dataset folder does not exist",
                           "give the right data root, or run `python -m medgen_jax.data.synthesize --out "
                           f"{root}` to create the embedded brain-sites benchmark there")
  if layout == "auto":
    layout = detect_layout(root)
  if layout == "msd":
    from medgen_jax.data import msd  # msd.py imports this module
    info, all_cases, problems, site_source = msd.discover_msd(
        root, channel=channel, site_csv=site_csv, site_pattern=site_pattern)
    found = sorted(all_cases)
    missing_fix = f"use existing sites {found} in data.sites, or assign cases to it in {site_source}"
  else:
    if site_csv or site_pattern:
      key = "data.msd.site_csv" if site_csv else "data.msd.site_pattern"
      raise DataError.single(f"{key}={str(site_csv or site_pattern)!r}",
                             f"is only used by the msd layout, but {root} is read as the {layout!r} layout",
                             "set data.layout='msd' (--layout msd) for an imagesTr/labelsTr/dataset.json "
                             "folder, or unset it: this layout's sites are its sub-folders")
    info = read_dataset_info(root, layout)
    found = [p.name for p in _site_dirs(root)]
    problems = []
    missing_fix = f"use existing sites {found} in data.sites, or add the folder"
  if sites:
    wanted = list(sites)
    for site in wanted:
      if site not in found:
        problems.append(Problem(str(root / site), f"site {site!r} named in the config does not exist",
                                missing_fix))
    wanted = [s for s in wanted if s in found]
  else:
    wanted = found
    if not found and layout != "msd":
      problems.append(Problem(str(root), "no site folders found",
                              f"put each site's cases in ROOT/<site>/ ({layout} layout)"))
  by_site: dict[str, list[CaseFiles]] = {}
  for site in wanted:
    if layout == "msd":
      by_site[site] = all_cases[site]
      continue
    cases, site_problems = _pair_site_files(root / site, layout)
    problems.extend(site_problems)
    if not cases and not site_problems:
      problems.append(Problem(str(root / site), "site folder holds no cases",
                              "add its NIfTI cases or remove the empty folder"))
    by_site[site] = cases
  return info, by_site, problems
