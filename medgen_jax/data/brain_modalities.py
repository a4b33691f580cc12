"""The embedded `brain-modalities` benchmark: unpaired MNI152 subjects rendered as T1, T2 and CT.

    python -m medgen_jax.data.synthesize --benchmark brain-modalities --out data/brain-modalities

A cross-modality shift (the brain stand-in for MM-WHS CT↔MR or CHAOS, see
../shared/reference/data-and-conventions.md a.8.4). Every case is a random subject of
`anatomy.random_subject` (random affine + smooth elastic warp of the MNI152 2009 template and its
tissue probability maps), rendered *from the warped probability maps* with partial volume,

    intensity = Σ_k p_k · μ_k(modality),  k ∈ {CSF, GM, WM}  (p_k sums to the brain mask),

not by remapping the template's T1. The subjects are unpaired: each modality draws its own
subjects from a disjoint random stream (`np.random.default_rng([seed, 101, modality, case])`),
so no subject is scanned twice.

Tissue means μ_k (`TISSUE_MEANS`):

* `T1`: BrainWeb T1 constants CSF 48, GM 106, WM 154 (casperdcl/brainweb, `brainweb/utils.py`
  class `T1`), divided by WM: WM > GM > CSF.
* `T2`: BrainWeb T2 constants CSF 250, GM 100, WM 70 (same file, class `T2`), divided by CSF:
  CSF brightest, GM/WM contrast inverted relative to T1.
* `CT` (Hounsfield units, non-contrast head CT, approximate textbook values quoted in
  data-and-conventions.md a.8.4): CSF 8 (0–15), WM 25 (20–30), GM 40 (35–45). GM/WM again
  inverted relative to T1 and the whole brain spans ~30 HU. The MNI template is skull-stripped,
  so CT adds what a head CT shows around the brain, built from the distance to the warped brain
  mask: 4 mm of CSF/dura (`CT_CSF_GAP_MM`; with 2 mm the blurred skull saturated 37 % of the
  CSF-labelled voxels), a skull of `skull_mm` (5–8 mm, 900 HU), a scalp of `scalp_mm` (4–7 mm,
  30 HU) and air (−1000 HU); none of these is labelled (background).

Acquisition (per scan, see `scan_parameters`):

* MR (T1, T2): point-spread function a Gaussian of FWHM `MR_PSF_FWHM_MM` = 2 mm; scale
  1000 × U(0.9, 1.1) (arbitrary MR units, Nyúl & Udupa 1999); a smooth cubic log-polynomial bias
  field with max/min over the brain U(1.10, 1.25) (BrainWeb's 20 % INU, `simulate.bias_field`);
  Rician noise of 3 % ± 10 % of the reference tissue (BrainWeb's definition: WM for T1, CSF for
  T2; Gudbjartsson & Patz 1995). Stored as int16 with scl_slope, as MR scanners export.
* CT: a smoother PSF, Gaussian FWHM `CT_PSF_FWHM_MM` = 3 mm (thick reconstructed slices and a
  soft-tissue kernel); Gaussian noise σ = U(3, 6) HU; then the brain window `CT_WINDOW_HU` =
  [−20, 100] HU (values clipped to it), stored as int16 HU.

Labels are the subject's own {0 background, 1 CSF, 2 GM, 3 WM} (as brain-sites).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from medgen_jax.data import anatomy as anatomy_lib
from medgen_jax.data.simulate import bias_field, rician_noise, write_modality_cases

MODALITIES = ("T1", "T2", "CT")
STREAM_TAG = 101  # separates this benchmark's random streams from brain-sites' [seed, site, case]

TISSUE_MEANS = {
    "T1": {"csf": 48 / 154, "gm": 106 / 154, "wm": 154 / 154},  # BrainWeb T1 / WM
    "T2": {"csf": 250 / 250, "gm": 100 / 250, "wm": 70 / 250},  # BrainWeb T2 / CSF
    "CT": {"csf": 8.0, "gm": 40.0, "wm": 25.0},                 # HU
}
CT_OUTSIDE_HU = {"csf_gap": 8.0, "bone": 900.0, "scalp": 30.0, "air": -1000.0}
CT_CSF_GAP_MM = 4.0
CT_WINDOW_HU = (-20.0, 100.0)
MR_PSF_FWHM_MM = 2.0
CT_PSF_FWHM_MM = 3.0
MR_SCALE = 1000.0
MR_NOISE = 0.03
FWHM_TO_SIGMA = 1.0 / 2.3548


def scan_parameters(modality: str, rng: np.random.Generator) -> dict:
  """Per-scan acquisition parameters (JSON-serialisable; `bias_coefficients` is not recorded)."""
  if modality == "CT":
    return {"modality": "CT", "psf_fwhm_mm": CT_PSF_FWHM_MM, "noise_hu": float(rng.uniform(3.0, 6.0)),
            "skull_mm": float(rng.uniform(5.0, 8.0)), "scalp_mm": float(rng.uniform(4.0, 7.0)),
            "window_hu": list(CT_WINDOW_HU)}
  return {"modality": modality, "psf_fwhm_mm": MR_PSF_FWHM_MM,
          "scale": float(MR_SCALE * rng.uniform(0.9, 1.1)),
          "noise": float(MR_NOISE * rng.uniform(0.9, 1.1)),
          "bias_ratio": float(rng.uniform(1.10, 1.25)),
          "bias_coefficients": rng.normal(0.0, 1.0, size=20).tolist()}


def _ramp(x: np.ndarray, width: float) -> np.ndarray:
  """Fraction of a voxel of size `width` lying on the positive side of a boundary at x = 0."""
  return np.clip(0.5 + x / width, 0.0, 1.0)


def tissue_image(subject: anatomy_lib.Anatomy, modality: str) -> np.ndarray:
  """Σ_k p_k μ_k over the brain tissues (partial volume), 0 outside the brain."""
  means = TISSUE_MEANS[modality]
  return (subject.csf * means["csf"] + subject.gm * means["gm"] + subject.wm * means["wm"]).astype(np.float32)


def ct_hu(subject: anatomy_lib.Anatomy, params: dict) -> np.ndarray:
  """Noise-free, unblurred CT in HU: brain tissues plus CSF gap, skull, scalp and air outside."""
  spacing = float(np.abs(subject.affine[0, 0]))
  outside = subject.mask < 0.5
  distance = ndimage.distance_transform_edt(outside, sampling=spacing).astype(np.float32)
  skull_in = CT_CSF_GAP_MM
  skull_out = skull_in + params["skull_mm"]
  scalp_out = skull_out + params["scalp_mm"]
  # Shells by distance to the brain, each edge a one-voxel partial-volume ramp.
  inside_gap, inside_skull, inside_scalp = (_ramp(r - distance, spacing)
                                            for r in (skull_in, skull_out, scalp_out))
  hu = CT_OUTSIDE_HU
  surround = (inside_gap * hu["csf_gap"] + (inside_skull - inside_gap) * hu["bone"]
              + (inside_scalp - inside_skull) * hu["scalp"] + (1.0 - inside_scalp) * hu["air"])
  return (tissue_image(subject, "CT") + (1.0 - subject.mask) * surround).astype(np.float32)


def render(subject: anatomy_lib.Anatomy, params: dict, rng: np.random.Generator, *,
           noise: bool = True, window: bool = True) -> np.ndarray:
  """One scan (float32) of `subject` in `params["modality"]`. `noise=False` / `window=False`
  leave out the noise / the CT window (tests measure the tissue constants through them)."""
  modality = params["modality"]
  spacing = float(np.abs(subject.affine[0, 0]))
  sigma = params["psf_fwhm_mm"] * FWHM_TO_SIGMA / spacing
  if modality == "CT":
    x = ndimage.gaussian_filter(ct_hu(subject, params), sigma, mode="nearest")
    if noise:
      x = x + rng.normal(0.0, params["noise_hu"], size=x.shape).astype(np.float32)
    if window:
      x = np.clip(x, *params["window_hu"])
    return x.astype(np.float32)
  x = ndimage.gaussian_filter(tissue_image(subject, modality), sigma, mode="constant")
  x = params["scale"] * x * bias_field(x.shape, params["bias_coefficients"], ratio=params["bias_ratio"],
                                       mask=subject.mask > 0.5)
  if noise:
    x = rician_noise(x, params["noise"] * params["scale"], rng)  # reference tissue mean = 1
  return x.astype(np.float32)


def synthesize_case(modality: str, case_index: int, *, seed: int, resolution_mm: int = 2
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
  """One scan in RAS+: (image float32, label uint8, affine, scan parameters)."""
  rng = np.random.default_rng([seed, STREAM_TAG, MODALITIES.index(modality), case_index])
  subject = anatomy_lib.random_subject(anatomy_lib.mni152(resolution_mm), rng)
  params = scan_parameters(modality, rng)
  return render(subject, params, rng), subject.label, subject.affine, params


def write_cases(folder: Path, *, cases_per_site: int, seed: int, resolution_mm: int = 2,
                progress=print) -> dict:
  """Writes `folder/<modality>/caseNNN_{image,label}.nii.gz`; returns the dataset.json content."""
  scans = write_modality_cases(folder, MODALITIES, cases_per_site=cases_per_site, progress=progress,
                               synthesize_case=lambda m, j: synthesize_case(m, j, seed=seed, resolution_mm=resolution_mm))
  sites = {
      "T1": {"modality": "T1", "description": "T1-weighted MR, BrainWeb T1 tissue contrast (WM > GM > CSF)",
             "tissue_means": TISSUE_MEANS["T1"], "psf_fwhm_mm": MR_PSF_FWHM_MM, "noise_of_wm": MR_NOISE},
      "T2": {"modality": "T2", "description": "T2-weighted MR, BrainWeb T2 tissue contrast (CSF > GM > WM)",
             "tissue_means": TISSUE_MEANS["T2"], "psf_fwhm_mm": MR_PSF_FWHM_MM, "noise_of_csf": MR_NOISE},
      "CT": {"modality": "CT", "description": "non-contrast head CT in HU (GM > WM > CSF), skull and scalp "
             "added around the brain, brain window", "tissue_means_hu": TISSUE_MEANS["CT"],
             "outside_hu": CT_OUTSIDE_HU, "psf_fwhm_mm": CT_PSF_FWHM_MM, "window_hu": list(CT_WINDOW_HU)},
  }
  return {
      "name": "brain-modalities",
      "description": "Unpaired MNI152 2009 subjects (random elastic + affine warps; different subjects "
                     "per modality) rendered from the tissue probability maps as T1, T2 and CT; see "
                     "medgen_jax/data/brain_modalities.py",
      "modality": ",".join(MODALITIES),
      "labels": {str(k): v for k, v in anatomy_lib.LABEL_NAMES.items()},
      "label_remap": {},
      "sites": sites,
      "generator": {"seed": seed, "cases_per_site": cases_per_site, "resolution_mm": resolution_mm,
                    "scans": scans},
      "license": "MNI152 template: Copyright (C) 1993-2004 Louis Collins, McConnell Brain Imaging Centre, "
                 "Montreal Neurological Institute, McGill University (permissive; see medgen_jax/data/anatomy.py)",
  }
