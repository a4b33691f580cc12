"""Writes an embedded benchmark: `brain-sites` (default), `brain-modalities` or `cardiac-phantom`.

    python -m medgen_jax.data.synthesize --out data/brain-sites [--sites 4] [--cases-per-site 6] [--seed 0]
    python -m medgen_jax.data.synthesize --benchmark brain-modalities --out data/brain-modalities
    python -m medgen_jax.data.synthesize --benchmark cardiac-phantom --out data/cardiac-phantom

* brain-sites: MNI152 subjects scanned at simulated MR sites (simulate.py).
* brain-modalities: unpaired MNI152 subjects rendered as T1, T2 and CT (brain_modalities.py).
* cardiac-phantom: procedural hearts with the MM-WHS labels MYO, LAC, LVC, AA, scanned as bSSFP MR
  and contrast-enhanced CT (cardiac_phantom.py).

Layout `sites`: `OUT/<site>/<case>_image.nii.gz`, `OUT/<site>/<case>_label.nii.gz` and
`OUT/dataset.json` (labels, site presets, every scan's parameters); the sites of brain-modalities
are its modalities `T1`, `T2`, `CT`, those of cardiac-phantom `MR`, `CT`. The same arguments give
the same files byte for byte. The folder is written under a temporary name and renamed at the end,
so an interrupted run never leaves a dataset that looks complete; an existing folder is never
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
BENCHMARKS = ("brain-sites", "brain-modalities", "cardiac-phantom")


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


def _check_arguments(benchmark: str, sites: int | None, cases_per_site: int, rerender: bool,
                     resolution_mm) -> None:
  if benchmark not in BENCHMARKS:
    raise DataError.single(f"--benchmark={benchmark}", "is not an embedded benchmark",
                           f"use one of {', '.join(BENCHMARKS)}")
  if benchmark == "brain-sites":
    if not 1 <= sites <= len(SITE_PRESETS):
      raise DataError.single(f"--sites={sites}", f"must be between 1 and {len(SITE_PRESETS)}",
                             f"presets are {', '.join(SITE_PRESETS)}")
  else:
    if sites is not None:
      raise DataError.single(f"--sites={sites}", f"applies to brain-sites only ({benchmark} has fixed "
                             "sites, one per modality)", "leave --sites out")
    if rerender:
      raise DataError.single("--rerender", "applies to brain-sites only",
                             f"leave it out ({benchmark} always renders from tissue maps)")
  if cases_per_site < 1:
    raise DataError.single(f"--cases-per-site={cases_per_site}", "must be at least 1", "ask for 1 or more")
  if not resolution_mm or resolution_mm <= 0:
    raise DataError.single(f"--resolution={resolution_mm}", "must be a positive number of mm", "use e.g. 2")


def synthesize(out: str | Path, *, benchmark: str = "brain-sites", sites: int | None = None,
               cases_per_site: int = DEFAULT_CASES_PER_SITE, seed: int = 0,
               resolution_mm: int = 2, rerender: bool = False, progress=print) -> Path:
  """Writes `benchmark` to the new folder `out`. `sites` (default 4) and `rerender` are brain-sites
  options; `resolution_mm` is the grid (MNI152 resampling for the brain, voxel size for the heart)."""
  out = Path(out)
  if benchmark == "brain-sites" and sites is None:
    sites = DEFAULT_SITES
  _check_arguments(benchmark, sites, cases_per_site, rerender, resolution_mm)
  if out.exists() and any(out.iterdir()):
    raise DataError.single(out, "already exists and is not empty",
                           "choose a new --out folder or delete this one yourself")
  tmp = out.with_name(f".{out.name}.partial")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  if benchmark == "brain-sites":
    meta = _write_brain_sites(tmp, sites=sites, cases_per_site=cases_per_site, seed=seed,
                              resolution_mm=resolution_mm, rerender=rerender, progress=progress)
  elif benchmark == "brain-modalities":
    from medgen_jax.data import brain_modalities
    meta = brain_modalities.write_cases(tmp, cases_per_site=cases_per_site, seed=seed,
                                        resolution_mm=resolution_mm, progress=progress)
  else:
    from medgen_jax.data import cardiac_phantom
    meta = cardiac_phantom.write_cases(tmp, cases_per_site=cases_per_site, seed=seed,
                                       spacing_mm=float(resolution_mm), progress=progress)
  write_bytes_atomic(tmp / "dataset.json", (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())
  if out.exists():
    out.rmdir()  # empty (checked above)
  tmp.rename(out)
  return out


def _write_brain_sites(tmp: Path, *, sites: int, cases_per_site: int, seed: int, resolution_mm: int,
                       rerender: bool, progress) -> dict:
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
  return {
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


def ensure_benchmark(root: str | Path, *, benchmark: str = "brain-sites", sites: int | None = DEFAULT_SITES,
                     cases_per_site: int = DEFAULT_CASES_PER_SITE, seed: int = 0, progress=print) -> Path:
  """Generates `benchmark` at `root` on first use; an existing folder is used as it is.
  `sites` is used by brain-sites only (the other benchmarks have one site per modality)."""
  root = Path(root)
  if not root.exists():
    sites = (sites or DEFAULT_SITES) if benchmark == "brain-sites" else None
    if progress:
      what = f"{sites} sites" if sites else "one site per modality"
      progress(f"{benchmark} benchmark not found at {root}: generating {what} x {cases_per_site} cases")
    synthesize(root, benchmark=benchmark, sites=sites, cases_per_site=cases_per_site, seed=seed,
               progress=progress)
  return root


def ensure_brain_sites(root: str | Path, *, sites: int = DEFAULT_SITES,
                       cases_per_site: int = DEFAULT_CASES_PER_SITE, seed: int = 0, progress=print) -> Path:
  """Generates the brain-sites benchmark at `root` on first use; an existing folder is used as it is."""
  return ensure_benchmark(root, benchmark="brain-sites", sites=sites, cases_per_site=cases_per_site,
                          seed=seed, progress=progress)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m medgen_jax.data.synthesize", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--benchmark", default="brain-sites",
                      help=f"one of {', '.join(BENCHMARKS)} (default brain-sites)")
  parser.add_argument("--out", required=True, help="folder to create")
  parser.add_argument("--sites", type=int, default=None,
                      help=f"brain-sites: number of site presets to use, in order {''.join(SITE_PRESETS)} "
                           f"(default {DEFAULT_SITES})")
  parser.add_argument("--cases-per-site", type=int, default=DEFAULT_CASES_PER_SITE)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--resolution", type=int, default=2,
                      help="grid in mm (default 2; cardiac-phantom keeps its 192x192x160 mm field of view)")
  parser.add_argument("--rerender", action="store_true",
                      help="brain-sites: re-render intensities per tissue from the warped probability maps")
  args = parser.parse_args(argv)
  try:
    out = synthesize(args.out, benchmark=args.benchmark, sites=args.sites,
                     cases_per_site=args.cases_per_site, seed=args.seed, resolution_mm=args.resolution,
                     rerender=args.rerender)
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
