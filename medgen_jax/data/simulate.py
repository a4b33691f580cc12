"""Scanner-effect simulator: what makes the same anatomy look different at each hospital.

A site is a `SitePreset`: fixed acquisition characteristics plus per-scan jitter. `simulate_scan`
renders one scan from a subject's anatomy in the physical order of acquisition:

1. tissue contrast change (sequence / vendor):      x ← x · Σ_k p_k c_k  (background c = 1)
2. through-plane resolution (slice thickness):      Gaussian blur along z with FWHM = f slices,
                                                    keep every f-th slice, linear upsampling back
3. intensity non-standardization (scanner scaling): x ← scale · x^γ
4. bias field / intensity non-uniformity:           x ← x · B,  B = exp(poly₃(u, v, w)),
                                                    max B / min B over the brain = `bias_ratio`
5. Rician noise:                                     x ← |x + n₁ + i·n₂|, n ~ N(0, σ²),
                                                    σ = noise · scale (the mapped intensity of
                                                    T1 = 1, i.e. bright white matter)
6. offset:                                           x ← x + offset

Sources for the ranges (see ../shared/reference/data-and-conventions.md, table a.9):
* scale 300-4000 and γ 0.8-1.3: Nyul & Udupa, MRM 42:1072 (1999) — MR intensities have no fixed
  meaning across scanners; the values are those of the reference site-classification study.
* bias field: BrainWeb's "20 % INU" = field 0.90-1.10 (ratio 1.22) and "40 %" = 0.80-1.20
  (ratio 1.5); 3 T has stronger B1 inhomogeneity than 1.5 T; surface/endorectal coils give far
  stronger fields (torchio's strong RandomBiasField spans 0.73-2.10).
* noise: BrainWeb SBD levels 0-9 % of the WM intensity; Rician (Gudbjartsson & Patz, MRM 1995);
  3 T has roughly twice the SNR of 1.5 T.
* slice thickness: the prostate sites span 1.25-4 mm through-plane (SAML, MICCAI 2020); BrainWeb
  offers 1-9 mm. At the 2 mm grid, f = 2 and 3 mean 4 and 6 mm slices.
* contrast: field strength and sequence change T1 tissue contrast (Han et al., NeuroImage 2006:
  a sequence change mattered more than a scanner upgrade).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from medgen_jax.data.anatomy import Anatomy
from medgen_jax.data.nifti import write_nifti


@dataclasses.dataclass(frozen=True)
class SitePreset:
  """One simulated site. Ranges are (low, high) sampled uniformly per scan."""

  name: str
  description: str
  scale: float
  gamma: float
  noise: float                          # Rician sigma as a fraction of the WM intensity
  bias_ratio: tuple[float, float]       # max/min of the bias field inside the brain
  slice_factor: int = 1                 # through-plane: 1 = native, f = f-times thicker slices
  offset: float = 0.0
  contrast: tuple[float, float, float] = (1.0, 1.0, 1.0)  # multipliers for CSF, GM, WM
  orientation: str = "RAS"              # how the site's files store the axes
  scale_jitter: float = 0.10            # relative, per scan
  gamma_jitter: float = 0.05
  noise_jitter: float = 0.10
  contrast_jitter: float = 0.03


SITE_PRESETS: dict[str, SitePreset] = {p.name: p for p in (
    SitePreset("A", "3 T, Siemens-like: bright, gamma 0.8, low noise (1 %), moderate 3 T bias field",
               scale=1000.0, gamma=0.8, noise=0.01, bias_ratio=(1.25, 1.45)),
    SitePreset("B", "1.5 T, Philips-like: low scale with offset, 3 % noise, BrainWeb 20 % INU, "
               "lower grey/white contrast, files stored LPS",
               scale=300.0, offset=20.0, gamma=1.0, noise=0.03, bias_ratio=(1.10, 1.22),
               contrast=(1.0, 1.08, 0.97), orientation="LPS"),
    SitePreset("C", "3 T, thick 6 mm slices, GE-like: large scale, gamma 1.3, 2 % noise",
               scale=4000.0, gamma=1.3, noise=0.02, bias_ratio=(1.15, 1.30), slice_factor=3,
               orientation="LAS"),
    SitePreset("D", "1.5 T, older scanner: 4 mm slices, 5 % noise, BrainWeb 40 % INU, "
               "brighter CSF and GM (reduced contrast), offset 100",
               scale=2000.0, offset=100.0, gamma=1.1, noise=0.05, bias_ratio=(1.30, 1.50),
               slice_factor=2, contrast=(1.4, 1.1, 1.0)),
    SitePreset("E", "3 T with a surface coil: very strong bias field, gamma 0.9, 2 % noise",
               scale=1500.0, gamma=0.9, noise=0.02, bias_ratio=(1.60, 2.10), orientation="RPI"),
    SitePreset("F", "1.5 T, fast low-SNR protocol: 7 % noise, 4 mm slices, gamma 1.2",
               scale=600.0, gamma=1.2, noise=0.07, bias_ratio=(1.10, 1.30), slice_factor=2,
               contrast=(0.8, 1.0, 1.0)),
)}


def scan_parameters(preset: SitePreset, rng: np.random.Generator) -> dict:
  """Per-scan parameters: the preset's values with per-scan jitter, plus the bias seed."""
  def jitter(value, rel):
    return float(value * (1.0 + rng.uniform(-rel, rel)))

  return {
      "site": preset.name,
      "scale": jitter(preset.scale, preset.scale_jitter),
      "gamma": jitter(preset.gamma, preset.gamma_jitter),
      "noise": jitter(preset.noise, preset.noise_jitter),
      "bias_ratio": float(rng.uniform(*preset.bias_ratio)),
      "slice_factor": int(preset.slice_factor),
      "offset": float(preset.offset),
      "contrast": [jitter(c, preset.contrast_jitter) for c in preset.contrast],
      "bias_coefficients": rng.normal(0.0, 1.0, size=20).tolist(),
      "slice_phase": int(rng.integers(0, preset.slice_factor)),
  }


