"""CHAOS (abdominal CT + MR, DICOM slices with PNG ground truth) and the BTCV / Synapse label remap.

CHAOS training layout (ROOT may be `CHAOS_Train_Sets/Train_Sets`, `CHAOS_Train_Sets` or its parent):

    CT/<patient>/DICOM_anon/*.dcm                  CT/<patient>/Ground/*.png         liver only: 0 / 255
    MR/<patient>/T2SPIR/DICOM_anon/*.dcm           MR/<patient>/T2SPIR/Ground/*.png
    MR/<patient>/T1DUAL/DICOM_anon/InPhase/*.dcm   MR/<patient>/T1DUAL/Ground/*.png  (one mask per slice
    MR/<patient>/T1DUAL/DICOM_anon/OutPhase/*.dcm                                     position, both phases)

* MR ground-truth grey levels (official ranges): liver 55-70 (63) -> 1, right kidney 110-135 (126)
  -> 2, left kidney 175-200 (189) -> 3, spleen 240-255 (252) -> 4. CT: 255 -> 1 (liver); CHAOS CT
  has no kidney or spleen annotation, so those organs are background there.
* T1-DUAL in-phase and out-phase are read from their own folders (`InPhase`, `OutPhase`). Where
  the headers carry EchoTime, the in-phase echo must be the longer one (the first in-phase echo
  comes after the first opposed-phase echo at 1.5 T and 3 T); a swap is an error. A T1DUAL
  `DICOM_anon` folder without the two sub-folders is split by its two EchoTime values instead.
* Slices are ordered by ImagePositionPatient projected on the slice normal (the cross product of
  the two ImageOrientationPatient directions), not by file name: anonymised CHAOS file names and
  InstanceUIDs do not give the spatial order. Each PNG is paired with its DICOM *before* sorting:
  by equal file stem when every DICOM has a PNG of the same name (MR), else by natural-sorted file
  name order (CT: `i0000,0000b.dcm` ... with `liver_GT_000.png` ...), so image and mask move together.
* Spacing: in-plane from PixelSpacing (row spacing, column spacing), through-plane from the
  positions of consecutive slices (which must be evenly spaced: a gap means a missing file).
  The affine maps the DICOM patient frame (LPS) to RAS, so the NIfTI written by convert.py is in
  the scanner's true orientation. CT intensities get RescaleSlope/RescaleIntercept (HU).

pydicom is an optional dependency (`pip install medgen_jax[dicom]`); PNG masks are read with
Pillow, which matplotlib (a dependency) already requires.

BTCV / Synapse multi-organ CT (`img/imgXXXX.nii.gz`, `label/labelXXXX.nii.gz`, as in RawData/Training):
the 13 challenge labels (1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 5 esophagus,
6 liver, 7 stomach, 8 aorta, 9 IVC, 10 portal/splenic vein, 11 pancreas, 12/13 adrenal glands)
are mapped to SIFA's 4 classes: liver 6 -> 1, right kidney 2 -> 2, left kidney 3 -> 3, spleen 1 -> 4,
everything else -> 0.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from medgen_jax.data.errors import DataError, Problem

LABELS = {0: "background", 1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"}
MR_GREY_RANGES = ((55, 70, 1), (110, 135, 2), (175, 200, 3), (240, 255, 4))
BTCV_REMAP = {6: 1, 2: 2, 3: 3, 1: 4}
BTCV_MAX_LABEL = 13
SEQUENCES = ("T2SPIR", "T1DUAL_InPhase", "T1DUAL_OutPhase")
PYDICOM_FIX = "pip install medgen_jax[dicom]  (installs pydicom, needed to read DICOM)"


def _pydicom():
  try:
    import pydicom
  except ImportError:
    raise DataError.single("pydicom", "is not installed; reading CHAOS DICOM needs it", PYDICOM_FIX) from None
  return pydicom


def natural_key(name: str):
  return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


# --------------------------------------------------------------------------------------------
# label maps


def mr_grey_to_labels(path, grey: np.ndarray) -> np.ndarray:
  """CHAOS MR mask grey levels -> 0..4 (official ranges); any other non-zero level is an error."""
  grey = np.asarray(grey)
  out = np.zeros(grey.shape, np.uint8)
  known = grey == 0
  for lo, hi, label in MR_GREY_RANGES:
    inside = (grey >= lo) & (grey <= hi)
    out[inside] = label
    known |= inside
  if not known.all():
    bad = sorted(set(np.unique(grey[~known]).tolist()))
    raise DataError.single(path, f"mask grey levels {bad[:8]} are outside the CHAOS MR ranges "
                           "(liver 55-70, right kidney 110-135, left kidney 175-200, spleen 240-255)",
                           "use the original CHAOS Ground PNGs (no resampling or colour conversion)")
  return out


def ct_grey_to_labels(path, grey: np.ndarray) -> np.ndarray:
  """CHAOS CT liver mask 0 / 255 -> 0 / 1."""
  grey = np.asarray(grey)
  bad = sorted(set(np.unique(grey).tolist()) - {0, 255})
  if bad:
    raise DataError.single(path, f"mask values {bad[:8]} are not 0 / 255 (CHAOS CT liver masks)",
                           "use the original CHAOS CT Ground PNGs")
  return (grey == 255).astype(np.uint8)


def btcv_to_labels(path, raw: np.ndarray) -> np.ndarray:
  """BTCV labels 0..13 -> liver 1, right kidney 2, left kidney 3, spleen 4, rest 0."""
  raw = np.asarray(raw)
  if not np.array_equal(raw, np.round(raw)):
    raise DataError.single(path, "label volume has non-integer values", "use the original BTCV label files")
  values = set(np.unique(raw).astype(np.int64).tolist())
  bad = sorted(v for v in values if not 0 <= v <= BTCV_MAX_LABEL)
  if bad:
    raise DataError.single(path, f"label values {bad[:8]} are outside the BTCV labels 0..13",
                           "use the original BTCV (Synapse multi-organ) label files")
  lut = np.zeros(BTCV_MAX_LABEL + 1, np.uint8)
  for k, v in BTCV_REMAP.items():
    lut[k] = v
  return lut[raw.astype(np.int64)]


# --------------------------------------------------------------------------------------------
# PNG and DICOM


def read_png(path) -> np.ndarray:
  """An 8/16-bit grey PNG (or RGB with equal channels, or palette) as a 2-D integer array [row, col]."""
  from PIL import Image
  path = Path(path)
  try:
    with Image.open(path) as img:
      if img.mode == "P":
        img = img.convert("RGB")
      arr = np.array(img)
  except Exception as e:  # PIL raises several types
    raise DataError.single(path, f"not a readable PNG ({type(e).__name__}: {e})",
                           "re-copy the mask file from the CHAOS archive") from None
  if arr.ndim == 3:
    if arr.shape[2] == 4:
      arr = arr[..., :3]
    if not (arr == arr[..., :1]).all():
      raise DataError.single(path, "is a colour image with different R, G, B values",
                             "use the original grey-level CHAOS masks")
    arr = arr[..., 0]
  return arr.astype(np.int64)


@dataclasses.dataclass
class DicomSlice:
  path: Path
  pixels: np.ndarray        # [row, col] float32, rescale applied
  position: np.ndarray      # ImagePositionPatient (LPS, mm)
  row_dir: np.ndarray       # direction of increasing column index
  col_dir: np.ndarray       # direction of increasing row index
  pixel_spacing: tuple[float, float]  # (between rows, between columns)
  echo_time: float | None
  instance: int | None


def read_dicom(path) -> DicomSlice:
  pydicom = _pydicom()
  path = Path(path)
  try:
    ds = pydicom.dcmread(str(path))
  except Exception as e:
    raise DataError.single(path, f"not a readable DICOM file ({type(e).__name__}: {e})",
                           "re-copy the file from the CHAOS archive or remove it") from None
  missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
             if k not in ds]
  if missing:
    raise DataError.single(path, f"DICOM header lacks {', '.join(missing)}",
                           "slices cannot be placed in space without them; use the original CHAOS files")
  try:
    pixels = ds.pixel_array.astype(np.float32)
  except Exception as e:
    raise DataError.single(path, f"pixel data cannot be decoded ({type(e).__name__}: {e})",
                           "re-copy the file; compressed transfer syntaxes need pydicom's optional "
                           "decoders (pylibjpeg / gdcm)") from None
  if pixels.ndim != 2:
    raise DataError.single(path, f"pixel data has shape {pixels.shape}, not one 2-D slice",
                           "CHAOS series are one slice per file")
  slope = float(getattr(ds, "RescaleSlope", 1) or 1)
  intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
  if slope != 1 or intercept != 0:
    pixels = pixels * np.float32(slope) + np.float32(intercept)
  iop = np.array([float(v) for v in ds.ImageOrientationPatient])
  te = getattr(ds, "EchoTime", None)
  inst = getattr(ds, "InstanceNumber", None)
  return DicomSlice(path, pixels, np.array([float(v) for v in ds.ImagePositionPatient]), iop[:3], iop[3:],
                    (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
                    None if te in (None, "") else float(te), None if inst in (None, "") else int(inst))


def pair_masks(dicoms: list[Path], pngs: list[Path], folder: Path) -> list[tuple[Path, Path]]:
  """(dicom, png) pairs: by equal stem when every DICOM has one, else by natural-sorted name order."""
  by_stem = {p.stem: p for p in pngs}
  if dicoms and all(d.stem in by_stem for d in dicoms):
    return [(d, by_stem[d.stem]) for d in dicoms]
  if len(dicoms) != len(pngs):
    raise DataError.single(folder, f"{len(dicoms)} DICOM slice(s) but {len(pngs)} mask PNG(s)",
                           "every slice needs exactly one Ground PNG; re-copy the missing files")
  return list(zip(sorted(dicoms, key=lambda p: natural_key(p.name)), sorted(pngs, key=lambda p: natural_key(p.name))))


@dataclasses.dataclass
class Series:
  image: np.ndarray   # [X=col, Y=row, Z=slice] float32
  label: np.ndarray   # uint8, same shape
  affine: np.ndarray  # voxel -> RAS mm
  files: list[str]    # DICOM files in slice order
  echo_time: float | None

  @property
  def spacing(self) -> tuple[float, float, float]:
    return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))


def stack_series(folder: Path, pairs: list[tuple[Path, Path]], to_labels) -> Series:
  """Reads each (dicom, png) pair and stacks them in position order with a RAS affine."""
  if not pairs:
    raise DataError.single(folder, "holds no DICOM slices", "re-copy the series from the CHAOS archive")
  slices = [read_dicom(d) for d, _ in pairs]
  first = slices[0]
  for s in slices[1:]:
    if not (np.allclose(s.row_dir, first.row_dir, atol=1e-4) and np.allclose(s.col_dir, first.col_dir, atol=1e-4)):
      raise DataError.single(s.path, "ImageOrientationPatient differs from the series' first slice",
                             "the folder mixes series; keep one series per folder")
    if s.pixels.shape != first.pixels.shape or not np.allclose(s.pixel_spacing, first.pixel_spacing):
      raise DataError.single(s.path, f"size {s.pixels.shape} / PixelSpacing {s.pixel_spacing} differs from "
                             f"{first.pixels.shape} / {first.pixel_spacing} of {first.path.name}",
                             "the folder mixes series; keep one series per folder")
  normal = np.cross(first.row_dir, first.col_dir)
  along = np.array([float(s.position @ normal) for s in slices])
  order = np.argsort(along, kind="stable")
  along = along[order]
  if len(slices) > 1:
    steps = np.diff(along)
    dup = np.flatnonzero(steps < 1e-3)
    if dup.size:
      a, b = slices[order[dup[0]]].path.name, slices[order[dup[0] + 1]].path.name
      raise DataError.single(folder, f"slices {a} and {b} are at the same position",
                             "the folder mixes two series (e.g. T1-DUAL in- and out-phase): separate them")
    step = float(np.median(steps))
    if np.abs(steps - step).max() > 0.01 * step + 1e-3:
      k = int(np.argmax(np.abs(steps - step)))
      raise DataError.single(folder, f"uneven slice spacing: {steps[k]:.3f} mm after "
                             f"{slices[order[k]].path.name}, {step:.3f} mm elsewhere (a missing slice?)",
                             "restore the missing DICOM file(s) of the series")
    slice_vec = (slices[order[-1]].position - slices[order[0]].position) / (len(slices) - 1)
  else:
    slice_vec = normal * 1.0
  images, labels = [], []
  for i in order:
    d, png = pairs[i]
    grey = read_png(png)
    if grey.shape != slices[i].pixels.shape:
      raise DataError.single(png, f"mask size {grey.shape} differs from its DICOM {d.name} {slices[i].pixels.shape}",
                             "pair each slice with its own Ground PNG (same size)")
    images.append(slices[i].pixels)
    labels.append(to_labels(png, grey))
  image = np.stack(images, axis=-1).transpose(1, 0, 2)  # [row, col, z] -> [col, row, z]
  label = np.stack(labels, axis=-1).transpose(1, 0, 2)
  row_spacing, col_spacing = first.pixel_spacing
  lps = np.eye(4)
  lps[:3, 0] = first.row_dir * col_spacing
  lps[:3, 1] = first.col_dir * row_spacing
  lps[:3, 2] = slice_vec
  lps[:3, 3] = slices[order[0]].position
  affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
  tes = {s.echo_time for s in slices}
  return Series(np.ascontiguousarray(image, np.float32), np.ascontiguousarray(label, np.uint8), affine,
                [str(slices[i].path) for i in order], tes.pop() if len(tes) == 1 else None)


# --------------------------------------------------------------------------------------------
# layout


def find_base(root) -> Path | None:
  """The folder holding CT/ and/or MR/ patient folders (ROOT, ROOT/Train_Sets, ...)."""
  root = Path(root)
  for base in (root, root / "Train_Sets", root / "CHAOS_Train_Sets" / "Train_Sets", root / "CHAOS_Train_Sets"):
    if not base.is_dir():
      continue
    ct, mr = base / "CT", base / "MR"
    if (ct.is_dir() and any((p / "DICOM_anon").is_dir() for p in ct.iterdir() if p.is_dir())) or \
       (mr.is_dir() and any((p / "T2SPIR").is_dir() or (p / "T1DUAL").is_dir() for p in mr.iterdir() if p.is_dir())):
      return base
  return None


def _files(folder: Path, suffix: str) -> list[Path]:
  if not folder.is_dir():
    return []
  return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == suffix
                 and not p.name.startswith(".")), key=lambda p: natural_key(p.name))


@dataclasses.dataclass(frozen=True)
class SeriesFiles:
  """One series to read: modality 'CT' or 'MR', sequence ('CT', 'T2SPIR', 'T1DUAL_InPhase', ...)."""

  modality: str
  sequence: str
  patient: str
  dicom_dir: Path
  ground_dir: Path
  echo_time: float | None = None  # T1DUAL without phase folders: the echo to keep

  @property
  def key(self) -> str:
    return f"{self.sequence}/{self.patient}"


def discover(root) -> tuple[list[SeriesFiles], list[Problem]]:
  """Every labelled CHAOS series under ROOT (CT, T2SPIR, T1DUAL in/out phase), with problems."""
  base = find_base(root)
  if base is None:
    raise DataError.single(root, "is not a CHAOS training folder (no CT/<patient>/DICOM_anon or "
                           "MR/<patient>/T2SPIR found)", "give CHAOS_Train_Sets/Train_Sets (or a folder above it)")
  series, problems = [], []
  ct = base / "CT"
  for p in sorted((q for q in ct.iterdir() if q.is_dir()), key=lambda q: natural_key(q.name)) if ct.is_dir() else []:
    series.append(SeriesFiles("CT", "CT", p.name, p / "DICOM_anon", p / "Ground"))
  mr = base / "MR"
  for p in sorted((q for q in mr.iterdir() if q.is_dir()), key=lambda q: natural_key(q.name)) if mr.is_dir() else []:
    if (p / "T2SPIR").is_dir():
      series.append(SeriesFiles("MR", "T2SPIR", p.name, p / "T2SPIR" / "DICOM_anon", p / "T2SPIR" / "Ground"))
    t1 = p / "T1DUAL"
    if t1.is_dir():
      dcm = t1 / "DICOM_anon"
      if (dcm / "InPhase").is_dir() or (dcm / "OutPhase").is_dir():
        for phase in ("InPhase", "OutPhase"):
          if (dcm / phase).is_dir():
            series.append(SeriesFiles("MR", f"T1DUAL_{phase}", p.name, dcm / phase, t1 / "Ground"))
          else:
            problems.append(Problem(str(dcm / phase), "T1-DUAL phase folder is missing",
                                    "re-copy the patient's T1DUAL/DICOM_anon/{InPhase,OutPhase} folders"))
      elif _files(dcm, ".dcm"):
        series.extend(_split_by_echo(p.name, dcm, t1 / "Ground", problems))
  for s in series:
    if not s.ground_dir.is_dir():
      problems.append(Problem(str(s.ground_dir), "Ground (mask) folder is missing",
                              "re-copy it from CHAOS_Train_Sets (test sets have no masks and cannot be converted)"))
  return [s for s in series if s.ground_dir.is_dir()], problems


def _split_by_echo(patient: str, dcm: Path, ground: Path, problems: list) -> list[SeriesFiles]:
  """A flat T1DUAL folder: two series told apart by EchoTime (longer = in phase)."""
  tes = sorted({read_dicom(f).echo_time for f in _files(dcm, ".dcm")}, key=lambda t: -1 if t is None else t)
  if len(tes) != 2 or None in tes:
    problems.append(Problem(str(dcm), f"T1-DUAL folder without InPhase/OutPhase sub-folders has echo times {tes}, "
                            "not two", "sort the files into DICOM_anon/InPhase and DICOM_anon/OutPhase"))
    return []
  return [SeriesFiles("MR", "T1DUAL_InPhase", patient, dcm, ground, tes[1]),
          SeriesFiles("MR", "T1DUAL_OutPhase", patient, dcm, ground, tes[0])]


def read_series(s: SeriesFiles) -> Series:
  """Reads one CHAOS series with its masks -> Series in position order."""
  dicoms = _files(s.dicom_dir, ".dcm")
  if s.echo_time is not None:
    dicoms = [d for d in dicoms if read_dicom(d).echo_time == s.echo_time]
  pngs = _files(s.ground_dir, ".png")
  pairs = pair_masks(dicoms, pngs, s.dicom_dir)
  to_labels = ct_grey_to_labels if s.modality == "CT" else mr_grey_to_labels
  series = stack_series(s.dicom_dir, pairs, to_labels)
  return series


def check_phases(in_phase: Series, out_phase: Series, folder: Path) -> None:
  """In-phase must have the longer echo time (when the headers give both)."""
  if in_phase.echo_time is not None and out_phase.echo_time is not None and in_phase.echo_time <= out_phase.echo_time:
    raise DataError.single(folder, f"InPhase echo time {in_phase.echo_time} ms is not longer than OutPhase "
                           f"{out_phase.echo_time} ms: the phase folders look swapped",
                           "swap the InPhase and OutPhase folder names")


# --------------------------------------------------------------------------------------------
# BTCV


def discover_btcv(root) -> tuple[list[tuple[str, Path, Path]], list[Problem]]:
  """[(case id, image, label)] from ROOT/{img,label}/ (or ROOT/Training/, ROOT/RawData/Training/)."""
  from medgen_jax.data.nifti import strip_nifti_suffix
  root = Path(root)
  base = next((b for b in (root, root / "Training", root / "RawData" / "Training")
               if (b / "img").is_dir() and (b / "label").is_dir()), None)
  if base is None:
    raise DataError.single(root, "is not a BTCV folder (no img/ and label/ sub-folders)",
                           "give RawData/Training (holding img/imgXXXX.nii.gz and label/labelXXXX.nii.gz)")
  def ids(folder, prefix):
    out = {}
    for f in sorted(folder.iterdir()):
      stem = strip_nifti_suffix(f.name)
      if stem is not None and not f.name.startswith("."):
        out[stem[len(prefix):] if stem.lower().startswith(prefix) else stem] = f
    return out
  images, labels = ids(base / "img", "img"), ids(base / "label", "label")
  problems = [Problem(str(images[c]), "image has no label file", f"add label/label{c}.nii.gz or remove the image")
              for c in sorted(set(images) - set(labels))]
  problems += [Problem(str(labels[c]), "label file has no image", f"add img/img{c}.nii.gz or remove the label")
               for c in sorted(set(labels) - set(images))]
  cases = [(c, images[c], labels[c]) for c in sorted(set(images) & set(labels), key=natural_key)]
  if not cases and not problems:
    problems.append(Problem(str(base), "img/ and label/ hold no NIfTI cases", "copy the BTCV training cases"))
  return cases, problems


def read_btcv_case(image_path, label_path):
  """(image, label 0..4, affine) in RAS, labels remapped to liver/RK/LK/spleen."""
  from medgen_jax.data.nifti import load_nifti
  image = load_nifti(image_path)
  label = load_nifti(label_path, dtype=np.float64)
  if image.data.shape != label.data.shape or not np.allclose(image.affine, label.affine, atol=1e-3):
    raise DataError.single(label_path, f"label grid {label.data.shape} differs from image {image.data.shape}",
                           "use the original BTCV label file of this case")
  return image.data, btcv_to_labels(label_path, label.data), image.affine


def looks_like_chaos(root) -> bool:
  return Path(root).is_dir() and find_base(root) is not None


def looks_like_btcv(root) -> bool:
  root = Path(root)
  return any((b / "img").is_dir() and (b / "label").is_dir()
             for b in (root, root / "Training", root / "RawData" / "Training"))
