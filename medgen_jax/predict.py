"""Segment NIfTI volumes with a trained run.

    python -m medgen_jax.predict --workdir RUN --input PATH --out DIR [--model NAME] [--channel K]
                                 [--site SITE]

Inputs (PATH): one `.nii`/`.nii.gz` file; or a folder of them (not recursive, hidden files
skipped); or a site folder of the `sites` dataset layout: when the folder holds any
`*_image.nii[.gz]` file, only those are inputs (the `*_label` files and anything else are ignored).

Model: the run's selected checkpoint (by the run's own selection rule, the one results.md
reports) restored by `evaluation.load_trained_models`, with the intensity normalizer fitted on
the run's training cases (`RUN/normalizer.json`) and the run's preprocessing (`config.data`).
A run of method `separate` has one model per source site (`separate_<site>`): choose one with
`--model`. `--channel K` picks the volume K of 4-D inputs (default: the run's `data.channel`).
`--site SITE`: the site (scanner / modality) every input comes from, required when the run's
normalization is per-site (`site_range`: each site mapped with the intensity range fitted on
that site's own training or unlabelled adaptation volumes) and one of the run's fitted sites;
ignored by the other normalizations. A model with domain-specific layers (DSBN, adapters,
MS-Net, UMMKD) applies the parameters of `--site`; a site it was not trained on (or no --site)
gets the mean of its domains' parameters (model.unseen_domain='average') or is refused ('refuse').

Outputs: `DIR/<input name without .nii/.nii.gz>_seg.nii.gz` (e.g. `case0_image.nii.gz` ->
`case0_image_seg.nii.gz`), uint8 label values 0..C-1 of the run's dataset (names in its
dataset.json). DIR is created. Nothing is ever overwritten: if an output file already exists
(or two inputs would share an output name) the command refuses before predicting anything.

Geometry guarantee: each output lies on its input's own voxel grid as stored on disk: same array
shape (X, Y, Z) and axis order, and the input's header geometry copied unchanged (sform and qform
with their codes, voxel sizes, units), so `nib.load(out).affine == nib.load(in).affine` exactly
whatever orientation the input was stored in (RAS, LPS, permuted axes...). Internally the volume
is read in RAS+ (`data.nifti.load_nifti`), predicted as in evaluation (`inference.predict_case`:
slice by slice along the superior axis, or for a 3-D patch run (`data.patch_size`) by
sliding-window inference over the whole volume with the run's `eval.overlap` and
`eval.batch_size` patches per forward), and the label map is flipped/permuted back to the stored
orientation (`data.nifti.from_ras`).

Errors (missing path, a non-NIfTI file, a 4-D image without a channel, a run folder without
config.json or without a finished run, an unknown --model, a missing or unknown --site for a
per-site normalization, an existing output) are one line on
stderr naming the path or flag and the fix, exit status 2, before anything is written. A file
that cannot be read while predicting is reported on one line, the others are still predicted,
and the exit status is 1.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from medgen_jax.data.nifti import from_ras, load_nifti, strip_nifti_suffix, write_bytes_atomic
from medgen_jax.data.normalize import Normalizer
from medgen_jax.paths import as_path

OUTPUT_SUFFIX = "_seg.nii.gz"


class UsageError(ValueError):
  """A bad argument or input found before predicting: one line, exit status 2."""


def find_inputs(path: Path, channel: int | None = None) -> list[Path]:
  """The NIfTI files that PATH names (see the module docstring). In a folder of nnU-Net channel
  files (`<case>_0000.nii.gz`, `<case>_0001...`) only the run's channel (`_{channel:04d}`, 0 by
  default) is an input: the others are other channels of the same cases."""
  if not path.exists():
    raise UsageError(f"--input {path}: does not exist. Fix: give a .nii/.nii.gz file or a folder of them")
  if path.is_file():
    if strip_nifti_suffix(path.name) is None:
      raise UsageError(f"--input {path}: not a NIfTI file name (.nii or .nii.gz). "
                       "Fix: convert it to NIfTI (e.g. dcm2niix) or give a folder of NIfTI files")
    return [path]
  files = sorted(f for f in path.iterdir()
                 if f.is_file() and not f.name.startswith(".") and strip_nifti_suffix(f.name) is not None)
  images = [f for f in files if strip_nifti_suffix(f.name).lower().endswith("_image")]
  if images:
    return images  # a site folder of the `sites` layout
  if files and all(re.search(r"_\d{4}$", strip_nifti_suffix(f.name)) for f in files):
    wanted = f"_{channel or 0:04d}"
    return [f for f in files if strip_nifti_suffix(f.name).endswith(wanted)]
  if not files:
    subfolders = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    listed = ", ".join(subfolders[:5]) + (", ..." if len(subfolders) > 5 else "")
    hint = (f"give one of its site folders ({listed})" if subfolders
            else "put the .nii/.nii.gz volumes there")
    raise UsageError(f"--input {path}: holds no .nii/.nii.gz file. Fix: {hint}")
  return files


def output_path(out_dir: Path, image: Path) -> Path:
  return out_dir / (strip_nifti_suffix(image.name) + OUTPUT_SUFFIX)


def read_header(path: Path, channel: int | None):
  """The stored image (header and geometry; data not read); UsageError if not a usable volume."""
  try:
    img = nib.load(str(path))
  except Exception as e:  # nibabel raises several types for a non-NIfTI file
    message = " ".join(str(e).split())
    raise UsageError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {message}). "
                     "Fix: re-export the volume as NIfTI-1 (.nii or .nii.gz)") from None
  if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
    raise UsageError(f"{path}: is a {type(img).__name__}, not NIfTI. Fix: convert it to NIfTI (.nii.gz)")
  shape = tuple(img.shape)
  while len(shape) > 3 and shape[-1] == 1:
    shape = shape[:-1]
  if len(shape) == 4:
    if channel is None:
      raise UsageError(f"{path}: is 4-D with shape {tuple(img.shape)} and no channel was chosen. "
                       f"Fix: pass --channel <index in [0, {shape[3] - 1}]> (the volume to segment)")
    if not 0 <= channel < shape[3]:
      raise UsageError(f"{path}: --channel {channel} does not exist in shape {tuple(img.shape)}. "
                       f"Fix: choose --channel in [0, {shape[3] - 1}]")
  elif len(shape) != 3:
    raise UsageError(f"{path}: has shape {tuple(img.shape)}, not 3-D. Fix: give a 3-D volume (X, Y, Z)")
  return img


def to_stored_grid(labels_ras: np.ndarray, ras_affine: np.ndarray, stored) -> np.ndarray:
  """The RAS+ label map flipped/permuted back to the file's stored orientation and checked
  against its stored grid (shape and affine)."""
  axcodes = "".join(nib.orientations.aff2axcodes(stored.affine))
  data, affine = from_ras(labels_ras, ras_affine, axcodes)
  if data.shape != tuple(stored.shape[:3]) or not np.allclose(affine, stored.affine, atol=1e-4):
    raise RuntimeError(f"internal error: prediction grid {data.shape} / {affine.tolist()} does not map "
                       f"back to the stored grid {stored.shape[:3]} / {stored.affine.tolist()}")
  return np.ascontiguousarray(data, dtype=np.uint8)


def save_labels(path: Path, labels: np.ndarray, stored) -> None:
  """Writes `labels` with the input's header geometry (sform/qform and codes, pixdim, units)
  copied unchanged; uint8, no intensity scaling; atomic; time-stamp-free gzip."""
  klass = nib.Nifti2Image if isinstance(stored, nib.Nifti2Image) else nib.Nifti1Image
  header = stored.header.copy()
  header.set_data_dtype(np.uint8)
  img = klass(labels, None, header=header)  # affine None: the header's sform/qform are kept as they are
  img.header.set_slope_inter(1.0, 0.0)
  img.header["cal_min"], img.header["cal_max"] = 0, int(labels.max()) if labels.size else 0
  img.header["descrip"] = b"medgen_jax.predict labels"
  img.header["intent_code"] = 1002  # NIFTI_INTENT_LABEL
  write_bytes_atomic(path, gzip.compress(img.to_bytes(), compresslevel=6, mtime=0))


def check_run(workdir: Path) -> dict:
  """The saved config.json of a finished run; UsageError with the fix otherwise (no JAX)."""
  config_path = workdir / "config.json"
  if not workdir.is_dir():
    raise UsageError(f"--workdir {workdir}: does not exist. Fix: give the --workdir of a run made by "
                     "python -m medgen_jax.train")
  if not config_path.is_file():
    raise UsageError(f"{config_path}: no saved run here. Fix: give the --workdir of a run made by "
                     "python -m medgen_jax.train")
  try:
    payload = json.loads(config_path.read_text())
    payload["data"]["channel"]
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise UsageError(f"{config_path}: unreadable or incomplete ({type(e).__name__}: {e}). "
                     "Fix: give the folder of an intact run") from None
  if not (workdir / "results.json").is_file():
    raise UsageError(f"--workdir {workdir}: the run has not finished (no results.json), so no model was "
                     "selected yet. Fix: finish it (rerun the same python -m medgen_jax.train command)")
  if not (workdir / "normalizer.json").is_file():
    raise UsageError(f"{workdir / 'normalizer.json'}: missing, so the run's intensity normalization is "
                     "unknown. Fix: give the folder of an intact run, or retrain")
  return payload


def load_run(workdir: Path):
  """(config, normalizer, models) of a checked run: the selected checkpoint of each model."""
  from medgen_jax import evaluation  # imports JAX; keep `--help` and argument errors fast

  try:
    loaded = evaluation.load_trained_models(workdir)  # (config, normalizer, models)
  except (ValueError, OSError, KeyError) as e:  # DataError is a ValueError
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    detail = " | ".join(lines) or type(e).__name__
    fix = "" if "Fix:" in detail else ". Fix: check the run folder, or retrain"
    raise UsageError(f"--workdir {workdir}: cannot restore the run's models ({detail}){fix}") from None
  return loaded


def stored_normalizer(workdir: Path) -> Normalizer | None:
  """RUN/normalizer.json, read early (no JAX) to check --site; None if unreadable (load_run then
  reports it with the fix)."""
  try:
    return Normalizer.from_dict(json.loads((workdir / "normalizer.json").read_text()))
  except (OSError, ValueError, TypeError, AttributeError):
    return None


def check_site(normalizer: Normalizer, site: str | None) -> str | None:
  """The site to normalize the inputs with: `site` for a per-site normalizer (UsageError naming
  the fitted sites when it is missing or unknown), None for the others (which ignore it)."""
  if not normalizer.per_site:
    return None
  fitted = sorted(normalizer.site_ranges or {})
  if site is None:
    raise UsageError(f"--site: the run's {normalizer.name!r} normalization maps each site with its own "
                     f"intensity range (fitted sites: {fitted}) and no site was given. Fix: pass --site "
                     "with the site the input volumes come from, one of " + ", ".join(fitted))
  if site not in fitted:
    raise UsageError(f"--site {site}: the run's {normalizer.name!r} normalization has no intensity range "
                     f"for this site (fitted sites: {fitted}). Fix: use one of {', '.join(fitted)}; a new "
                     "site's range must come from its own training or unlabelled volumes (retrain with "
                     "it, or use a run with a per-volume normalization such as 'scaled')")
  return site


def choose_model(models, name: str | None):
  names = [m.name for m in models]
  if name is None:
    if len(models) == 1:
      return models[0]
    raise UsageError(f"--model: the run has {len(models)} models {names}. "
                     "Fix: pass --model with one of them")
  for m in models:
    if m.name == name:
      return m
  raise UsageError(f"--model {name}: the run has no such model. Fix: use one of {names}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m medgen_jax.predict", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="a finished run (python -m medgen_jax.train)")
  parser.add_argument("--input", required=True,
                      help="a .nii/.nii.gz file, a folder of them, or a site folder")
  parser.add_argument("--out", required=True, help="output folder (created)")
  parser.add_argument("--model", default=None,
                      help="model name (e.g. separate_A); needed when the run has several")
  parser.add_argument("--channel", type=int, default=None,
                      help="volume of 4-D inputs (default: the run's data.channel)")
  parser.add_argument("--site", default=None,
                      help="site of the inputs; needed when the run's normalization is per-site "
                           "(site_range), ignored otherwise")
  args = parser.parse_args(argv)
  workdir, out_dir = as_path(args.workdir), Path(args.out)  # the run may be in a bucket
  try:
    saved_channel = check_run(workdir)["data"]["channel"]
    channel = args.channel if args.channel is not None else (None if saved_channel < 0 else saved_channel)
    early = stored_normalizer(workdir)
    if early is not None:
      check_site(early, args.site)  # before restoring the models (slow)
    inputs = find_inputs(Path(args.input), channel)
    if out_dir.exists() and not out_dir.is_dir():
      raise UsageError(f"--out {out_dir}: is a file, not a folder. Fix: give a folder (it is created)")
    outputs = [output_path(out_dir, f) for f in inputs]
    clashes = sorted({str(o) for o in outputs if outputs.count(o) > 1})
    if clashes:
      raise UsageError(f"--input {args.input}: several inputs would be written to {clashes[0]} "
                       "(e.g. X.nii and X.nii.gz). Fix: keep one of them or predict them separately")
    existing = [o for o in outputs if o.exists() or o.is_symlink()]
    if existing:
      more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
      raise UsageError(f"{existing[0]}{more}: already exists; predict never overwrites. "
                       "Fix: use another --out, or move the old outputs away")
    stored = [read_header(f, channel) for f in inputs]
    config, normalizer, models = load_run(workdir)
    trained = choose_model(models, args.model)
    normalizer_site = check_site(normalizer, args.site)
    from medgen_jax.inference import is_volumetric
    predict_fn, domain_of = trained.predictor(logits=is_volumetric(config.data))
    try:
      domain = domain_of(args.site) if domain_of else None
    except ValueError as e:
      raise UsageError(str(e)) from None
    try:
      out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise UsageError(f"--out {out_dir}: cannot be created ({e.strerror or e}). Fix: give a writable "
                       "folder path") from None
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  from medgen_jax.inference import predict_case

  print(f"[predict] model {trained.name} of {workdir} (step {trained.step}, selection "
        f"{trained.selection}); {len(inputs)} volume(s) -> {out_dir}", flush=True)
  failed = 0
  for image_path, out_path, header in zip(inputs, outputs, stored):
    try:
      volume = load_nifti(image_path, channel=channel)
      labels = predict_case(predict_fn, trained.variables, volume.data, volume.spacing,
                            normalizer=normalizer, data_config=config.data, batch_size=config.eval.batch_size,
                            overlap=config.eval.overlap, site=normalizer_site, domain=domain)
      if out_path.exists():  # appeared while predicting: still never overwritten
        raise UsageError(f"{out_path}: appeared while predicting; not overwritten. Fix: use another --out")
      save_labels(out_path, to_stored_grid(labels, volume.affine, header), header)
    except (ValueError, OSError) as e:  # DataError and UsageError are ValueErrors
      failed += 1
      message = " | ".join(line for line in str(e).splitlines() if line.strip())
      print(f"error: {image_path}: {message}" if str(image_path) not in message else f"error: {message}",
            file=sys.stderr, flush=True)
      continue
    print(f"[predict] {image_path} -> {out_path}", flush=True)
  if failed:
    print(f"error: {failed} of {len(inputs)} volume(s) could not be predicted (listed above)",
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
