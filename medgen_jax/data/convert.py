"""Converts released cross-modality data to the `sites` layout the training pipeline reads.

    python -m medgen_jax.data.convert --format mmwhs SRC --out DIR [--slices-per-volume 600] [--no-npz-flip]
    python -m medgen_jax.data.convert --format chaos SRC --out DIR [--sequences T2SPIR,T1DUAL_InPhase,...]
                                      [--modalities MR,CT] [--ct-from-btcv BTCV_DIR]
    python -m medgen_jax.data.convert --format btcv SRC --out DIR

Output: `DIR/<site>/<case>_image.nii.gz`, `DIR/<site>/<case>_label.nii.gz` (labels already mapped to
the training classes), `DIR/dataset.json` (labels, one site per modality: `MR`, `CT`, and the
source file of every case). The folder is written under a temporary name and renamed at the end;
an existing non-empty DIR is never overwritten. The same input gives the same bytes.

* mmwhs (PnP-AdaNet/SIFA release, see mmwhs.py): file names carry no case id, so the slices of
  each `<mod>_<split>` list (or folder, in slice-number order) are stacked, in that order, into
  pseudo-volumes of `--slices-per-volume` consecutive slices (`train_000`, `train_001`, ..., the last
  one shorter when the count does not divide). The default 600 matches the release's counts
  (ct_train 8400 = 14 x 600, ct_val 2 x 600, mr_train 16 x 600, mr_val 4 x 600), but that slice n
  belongs to case n // 600 is NOT documented by the authors: treat pseudo-volumes as bags of 2-D
  slices (train with `data.context_slices=1`; 3-D metrics on them are meaningless). The image is the
  middle channel of `data_vol` (SIFA-TMI's 1-channel input). `.npz` test volumes become real
  volumes `test_<id>` (axes 0, 1 flipped as SIFA's evaluate.py). Voxel size is unknown (the data
  was resampled): the affine is the identity (1 mm), so surface distances are in voxels, as SIFA
  reported them. `DIR/splits_released.json` reproduces the released split (train / val lists,
  npz = test) for `data.split_file`; note that the MR test cases are also inside the MR training
  slices of the release (SIFA#16), which no check can detect without case ids.
* chaos: site `MR` (T2-SPIR by default; with several `--sequences` one site per sequence,
  `MR_T2SPIR`, `MR_T1DUAL_InPhase`, `MR_T1DUAL_OutPhase`) and site `CT` (CHAOS CT: liver only, or
  with `--ct-from-btcv` the BTCV CT volumes with 4 organs, the SIFA abdominal setting).
* btcv: site `CT`, labels remapped to liver 1, right kidney 2, left kidney 3, spleen 4.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from medgen_jax.data import chaos as chaos_lib
from medgen_jax.data import mmwhs as mmwhs_lib
from medgen_jax.data.errors import DataError, Problem
from medgen_jax.data.nifti import write_bytes_atomic, write_nifti

FORMATS = ("mmwhs", "chaos", "btcv")
DEFAULT_SLICES_PER_VOLUME = 600


def convert_hint(fmt: str, root) -> str:
  return f"python -m medgen_jax.data.convert --format {fmt} {root} --out <new folder>"


def detect_raw_format(root) -> str | None:
  """'chaos', 'btcv' or 'mmwhs' for a raw release folder; None otherwise (or for a `sites`/`msd` folder)."""
  root = Path(root)
  if not root.is_dir():
    return None
  from medgen_jax.data.layouts import detect_layout
  if detect_layout(root) != "prostate6":
    return None
  if chaos_lib.looks_like_chaos(root):
    return "chaos"
  if chaos_lib.looks_like_btcv(root):
    return "btcv"
  if mmwhs_lib.looks_like_mmwhs(root):
    return "mmwhs"
  return None


# --------------------------------------------------------------------------------------------
# reading, shared by convert and check


def _mmwhs_cases(src: Path, slices_per_volume: int, flip_npz: bool, problems: list, *, keep_going: bool):
  """Yields (site, case id, image, label, affine, provenance) for the MM-WHS release."""
  slices, volumes, found = mmwhs_lib.discover(src)
  problems.extend(found)
  for (mod, split), files in slices.items():
    for g, start in enumerate(range(0, len(files), slices_per_volume)):
      group = files[start:start + slices_per_volume]
      images, labels, used = [], [], []
      for f in group:
        try:
          image, label = mmwhs_lib.read_slice(f)
        except DataError as e:
          problems.extend(e.problems)
          continue
        if images and image.shape[:2] != images[0].shape:
          problems.append(Problem(str(f), f"slice size {image.shape[:2]} differs from {images[0].shape} "
                                  f"of {used[0]}", "keep one slice size per modality"))
          continue
        images.append(image[..., image.shape[2] // 2])
        labels.append(label)
        used.append(str(f.relative_to(src)))
      if images and (keep_going or not problems):
        yield (mod, f"{split}_{g:03d}", np.stack(images, -1), np.stack(labels, -1), np.eye(4),
               {"source": used[0] if len(used) == 1 else f"{used[0]} .. {used[-1]}", "slices": len(used),
                "split": split, "pseudo_volume": True})
  for mod, files in volumes.items():
    for f in files:
      try:
        image, label = mmwhs_lib.read_npz_volume(f, flip=flip_npz)
      except DataError as e:
        problems.extend(e.problems)
        continue
      idx = mmwhs_lib.slice_index(f)
      case = f"test_{idx}" if idx >= 0 else f"test_{f.stem}"
      yield mod, case, image, label, np.eye(4), {"source": str(f.relative_to(src)), "split": "test",
                                                 "flipped_axes_0_1": flip_npz}


def _chaos_cases(src: Path, sequences, modalities, ct_from_btcv, problems: list):
  series, found = chaos_lib.discover(src)
  problems.extend(found)
  wanted = [s for s in series if (s.modality == "CT" and "CT" in modalities and not ct_from_btcv)
            or (s.modality == "MR" and "MR" in modalities and s.sequence in sequences)]
  mr_sequences = [q for q in chaos_lib.SEQUENCES if q in sequences]
  read: dict[tuple[str, str], chaos_lib.Series] = {}
  base = chaos_lib.find_base(src)
  for s in wanted:
    try:
      ser = chaos_lib.read_series(s)
    except DataError as e:
      problems.extend(e.problems)
      continue
    read[(s.sequence, s.patient)] = ser
    if s.sequence.startswith("T1DUAL"):
      other = ("T1DUAL_OutPhase" if s.sequence == "T1DUAL_InPhase" else "T1DUAL_InPhase", s.patient)
      if other in read:
        pair = (ser, read[other]) if s.sequence == "T1DUAL_InPhase" else (read[other], ser)
        try:
          chaos_lib.check_phases(*pair, s.dicom_dir.parent)
        except DataError as e:
          problems.extend(e.problems)
    site = "CT" if s.modality == "CT" else ("MR" if len(mr_sequences) == 1 else f"MR_{s.sequence}")
    yield site, s.patient, ser.image, ser.label, ser.affine, {
        "source": str(s.dicom_dir.relative_to(base)), "sequence": s.sequence,
        "spacing_mm": [round(v, 6) for v in ser.spacing], "echo_time_ms": ser.echo_time}
  if ct_from_btcv and "CT" in modalities:
    yield from _btcv_cases(Path(ct_from_btcv), problems)


def _btcv_cases(src: Path, problems: list):
  cases, found = chaos_lib.discover_btcv(src)
  problems.extend(found)
  for case, image_path, label_path in cases:
    try:
      image, label, affine = chaos_lib.read_btcv_case(image_path, label_path)
    except DataError as e:
      problems.extend(e.problems)
      continue
    yield "CT", f"btcv{case}", image, label, affine, {"source": image_path.name, "label": label_path.name}


def iter_cases(fmt: str, src, *, slices_per_volume=DEFAULT_SLICES_PER_VOLUME, flip_npz=True,
               sequences=("T2SPIR",), modalities=("MR", "CT"), ct_from_btcv=None, problems=None,
               keep_going=True):
  """Yields (site, case, image, label, affine, provenance); problems are appended to `problems`."""
  problems = [] if problems is None else problems
  src = Path(src)
  if fmt == "mmwhs":
    if slices_per_volume < 1:
      raise DataError.single(f"--slices-per-volume={slices_per_volume}", "must be at least 1", "use e.g. 600")
    yield from _mmwhs_cases(src, slices_per_volume, flip_npz, problems, keep_going=keep_going)
  elif fmt == "chaos":
    unknown = sorted(set(sequences) - set(chaos_lib.SEQUENCES))
    if unknown:
      raise DataError.single(f"--sequences={','.join(sequences)}", f"unknown sequence(s) {unknown}",
                             f"use some of {','.join(chaos_lib.SEQUENCES)}")
    yield from _chaos_cases(src, tuple(sequences), tuple(modalities), ct_from_btcv, problems)
  elif fmt == "btcv":
    yield from _btcv_cases(src, problems)
  else:
    raise DataError.single(f"--format={fmt}", "unknown format", f"use one of {', '.join(FORMATS)}")


def _dataset_json(fmt: str, provenance: dict, site_modality: dict) -> dict:
  if fmt == "mmwhs":
    labels, remap = mmwhs_lib.LABELS, "released label 5 (not a target class) -> 0"
    description = ("MM-WHS 2017 cardiac CT/MR as pre-processed by PnP-AdaNet/SIFA; slices stacked into "
                   "pseudo-volumes (no case ids in the release): train 2-D only")
  else:
    labels = chaos_lib.LABELS
    remap = ("CHAOS MR grey 63/126/189/252 -> 1..4; CHAOS CT 255 -> 1 (liver only); "
             "BTCV 6 -> 1, 2 -> 2, 3 -> 3, 1 -> 4, rest -> 0")
    description = "Abdominal CT/MR (CHAOS DICOM + PNG, BTCV NIfTI) converted to the sites layout"
  return {
      "name": f"{fmt}-sites",
      "description": description,
      "modality": "+".join(sorted(set(site_modality.values()))),
      "labels": {str(k): v for k, v in labels.items()},
      "label_remap": {},
      "sites": {site: {"modality": mod} for site, mod in sorted(site_modality.items())},
      "generator": {"converter": "medgen_jax.data.convert", "format": fmt, "label_mapping": remap,
                    "cases": provenance},
  }


def convert(fmt: str, src, out, *, progress=print, **options) -> Path:
  """Writes the `sites` dataset; raises DataError listing every bad input file (nothing is written)."""
  src, out = Path(src), Path(out)
  if not src.is_dir():
    raise DataError.single(src, "source folder does not exist", "give the folder of the released data")
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise DataError.single(out, "already exists and is not empty", "choose a new --out folder or delete this one yourself")
  tmp = out.with_name(f".{out.name}.partial")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  problems: list[Problem] = []
  provenance: dict[str, dict] = {}
  site_modality: dict[str, str] = {}
  splits: dict[str, dict[str, list[str]]] = {}
  try:
    for site, case, image, label, affine, info in iter_cases(fmt, src, problems=problems, keep_going=False,
                                                             **options):
      if problems:
        continue  # keep reading to report every bad file, write nothing more
      write_nifti(tmp / site / f"{case}_image.nii.gz", image.astype(np.float32), affine)
      write_nifti(tmp / site / f"{case}_label.nii.gz", label.astype(np.uint8), affine)
      provenance[f"{site}/{case}"] = info
      site_modality[site] = "CT" if site.startswith("CT") else "MR"
      if "split" in info:
        splits.setdefault(site, {"train": [], "val": [], "test": []})[info["split"]].append(case)
      if progress:
        progress(f"  {site}/{case}  {image.shape}")
    if problems:
      raise DataError(problems)
    if not provenance:
      raise DataError.single(src, f"no labelled case found for --format {fmt}",
                             "give the data root of the release (see python -m medgen_jax.data.convert --help)")
    meta = _dataset_json(fmt, provenance, site_modality)
    write_bytes_atomic(tmp / "dataset.json", (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())
    if splits:
      payload = {"version": 1, "seed": None, "sites": splits,
                 "note": "the released split of the PnP-AdaNet/SIFA data (train/val lists, npz test volumes)"}
      write_bytes_atomic(tmp / "splits_released.json", (json.dumps(payload, indent=1, sort_keys=True) + "\n").encode())
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if out.exists():
    out.rmdir()
  tmp.rename(out)
  return out


def check_raw(root, fmt: str) -> tuple[list[str], list[Problem]]:
  """Reads every file of a raw release folder: (summary lines, problems with their fixes)."""
  problems: list[Problem] = []
  rows: dict[str, list] = {}
  try:
    for site, case, image, label, affine, info in iter_cases(fmt, root, problems=problems,
                                                             sequences=chaos_lib.SEQUENCES):
      r = rows.setdefault(site, [0, set(), np.zeros(5, np.int64)])
      r[0] += 1
      r[1].add("x".join(map(str, image.shape[:2])))
      r[2] += np.bincount(label.ravel(), minlength=5)[:5]
  except DataError as e:
    problems.extend(e.problems)
  hint = convert_hint(fmt, root)
  problems = [Problem(p.path, p.message, f"{p.fix}; then convert: {hint}") if "convert" not in p.fix else p
              for p in problems]
  lines = [f"{root}: raw {fmt} release (read every file)"]
  for site, (n, shapes, counts) in sorted(rows.items()):
    lines.append(f"  {site}: {n} volume(s), in-plane {', '.join(sorted(shapes))}, label voxels "
                 + ", ".join(f"{k}:{int(c)}" for k, c in enumerate(counts)))
  lines.append(f"train on it after converting it to the sites layout: {hint}")
  return lines, problems


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m medgen_jax.data.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("src", help="folder of the released data")
  parser.add_argument("--format", required=True, choices=FORMATS)
  parser.add_argument("--out", required=True, help="folder to create (never overwritten)")
  parser.add_argument("--slices-per-volume", type=int, default=DEFAULT_SLICES_PER_VOLUME,
                      help="mmwhs: consecutive slices per pseudo-volume (default 600)")
  parser.add_argument("--no-npz-flip", action="store_true",
                      help="mmwhs: do not flip axes 0, 1 of the .npz test volumes (already aligned)")
  parser.add_argument("--sequences", default="T2SPIR",
                      help=f"chaos: MR sequences, comma-separated among {','.join(chaos_lib.SEQUENCES)}")
  parser.add_argument("--modalities", default="MR,CT", help="chaos: MR, CT or both")
  parser.add_argument("--ct-from-btcv", default="", help="chaos: take the CT site from this BTCV folder")
  args = parser.parse_args(argv)
  options = {}
  if args.format == "mmwhs":
    options = {"slices_per_volume": args.slices_per_volume, "flip_npz": not args.no_npz_flip}
  elif args.format == "chaos":
    options = {"sequences": tuple(s for s in args.sequences.split(",") if s),
               "modalities": tuple(m.strip().upper() for m in args.modalities.split(",") if m.strip()),
               "ct_from_btcv": args.ct_from_btcv or None}
  try:
    out = convert(args.format, args.src, args.out, **options)
  except DataError as e:
    print(e, file=sys.stderr)
    print(f"convert failed: {len(e.problems)} problem(s); nothing was written", file=sys.stderr)
    return 1
  except OSError as e:
    print(f"{args.out}: cannot write the dataset ({e.strerror or e}). Fix: free space or choose a "
          "writable --out folder", file=sys.stderr)
    return 1
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
