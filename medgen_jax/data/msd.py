"""The `msd` layout: Medical Segmentation Decathlon and nnU-Net raw folders, sites from a CSV or a pattern.

    ROOT/dataset.json
    ROOT/imagesTr/<case>.nii.gz         MSD: one file per case, 4-D when multi-channel
    ROOT/imagesTr/<case>_0000.nii.gz    nnU-Net v1/v2: one 3-D file per channel, _0000, _0001, ...
    ROOT/labelsTr/<case>.nii.gz         (imagesTs/ has no labels and is not read)

dataset.json, either dialect (other keys are ignored):
  * MSD: "labels": {"0": "background", "1": "PZ", "2": "TZ"} (value -> name),
    "modality": {"0": "T2", "1": "ADC"}, "training": [{"image": ..., "label": ...}], "numTraining".
  * nnU-Net v2: "labels": {"background": 0, "prostate": 1} (name -> value),
    "channel_names": {"0": "T2"}, "numTraining", "file_ending": ".nii.gz". Region-based labels
    (a list of values per name) and the "ignore" label are rejected: training here is one
    softmax over disjoint classes.
  * Optional (ours): "label_remap": {"2": 1}, as in the `sites` layout.
Cases are found from the files (labelsTr/ paired with imagesTr/), not from the "training" list
(nnU-Net v1 lists image names without the channel suffix); "numTraining", when given, must equal
the number of label files, which catches an incomplete copy.

Multi-channel data: `channel` (config `data.channel`, `--channel`) picks the `_000<channel>` file
(nnU-Net) or the volume along the 4th axis (MSD); with several channels listed in dataset.json
and no channel chosen, discovery stops with one error naming the channels.

Sites: neither format records where a scan was made, so each case's site comes from
  * `site_csv` (`data.msd.site_csv`, `--site-csv`): a CSV with columns `case` and `site` (others
    ignored; a relative path is looked up in the working directory, then in ROOT), or
  * `site_pattern` (`data.msd.site_pattern`, `--site-pattern`): a regular expression with a named
    group `site`, searched in the case id, e.g. '^(?P<site>[A-Za-z]+)_' for 'BIDMC_03'.
Exactly one is required. A case whose site cannot be determined is a problem naming its file.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from medgen_jax.data.errors import DataError, Problem
from medgen_jax.data.layouts import (DATASET_JSON, CaseFiles, DatasetInfo, check_label_set, label_int,
                                     parse_label_remap, parse_labels)
from medgen_jax.data.nifti import NIFTI_SUFFIXES, strip_nifti_suffix

SITE_KEYS = "data.msd.site_csv / data.msd.site_pattern"
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_EXAMPLE_PATTERN = "'^(?P<site>[A-Za-z]+)_'"


def _load_json(path: Path) -> dict:
  if not path.is_file():
    raise DataError.single(path, "does not exist",
                           "the msd layout needs ROOT/dataset.json with at least \"labels\" (MSD or "
                           "nnU-Net v2 format)")
  try:
    meta = json.loads(path.read_text(encoding="utf-8-sig"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError.single(path, f"is not valid JSON ({e})", "fix the JSON syntax") from None
  if not isinstance(meta, dict):
    raise DataError.single(path, "must hold a JSON object", 'write {"labels": {"0": "background", ...}}')
  return meta


def _nnunet_labels(path: Path, raw: dict, meta: dict) -> dict[int, str]:
  """nnU-Net v2 `{"background": 0, "prostate": 1}` -> {0: 'background', 1: 'prostate'}."""
  regions = [name for name, v in raw.items() if isinstance(v, (list, tuple))]
  if regions or "regions_class_order" in meta:
    raise DataError.single(path, f'region-based "labels" {regions} (nnU-Net regions) are not supported',
                           "give each class a single integer value (disjoint classes), e.g. "
                           '"labels": {"background": 0, "edema": 1, "necrosis": 2, "enhancing": 3}')
  if "ignore" in raw:
    raise DataError.single(path, f'the "ignore" label (value {json.dumps(raw["ignore"])}, sparse '
                           "annotation) is not supported",
                           'remove it from "labels" and map its value with "label_remap" (those voxels then '
                           "train as that class), or annotate every voxel")
  labels: dict[int, str] = {}
  for name, v in raw.items():
    value = label_int(v)
    if value is None or isinstance(v, str):
      raise DataError.single(path, f'"labels" entry {json.dumps(name)}: {json.dumps(v)} is invalid: nnU-Net '
                             "labels map each class name to a non-negative integer",
                             'write e.g. "labels": {"background": 0, "prostate": 1}')
    if value in labels:
      raise DataError.single(path, f'"labels" names {labels[value]!r} and {name!r} share the value {value}',
                             "give every class its own value")
    labels[value] = name
  check_label_set(path, labels)
  return labels


def _channel_names(path: Path, meta: dict) -> dict[int, str]:
  key = "channel_names" if "channel_names" in meta else "modality" if "modality" in meta else None
  if key is None:
    return {}
  raw = meta[key]
  if isinstance(raw, str):  # some hand-written files give one modality as a plain string
    return {0: raw}
  names = {label_int(k): v for k, v in raw.items()} if isinstance(raw, dict) else {None: None}
  if None in names or sorted(names) != list(range(len(names))):
    raise DataError.single(path, f'"{key}" must map channel numbers "0", "1", ... to names, not '
                           f"{json.dumps(raw)}", f'write e.g. "{key}": {{"0": "T2", "1": "ADC"}}')
  return {k: str(v) for k, v in names.items()}


def read_msd_dataset_json(root: str | Path, *, channel: int | None = None
                          ) -> tuple[DatasetInfo, dict[int, str], str]:
  """(DatasetInfo, channel names, file ending) from ROOT/dataset.json, either dialect."""
  path = Path(root) / DATASET_JSON
  meta = _load_json(path)
  raw = meta.get("labels")
  if not isinstance(raw, dict) or not raw:
    raise DataError.single(path, '"labels" is missing or empty',
                           'add "labels": {"0": "background", "1": "organ"} (MSD) or '
                           '{"background": 0, "organ": 1} (nnU-Net v2)')
  if all(label_int(k) is not None and isinstance(v, str) for k, v in raw.items()):
    labels = parse_labels(path, raw)  # MSD: value -> name
  elif all(label_int(k) is None for k in raw):
    labels = _nnunet_labels(path, raw, meta)  # nnU-Net v2: name -> value
  else:
    raise DataError.single(path, f'"labels" mixes the two formats: {json.dumps(raw)}',
                           'write either {"0": "background", "1": "organ"} (MSD) or '
                           '{"background": 0, "organ": 1} (nnU-Net v2)')
  remap = parse_label_remap(path, meta.get("label_remap"), labels)
  ending = meta.get("file_ending", ".nii.gz")
  if not isinstance(ending, str) or ending.lower() not in NIFTI_SUFFIXES:
    raise DataError.single(path, f'"file_ending" {json.dumps(ending)} is not supported (NIfTI only)',
                           "convert the images and labels to .nii.gz (e.g. with SimpleITK) and set "
                           '"file_ending": ".nii.gz"')
  names = _channel_names(path, meta)
  if channel is None and len(names) > 1:
    raise DataError.single(path, f"lists {len(names)} channels {names}",
                           "select one with data.channel=<index> (check: --channel <index>)")
  if channel is not None and names and not 0 <= channel < len(names):
    raise DataError.single(path, f"channel {channel} does not exist; the channels are {names}",
                           f"choose data.channel (--channel) in [0, {len(names) - 1}]")
  modality = names.get(channel or 0, "unknown")
  return DatasetInfo("msd", modality, labels, remap), names, ending.lower()


def read_site_csv(path: Path) -> dict[str, str]:
  """{case id: site} from a CSV with columns `case` and `site` (file-name case ids accepted)."""
  try:
    text = path.read_text(encoding="utf-8-sig")
  except (OSError, UnicodeDecodeError) as e:
    raise DataError.single(path, f"site CSV cannot be read ({e})",
                           "give data.msd.site_csv (--site-csv) as a UTF-8 CSV file with columns case,site"
                           ) from None
  rows = csv.reader(io.StringIO(text))
  header = [c.strip().lower() for c in next(rows, [])]
  if "case" not in header or "site" not in header:
    raise DataError.single(path, f"site CSV header {header} lacks the columns 'case' and 'site'",
                           "make the first line 'case,site' and give one case per line, e.g. 'prostate_00,BIDMC'")
  ci, si = header.index("case"), header.index("site")
  sites: dict[str, str] = {}
  problems = []
  for line, row in enumerate(rows, start=2):
    if not any(cell.strip() for cell in row):
      continue
    case = row[ci].strip() if ci < len(row) else ""
    site = row[si].strip() if si < len(row) else ""
    if not case or not site:
      problems.append(Problem(f"{path}:{line}", f"row {row} has an empty case or site",
                              "fill in both columns or delete the row"))
      continue
    case = strip_nifti_suffix(case) or case
    if sites.get(case, site) != site:
      problems.append(Problem(f"{path}:{line}", f"case {case!r} is listed with two sites "
                              f"({sites[case]!r} and {site!r})", "keep one row per case"))
    sites[case] = site
  if problems:
    raise DataError(problems)
  return sites


def site_assigner(root: Path, site_csv, site_pattern: str):
  """Returns (site_of(case_id, image_path) -> (site or None, Problem or None), source description)."""
  if site_csv and site_pattern:
    raise DataError.single(SITE_KEYS, "both a site CSV and a site pattern are set",
                           "set only one of data.msd.site_csv (--site-csv) and data.msd.site_pattern "
                           "(--site-pattern)")
  if site_csv:
    path = Path(site_csv)
    if not path.is_absolute() and not path.is_file() and (root / path).is_file():
      path = root / path
    if not path.is_file():
      raise DataError.single(path, "site CSV (data.msd.site_csv, --site-csv) does not exist",
                             "give the path of a CSV with columns case,site (relative paths are tried in "
                             "the working directory, then in the dataset root)")
    table = read_site_csv(path)

    def site_of(case_id, image):
      if case_id in table:
        return table[case_id], None
      return None, Problem(str(image), f"site of case {case_id!r} cannot be determined: the case is "
                           f"not listed in {path}", f"add a row '{case_id},<site>' to {path}, or remove the "
                           "case from imagesTr/labelsTr")
    return site_of, str(path)
  if site_pattern:
    key = f"data.msd.site_pattern={site_pattern!r}"
    try:
      rx = re.compile(site_pattern)
    except re.error as e:
      raise DataError.single(key, f"is not a valid regular expression ({e})",
                             f"fix the pattern (--site-pattern), e.g. {_EXAMPLE_PATTERN}") from None
    if "site" not in rx.groupindex:
      raise DataError.single(key, "has no named group 'site'",
                             f"wrap the part of the case id that names the site in (?P<site>...), e.g. "
                             f"{_EXAMPLE_PATTERN}")

    def site_of(case_id, image):
      m = rx.search(case_id)
      if m and m.group("site"):
        return m.group("site"), None
      return None, Problem(str(image), f"site of case {case_id!r} cannot be determined: site pattern "
                           f"{site_pattern!r} does not match it", "change data.msd.site_pattern "
                           "(--site-pattern) so that its (?P<site>...) group matches every case id, use a "
                           "site CSV (--site-csv) instead, or remove the case")
    return site_of, f"data.msd.site_pattern={site_pattern!r}"
  raise DataError.single(SITE_KEYS, f"the msd layout needs the site of each case of {root}, and neither "
                         "is set", "set data.msd.site_csv to a CSV with columns case,site, or "
                         "data.msd.site_pattern to a regular expression with a named group 'site', e.g. "
                         f"{_EXAMPLE_PATTERN} (check: --site-csv F or --site-pattern P)")


def _nifti_files(folder: Path) -> dict[str, Path]:
  """{name without suffix: path}; hidden files (e.g. MSD's macOS '._x.nii.gz') are skipped."""
  files = {}
  for f in sorted(folder.iterdir()):
    if f.name.startswith(".") or not f.is_file():
      continue
    stem = strip_nifti_suffix(f.name)
    if stem is not None:
      files[stem] = f
  return files


def discover_msd(root: str | Path, *, channel: int | None = None, site_csv="", site_pattern: str = ""
                 ) -> tuple[DatasetInfo, dict[str, list[CaseFiles]], list[Problem], str]:
  """(info, cases by site (sorted), problems, where the sites came from)."""
  root = Path(root)
  info, names, ending = read_msd_dataset_json(root, channel=channel)
  for sub in ("imagesTr", "labelsTr"):
    if not (root / sub).is_dir():
      raise DataError.single(root / sub, "folder does not exist",
                             "the msd layout needs ROOT/imagesTr/, ROOT/labelsTr/ and ROOT/dataset.json")
  site_of, source = site_assigner(root, site_csv, site_pattern)
  labels = _nifti_files(root / "labelsTr")
  images: dict[str, dict[int | None, Path]] = {}  # case -> {channel (None: one MSD file): path}
  for stem, f in _nifti_files(root / "imagesTr").items():
    m = _CHANNEL_FILE.match(stem)
    if stem in labels or not m:
      images.setdefault(stem, {})[None] = f
    else:
      images.setdefault(m.group("case"), {})[int(m.group("channel"))] = f
  problems: list[Problem] = []
  json_path = root / DATASET_JSON
  meta_count = json.loads(json_path.read_text(encoding="utf-8-sig")).get("numTraining")
  if isinstance(meta_count, int) and not isinstance(meta_count, bool) and meta_count != len(labels):
    problems.append(Problem(str(json_path), f'"numTraining" is {meta_count} but labelsTr holds '
                            f"{len(labels)} label files", "copy the missing cases, or correct numTraining"))
  by_site: dict[str, list[CaseFiles]] = {}
  for case_id in sorted(set(images) | set(labels)):
    files = images.get(case_id, {})
    if case_id not in labels:
      shown = next(iter(files.values()))
      problems.append(Problem(str(shown), "case has no label file",
                              f"add labelsTr/{case_id}{ending} or move the image out of imagesTr"))
      continue
    if not files:
      problems.append(Problem(str(labels[case_id]), "label file has no image",
                              f"add imagesTr/{case_id}_0000{ending} (nnU-Net) or imagesTr/{case_id}{ending} "
                              "(MSD), or remove the label file"))
      continue
    if None in files:
      image = files[None]
    else:
      want = 0 if channel is None else channel
      if channel is None and len(files) > 1:
        problems.append(Problem(str(files[min(files)]), f"case has {len(files)} channel files",
                                "select one with data.channel=<index> (check: --channel <index>)"))
        continue
      if want not in files:
        problems.append(Problem(str(root / "imagesTr" / f"{case_id}_{want:04d}{ending}"),
                                f"channel {want} file of case {case_id!r} does not exist",
                                f"add it, or choose a channel among {sorted(files)} with data.channel"))
        continue
      image = files[want]
    site, problem = site_of(case_id, image)
    if problem is not None:
      problems.append(problem)
      continue
    by_site.setdefault(site, []).append(CaseFiles(site, case_id, image, labels[case_id]))
  if not labels and not images:
    problems.append(Problem(str(root / "labelsTr"), "imagesTr/ and labelsTr/ hold no cases",
                            f"put <case>{ending} label files in labelsTr/ and their images in imagesTr/"))
  return info, dict(sorted(by_site.items())), problems, source
