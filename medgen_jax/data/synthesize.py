"""Writes the embedded `brain-sites` benchmark: MNI152 subjects scanned at simulated sites.

    python -m medgen_jax.data.synthesize --out data/brain-sites [--sites 4] [--cases-per-site 6] [--seed 0]

Layout `sites`: `OUT/<site>/<case>_image.nii.gz`, `OUT/<site>/<case>_label.nii.gz` and
`OUT/dataset.json` (labels, site presets, every scan's parameters). The same arguments give the
same files byte for byte. The folder is written under a temporary name and renamed at the end, so
an interrupted run never leaves a dataset that looks complete; an existing folder is never
overwritten.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from medgen_jax.data import anatomy as anatomy_lib
from medgen_jax.data.errors import DataError
from medgen_jax.data.nifti import from_ras, write_bytes_atomic, write_nifti
from medgen_jax.data.simulate import SITE_PRESETS, scan_parameters, simulate_scan

DEFAULT_SITES = 4
DEFAULT_CASES_PER_SITE = 6


def synthesize_case(site: str, case_index: int, *, seed: int, resolution_mm: int = 2,
                    rerender: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
  """One scan in RAS+: (image float32, label uint8, affine, scan parameters)."""
  site_index = list(SITE_PRESETS).index(site)
  rng = np.random.default_rng([seed, site_index, case_index])
  subject = anatomy_lib.random_subject(anatomy_lib.mni152(resolution_mm), rng)
  if rerender:
    subject = anatomy_lib.rerender(subject, rng)
  params = scan_parameters(SITE_PRESETS[site], rng)
  return simulate_scan(subject, params, rng), subject.label, subject.affine, params


def synthesize(out: str | Path, *, sites: int = DEFAULT_SITES,
               cases_per_site: int = DEFAULT_CASES_PER_SITE, seed: int = 0,
               resolution_mm: int = 2, rerender: bool = False, progress=print) -> Path:
  out = Path(out)
  if out.exists() and any(out.iterdir()):
    raise DataError.single(out, "already exists and is not empty",
                           "choose a new --out folder or delete this one yourself")
  if not 1 <= sites <= len(SITE_PRESETS):
    raise DataError.single(f"--sites={sites}", f"must be between 1 and {len(SITE_PRESETS)}",
                           f"presets are {', '.join(SITE_PRESETS)}")
  if cases_per_site < 1:
    raise DataError.single(f"--cases-per-site={cases_per_site}", "must be at least 1", "ask for 1 or more")
  tmp = out.with_name(f".{out.name}.partial")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  names = list(SITE_PRESETS)[:sites]
  scans = {}
  start = time.time()
  for site in names:
    preset = SITE_PRESETS[site]
    for j in range(cases_per_site):
      image, label, affine, params = synthesize_case(site, j, seed=seed, resolution_mm=resolution_mm,
                                                     rerender=rerender)
      case = f"case{j:03d}"
      image, stored_affine = from_ras(image, affine, preset.orientation)
      label, _ = from_ras(label, affine, preset.orientation)
      # int16 on disk with scl_slope/scl_inter, as scanners export.
      write_nifti(tmp / site / f"{case}_image.nii.gz", image, stored_affine, on_disk_dtype=np.int16)
      write_nifti(tmp / site / f"{case}_label.nii.gz", label.astype(np.uint8), stored_affine)
      scans[f"{site}/{case}"] = {k: v for k, v in params.items() if k != "bias_coefficients"}
      if progress:
        progress(f"  {site}/{case}  ({time.time() - start:.0f} s)")
  meta = {
      "name": "brain-sites",
      "description": "MNI152 2009 subjects (random elastic + affine warps) scanned at simulated sites; "
                     "see medgen_jax/data/simulate.py",
      "modality": "T1",
      "labels": {str(k): v for k, v in anatomy_lib.LABEL_NAMES.items()},
      "label_remap": {},
      "sites": {s: dataclasses.asdict(SITE_PRESETS[s]) for s in names},
      "generator": {"seed": seed, "cases_per_site": cases_per_site, "resolution_mm": resolution_mm,
                    "rerender": rerender, "scans": scans},
      "license": "MNI152 template: Copyright (C) 1993-2004 Louis Collins, McConnell Brain Imaging Centre, "
                 "Montreal Neurological Institute, McGill University (permissive; see medgen_jax/data/anatomy.py)",
  }
  write_bytes_atomic(tmp / "dataset.json", (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())
  if out.exists():
    out.rmdir()  # empty (checked above)
  tmp.rename(out)
  return out


def ensure_brain_sites(root: str | Path, *, sites: int = DEFAULT_SITES,
                       cases_per_site: int = DEFAULT_CASES_PER_SITE, seed: int = 0, progress=print) -> Path:
  """Generates the benchmark at `root` on first use; an existing folder is used as it is."""
  root = Path(root)
  if not root.exists():
    if progress:
      progress(f"brain-sites benchmark not found at {root}: generating {sites} sites x {cases_per_site} cases")
    synthesize(root, sites=sites, cases_per_site=cases_per_site, seed=seed, progress=progress)
  return root


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m medgen_jax.data.synthesize", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="folder to create")
  parser.add_argument("--sites", type=int, default=DEFAULT_SITES,
                      help=f"number of site presets to use, in order {''.join(SITE_PRESETS)} (default {DEFAULT_SITES})")
  parser.add_argument("--cases-per-site", type=int, default=DEFAULT_CASES_PER_SITE)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--resolution", type=int, default=2, help="grid in mm (default 2)")
  parser.add_argument("--rerender", action="store_true",
                      help="re-render intensities per tissue from the warped probability maps")
  args = parser.parse_args(argv)
  try:
    out = synthesize(args.out, sites=args.sites, cases_per_site=args.cases_per_site, seed=args.seed,
                     resolution_mm=args.resolution, rerender=args.rerender)
  except DataError as e:
    print(e, file=sys.stderr)
    return 2
  except OSError as e:  # disk full, no permission: the partial folder is left under a hidden name
    print(f"{args.out}: cannot write the dataset ({e.strerror or e}). Fix: free space or choose a "
          "writable --out folder", file=sys.stderr)
    return 1
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