def _cubic_monomials(shape) -> np.ndarray:
  """The 20 monomials u^a v^b w^c, a+b+c <= 3, over coordinates in [-1, 1]: [20, X, Y, Z]."""
  axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
  u, v, w = np.meshgrid(*axes, indexing="ij")
  return np.stack([u ** a * v ** b * w ** c for a in range(4) for b in range(4 - a)
                   for c in range(4 - a - b)])


def bias_field(shape, coefficients, *, ratio: float, mask: np.ndarray) -> np.ndarray:
  """exp(Σ c_i m_i), rescaled in log space so that max/min inside `mask` equals `ratio` and the
  geometric mean inside `mask` is 1."""
  log_field = np.tensordot(np.asarray(coefficients, np.float32), _cubic_monomials(shape), axes=1)
  inside = log_field[mask]
  span = float(inside.max() - inside.min())
  log_field = (log_field - inside.mean()) * (np.log(ratio) / max(span, 1e-8))
  return np.exp(log_field).astype(np.float32)


def thick_slices(x: np.ndarray, *, factor: int, phase: int = 0, axis: int = 2) -> np.ndarray:
  """Simulates slices `factor` times thicker: slice-profile blur (Gaussian, FWHM = factor
  voxels), keep every factor-th slice from `phase`, linear interpolation back to the grid."""
  if factor <= 1:
    return x
  blurred = ndimage.gaussian_filter1d(x, sigma=factor / 2.3548, axis=axis, mode="nearest")
  n = x.shape[axis]
  kept = np.arange(phase, n, factor)
  samples = np.take(blurred, kept, axis=axis)
  positions = np.clip((np.arange(n) - phase) / factor, 0, len(kept) - 1)
  lo = np.floor(positions).astype(int)
  hi = np.minimum(lo + 1, len(kept) - 1)
  frac = (positions - lo).astype(x.dtype)
  shape = [1] * x.ndim
  shape[axis] = n
  frac = frac.reshape(shape)
  return (np.take(samples, lo, axis=axis) * (1 - frac) + np.take(samples, hi, axis=axis) * frac)


def rician_noise(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
  """Magnitude of the signal plus complex Gaussian noise: Rayleigh where the signal is 0."""
  real = x + rng.normal(0.0, sigma, size=x.shape).astype(np.float32)
  imag = rng.normal(0.0, sigma, size=x.shape).astype(np.float32)
  return np.sqrt(real * real + imag * imag)


def simulate_scan(subject: Anatomy, params: dict, rng: np.random.Generator, *,
                  stages: tuple[str, ...] = ("contrast", "thick", "intensity", "bias", "noise", "offset")
                  ) -> np.ndarray:
  """Renders one scan (float32) of `subject` with per-scan `params` (see `scan_parameters`).

  `stages` selects which effects to apply (all by default); tests switch single ones off to
  measure the others.
  """
  x = subject.t1.astype(np.float32)
  if "contrast" in stages:
    c_csf, c_gm, c_wm = params["contrast"]
    background = np.clip(1.0 - subject.csf - subject.gm - subject.wm, 0.0, 1.0)
    x = x * (background + c_csf * subject.csf + c_gm * subject.gm + c_wm * subject.wm)
  if "thick" in stages:
    x = thick_slices(x, factor=params["slice_factor"], phase=params["slice_phase"])
  x = np.clip(x, 0.0, None)
  if "intensity" in stages:
    x = params["scale"] * x ** params["gamma"]
  if "bias" in stages:
    x = x * bias_field(x.shape, params["bias_coefficients"], ratio=params["bias_ratio"],
                       mask=subject.mask > 0.5)
  if "noise" in stages:
    x = rician_noise(x, reference_intensity(params, stages) * params["noise"], rng)
  if "offset" in stages:
    x = x + params["offset"]
  return x.astype(np.float32)


def reference_intensity(params: dict, stages=("intensity",)) -> float:
  """The noise reference: the mapped intensity of T1 = 1 (bright white matter)."""
  return params["scale"] if "intensity" in stages else 1.0


def write_modality_cases(folder, modalities, *, cases_per_site: int, synthesize_case, progress=print) -> dict:
  """Writes `folder/<modality>/caseNNN_{image,label}.nii.gz` for the cross-modality benchmarks:
  `synthesize_case(modality, j) -> (image, label, affine, params)`; CT as integer HU (as CT
  scanners export), MR as int16 with scl_slope/scl_inter. Returns {modality/case: params} (the
  bias coefficients left out) for dataset.json."""
  folder, scans, start = Path(folder), {}, time.time()
  for modality in modalities:
    for j in range(cases_per_site):
      image, label, affine, params = synthesize_case(modality, j)
      case = f"case{j:03d}"
      if modality == "CT":
        write_nifti(folder / modality / f"{case}_image.nii.gz", np.round(image).astype(np.int16), affine)
      else:
        write_nifti(folder / modality / f"{case}_image.nii.gz", image, affine, on_disk_dtype=np.int16)
      write_nifti(folder / modality / f"{case}_label.nii.gz", label.astype(np.uint8), affine)
      scans[f"{modality}/{case}"] = {k: v for k, v in params.items() if k != "bias_coefficients"}
      if progress:
        progress(f"  {modality}/{case}  ({time.time() - start:.0f} s)")
  return scans
