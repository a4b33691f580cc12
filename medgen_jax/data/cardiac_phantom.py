"""The embedded `cardiac-phantom` benchmark: a procedural heart scanned as bSSFP MR and as CT.

    python -m medgen_jax.data.synthesize --benchmark cardiac-phantom --out data/cardiac-phantom

A stand-in for the MM-WHS cross-modality task as pre-processed by PnP-AdaNet / SIFA
(../shared/reference/methods.md 2.2): unpaired CT and MR of the heart with four labelled
structures, {0 background, 1 MYO (left-ventricle myocardium), 2 LAC (left-atrium blood cavity),
3 LVC (left-ventricle blood cavity), 4 AA (ascending aorta)}. Everything else (right ventricle
and atrium, pulmonary artery, descending aorta, epicardial and mediastinal fat, lung, chest wall,
sternum, spine, liver) is drawn but left unlabelled (0), as in MM-WHS.

Anatomy (millimetres, RAS+: x right, y anterior, z superior; volume centre = heart centre):

* The heart is built in its own frame: long axis e1 from the LV base to the apex, pointing
  left-anterior-inferior ((−0.6, 0.6, −0.5) normalised), e2 ⟂ e1 towards the right ventricle.
  LV cavity: half prolate ellipsoid (base-to-apex `lv_length` 60–80 mm, radius `lv_radius`
  20–27 mm); myocardium: the shell around it, `myo_mm` 8–12 mm thick; RV: a larger ellipsoid on
  the e2 side (4 mm muscle wall) that the LV overwrites, leaving a crescent; LA and RA: ellipsoids
  behind the base; AA: a tube (radius 12–16 mm) from the aortic valve at the base going
  superiorly and rightwards out of the volume; PA: a tube from the RV outflow going superiorly and
  to the left; epicardial fat: a 2–7 mm layer of varying thickness around the whole heart.
* The whole heart is rotated (±12° about each axis) and shifted (±8 mm) at random, and all
  radii are jittered (±15 %).
* Body (not rotated): thorax ellipse (lungs inside), 12 mm chest-wall muscle, 8 mm subcutaneous
  fat, sternum, vertebral body (bone), descending aorta, mediastinal fat, liver under a
  diaphragm dome.
* A smooth random elastic warp (Gaussian displacements, sd `elastic_mm` = 3 mm, on a 5³ lattice,
  cubic-spline upsampled) deforms everything.

Shapes are signed-distance functions evaluated at the warped coordinates, painted in order
(later shapes cover earlier ones). Each voxel holds tissue *fractions* (partial volume: a shape
covers clip(0.5 − sdf/spacing, 0, 1) of a voxel), and the labels are the hard version (sdf < 0).

Rendering (`render`): image = Σ_tissue fraction · mean(tissue), Gaussian PSF, then

* `MR` (cine bSSFP, 1.5 T): the bSSFP steady-state signal at its optimal flip angle is
  ∝ PD·sqrt(T2/T1) (Scheffler & Lehnhardt, Eur Radiol 13:2409, 2003). With 1.5 T relaxation
  times (ms) from Stanisz et al., MRM 54:507 (2005) — blood 1441/290, myocardium 1030/40,
  liver 576/46, skeletal muscle 1008/44 — and de Bazelaire et al., Radiology 230:652 (2004) —
  subcutaneous fat 343/58, vertebral marrow 549/49 — relative to blood: blood 1.00, fat 0.92,
  liver 0.63, muscle 0.47, myocardium 0.44 (`MR_MEANS`). Lung (proton density ~0.2 and
  T2* ~1–2 ms) is set to 0.05 and the vertebral body (marrow inside a signal-free cortical
  shell) to half the marrow value. Then arbitrary scale 1000 × U(0.8, 1.2), a smooth cubic
  log-polynomial bias field of the surface coil array (max/min over the body U(1.3, 1.8)) and
  Rician noise σ = U(3, 5) % of blood. Stored int16 with scl_slope.
* `CT` (contrast-enhanced, arterial phase), Hounsfield units: left-heart and aortic blood
  U(300, 400) (iodinated contrast), right-heart blood U(150, 300) (contrast still mixing),
  myocardium U(100, 150), liver 90, muscle 50, fat −100, lung −800, bone U(700, 900),
  air −1000 (`CT_HU`); Gaussian noise σ = U(15, 25) HU; window `CT_WINDOW_HU` = [−300, 700]
  (values clipped to it), stored as int16 HU. The contrast order differs from MR: bone > blood >
  myocardium > liver > muscle > fat > lung in CT, blood > fat > liver > muscle ≳ myocardium >
  bone > lung in MR (fat bright in MR, dark in CT).

Default grid: 2 mm isotropic, 96 × 96 × 80 voxels (192 × 192 × 160 mm around the heart), so
an axial slice upsampled to 256 × 256 is a 0.75 mm crop around the heart like MM-WHS's
256 × 256 ROI. `spacing_mm` keeps the field of view and changes the voxel count.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from medgen_jax.data.simulate import bias_field, rician_noise, write_modality_cases

LABEL_NAMES = {0: "background", 1: "MYO", 2: "LAC", 3: "LVC", 4: "AA"}
MYO, LAC, LVC, AA = 1, 2, 3, 4
MODALITIES = ("MR", "CT")
STREAM_TAG = 202  # separates this benchmark's random streams from the other benchmarks'
FIELD_OF_VIEW_MM = (192.0, 192.0, 160.0)
TISSUES = ("air", "lung", "fat", "muscle", "myocardium", "blood", "blood_right", "bone", "liver")

# bSSFP signal ∝ PD·sqrt(T2/T1); (T1, T2) in ms at 1.5 T (Stanisz 2005; de Bazelaire 2004).
RELAXATION_1P5T = {"blood": (1441.0, 290.0), "myocardium": (1030.0, 40.0), "liver": (576.0, 46.0),
                   "muscle": (1008.0, 44.0), "fat": (343.0, 58.0), "marrow": (549.0, 49.0)}


def _bssfp(tissue: str) -> float:
  t1, t2 = RELAXATION_1P5T[tissue]
  t1b, t2b = RELAXATION_1P5T["blood"]
  return float(np.sqrt(t2 / t1) / np.sqrt(t2b / t1b))


MR_MEANS = {"air": 0.0, "lung": 0.05, "fat": _bssfp("fat"), "muscle": _bssfp("muscle"),
            "myocardium": _bssfp("myocardium"), "blood": 1.0, "blood_right": 1.0,
            "bone": 0.5 * _bssfp("marrow"), "liver": _bssfp("liver")}
# Hounsfield units: fixed values, or (low, high) sampled per scan.
CT_HU = {"air": -1000.0, "lung": -800.0, "fat": -100.0, "muscle": 50.0, "myocardium": (100.0, 150.0),
         "blood": (300.0, 400.0), "blood_right": (150.0, 300.0), "bone": (700.0, 900.0), "liver": 90.0}
CT_WINDOW_HU = (-300.0, 700.0)
MR_PSF_FWHM_MM = 3.0
CT_PSF_FWHM_MM = 2.5
FWHM_TO_SIGMA = 1.0 / 2.3548


# ----------------------------------------------------------------------------- geometry

def _rotation(angles_deg) -> np.ndarray:
  ax, ay, az = np.deg2rad(angles_deg)
  rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
  ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
  rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
  return rz @ ry @ rx


def _unit(v) -> np.ndarray:
  v = np.asarray(v, np.float64)
  return v / np.linalg.norm(v)


def sample_anatomy(rng: np.random.Generator) -> dict:
  """Random shape and pose parameters of one subject (JSON-serialisable)."""
  def jitter(value, rel=0.15):
    return float(value * rng.uniform(1 - rel, 1 + rel))

  return {
      "rotation_deg": rng.uniform(-12.0, 12.0, size=3).tolist(),
      "translation_mm": rng.uniform(-8.0, 8.0, size=3).tolist(),
      "lv_length": float(rng.uniform(60.0, 80.0)), "lv_radius": float(rng.uniform(20.0, 27.0)),
      "myo_mm": float(rng.uniform(8.0, 12.0)),
      "la_radii": [jitter(22.0), jitter(27.0), jitter(20.0)],
      "ra_radii": [jitter(24.0), jitter(22.0), jitter(22.0)],
      "rv_scale": jitter(1.0, 0.1),
      "aa_radius": float(rng.uniform(12.0, 16.0)), "pa_radius": jitter(12.0, 0.1),
      "fat_mm": float(rng.uniform(2.0, 7.0)),
      "thorax": [jitter(150.0, 0.1), jitter(105.0, 0.1)],
      "elastic_mm": 3.0,
      "elastic_seed": int(rng.integers(0, 2**31 - 1)),
  }


def grid_mm(shape, spacing_mm: float) -> np.ndarray:
  """Voxel centre coordinates [3, X, Y, Z] in mm, the volume centre at 0."""
  axes = [(np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * spacing_mm for n in shape]
  return np.stack(np.meshgrid(*axes, indexing="ij"))


def affine_for(shape, spacing_mm: float) -> np.ndarray:
  affine = np.diag([spacing_mm] * 3 + [1.0])
  affine[:3, 3] = [-(n - 1) / 2.0 * spacing_mm for n in shape]
  return affine


def elastic_displacement(shape, spacing_mm: float, sd_mm: float, seed: int, control_points: int = 5
                         ) -> np.ndarray:
  """Smooth displacements [3, X, Y, Z] in mm: Gaussian on a control lattice, cubic upsampled."""
  coarse = np.random.default_rng(seed).normal(0.0, sd_mm, size=(3,) + (control_points,) * 3)
  zoom = [n / control_points for n in shape]
  return np.stack([ndimage.zoom(coarse[a], zoom, order=3, mode="nearest", grid_mode=True
                                )[: shape[0], : shape[1], : shape[2]] for a in range(3)]).astype(np.float32)


def _ellipsoid_sdf(p, centre, axes, radii):
  """Approximate signed distance (mm) to an ellipsoid with orthonormal `axes` (rows)."""
  d = p - np.asarray(centre, np.float32)[:, None, None, None]
  q = np.einsum("ij,j...->i...", np.asarray(axes, np.float32), d)
  r = np.asarray(radii, np.float32)[:, None, None, None]
  return (np.sqrt(np.sum((q / r) ** 2, axis=0)) - 1.0) * float(np.min(radii))


def _tube_sdf(p, points, radius):
  """Signed distance (mm) to a tube of `radius` around the polyline `points`."""
  best = None
  for a, b in zip(points[:-1], points[1:]):
    a = np.asarray(a, np.float32)
    ab = np.asarray(b, np.float32) - a
    ap = p - a[:, None, None, None]
    t = np.clip(np.einsum("i,i...->...", ab, ap) / float(ab @ ab), 0.0, 1.0)
    d = np.sqrt(np.sum((ap - t[None] * ab[:, None, None, None]) ** 2, axis=0))
    best = d if best is None else np.minimum(best, d)
  return best - radius


def _bezier(p0, p1, p2, n=12):
  t = np.linspace(0.0, 1.0, n)[:, None]
  p0, p1, p2 = (np.asarray(v, np.float64) for v in (p0, p1, p2))
  return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


def _cylinder_z_sdf(p, centre_xy, radii_xy):
  x = (p[0] - centre_xy[0]) / radii_xy[0]
  y = (p[1] - centre_xy[1]) / radii_xy[1]
  return (np.sqrt(x * x + y * y) - 1.0) * float(min(radii_xy))


def build_phantom(anatomy: dict, shape, spacing_mm: float) -> tuple[np.ndarray, np.ndarray]:
  """(tissue fractions [len(TISSUES), X, Y, Z] float32, labels uint8 [X, Y, Z])."""
  p = grid_mm(shape, spacing_mm)
  p += elastic_displacement(shape, spacing_mm, anatomy["elastic_mm"], anatomy["elastic_seed"])
  # Heart frame: coordinates rotated/shifted back into the nominal heart.
  rot = _rotation(anatomy["rotation_deg"]).astype(np.float32)
  shift = np.asarray(anatomy["translation_mm"], np.float32)[:, None, None, None]
  h = np.einsum("ji,j...->i...", rot, p - shift)

  fractions = np.zeros((len(TISSUES),) + tuple(shape), np.float32)
  fractions[TISSUES.index("air")] = 1.0
  label = np.zeros(shape, np.uint8)

  def paint(sdf, tissue, value=0):
    cover = np.clip(0.5 - sdf / spacing_mm, 0.0, 1.0).astype(np.float32)
    fractions[...] *= 1.0 - cover
    fractions[TISSUES.index(tissue)] += cover
    label[sdf < 0] = value

  # Body.
  ax, ay = anatomy["thorax"]
  centre = (0.0, -30.0)
  paint(_cylinder_z_sdf(p, centre, (ax + 20.0, ay + 20.0)), "fat")
  paint(_cylinder_z_sdf(p, centre, (ax + 12.0, ay + 12.0)), "muscle")
  paint(_cylinder_z_sdf(p, centre, (ax, ay)), "lung")
  sternum_y = centre[1] + ay + 6.0
  paint(_cylinder_z_sdf(p, (0.0, sternum_y), (14.0, 6.0)), "bone")
  dome = -40.0 - 0.004 * ((p[0] - 50.0) ** 2 + (p[1] + 10.0) ** 2)
  paint(np.maximum(p[2] - dome, _cylinder_z_sdf(p, centre, (ax, ay))), "liver")
  paint(_cylinder_z_sdf(p, (-8.0, -62.0), (24.0, 22.0)), "fat")       # posterior mediastinum
  paint(_cylinder_z_sdf(p, (0.0, -82.0), (18.0, 16.0)), "bone")       # vertebral body
  paint(_cylinder_z_sdf(p, (-24.0, -60.0), (11.0, 11.0)), "blood")    # descending aorta

  # Heart (in the heart frame h).
  e1 = _unit((-0.6, 0.6, -0.5))
  e2 = _unit(np.array([1.0, 0.6, 0.0]) - np.dot([1.0, 0.6, 0.0], e1) * e1)
  e3 = np.cross(e1, e2)
  frame = np.stack([e1, e2, e3])
  a, b, th = anatomy["lv_length"], anatomy["lv_radius"], anatomy["myo_mm"]
  base = -0.5 * a * e1
  s1 = np.einsum("i,i...->...", e1.astype(np.float32), h - base.astype(np.float32)[:, None, None, None])
  rv_s = anatomy["rv_scale"]
  rv_centre = base + 0.35 * a * e1 + 0.9 * b * e2 + 0.15 * b * e3
  rv_radii = np.array([0.75 * a, b + 8.0, b + 14.0]) * rv_s
  la_centre = base - 26.0 * e1 - 0.3 * b * e2 + 6.0 * e3
  ra_centre = base - 14.0 * e1 + (b + 20.0) * e2 + 4.0 * e3
  aa_root = base + 0.35 * b * e2 + 4.0 * e1
  aa_points = _bezier(aa_root, aa_root + np.array([8.0, 6.0, 35.0]), aa_root + np.array([10.0, -4.0, 110.0]))
  pa_root = rv_centre - 0.55 * rv_radii[0] * e1 + 0.3 * rv_radii[1] * e2
  pa_points = _bezier(pa_root, pa_root + np.array([-8.0, 6.0, 30.0]),
                      pa_root + np.array([-45.0, -35.0, 55.0]))

  lv_outer = np.maximum(_ellipsoid_sdf(h, base, frame, (a + th, b + th, b + th)), -s1)
  lv_cavity = np.maximum(_ellipsoid_sdf(h, base, frame, (a, b, b)), -s1)
  rv_outer = _ellipsoid_sdf(h, rv_centre, frame, rv_radii + 4.0)
  rv_cavity = _ellipsoid_sdf(h, rv_centre, frame, rv_radii)
  la = _ellipsoid_sdf(h, la_centre, frame, anatomy["la_radii"])
  ra = _ellipsoid_sdf(h, ra_centre, frame, anatomy["ra_radii"])
  aa = _tube_sdf(h, aa_points, anatomy["aa_radius"])
  pa = _tube_sdf(h, pa_points, anatomy["pa_radius"])
  heart = np.minimum.reduce([lv_outer, rv_outer, la, ra, aa, pa])
  # Epicardial fat: a layer of smoothly varying thickness (0.3-1.7 x fat_mm) around the heart.
  texture = elastic_displacement(shape, spacing_mm, 0.7, anatomy["elastic_seed"] + 1, control_points=6)[0]
  paint(heart - anatomy["fat_mm"] * np.clip(1.0 + texture, 0.3, 1.7), "fat")
  paint(ra, "blood_right")
  paint(rv_outer, "muscle")
  paint(rv_cavity, "blood_right")
  paint(la, "blood", LAC)
  paint(pa, "blood_right")
  paint(aa, "blood", AA)
  paint(lv_outer, "myocardium", MYO)
  paint(lv_cavity, "blood", LVC)
  return fractions, label


# ----------------------------------------------------------------------------- rendering

def scan_parameters(modality: str, rng: np.random.Generator) -> dict:
  """Per-scan parameters: tissue means (CT ranges sampled), PSF, noise, bias."""
  if modality == "CT":
    means = {k: float(rng.uniform(*v)) if isinstance(v, tuple) else v for k, v in CT_HU.items()}
    return {"modality": "CT", "means": means, "psf_fwhm_mm": CT_PSF_FWHM_MM,
            "noise_hu": float(rng.uniform(15.0, 25.0)), "window_hu": list(CT_WINDOW_HU)}
  return {"modality": "MR", "means": dict(MR_MEANS), "psf_fwhm_mm": MR_PSF_FWHM_MM,
          "scale": float(1000.0 * rng.uniform(0.8, 1.2)), "noise": float(rng.uniform(0.03, 0.05)),
          "bias_ratio": float(rng.uniform(1.3, 1.8)),
          "bias_coefficients": rng.normal(0.0, 1.0, size=20).tolist()}


def render(fractions: np.ndarray, params: dict, rng: np.random.Generator, spacing_mm: float, *,
           noise: bool = True, window: bool = True, psf: bool = True) -> np.ndarray:
  """One scan (float32). `noise`, `window`, `psf` switch stages off (tests measure the means)."""
  means = params["means"]
  x = np.tensordot(np.asarray([means[t] for t in TISSUES], np.float32), fractions, axes=1)
  if psf:
    x = ndimage.gaussian_filter(x, params["psf_fwhm_mm"] * FWHM_TO_SIGMA / spacing_mm, mode="nearest")
  if params["modality"] == "CT":
    if noise:
      x = x + rng.normal(0.0, params["noise_hu"], size=x.shape).astype(np.float32)
    if window:
      x = np.clip(x, *params["window_hu"])
    return x.astype(np.float32)
  body = fractions[TISSUES.index("air")] < 0.5
  field = bias_field(x.shape, params["bias_coefficients"], ratio=params["bias_ratio"], mask=body)
  x = params["scale"] * x * field
  if noise:
    x = rician_noise(x, params["noise"] * params["scale"], rng)  # noise relative to blood (mean 1)
  return x.astype(np.float32)


def grid_shape(spacing_mm: float) -> tuple[int, int, int]:
  return tuple(int(round(f / spacing_mm)) for f in FIELD_OF_VIEW_MM)


def synthesize_case(modality: str, case_index: int, *, seed: int, spacing_mm: float = 2.0
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
  """One scan in RAS+: (image float32, label uint8, affine, parameters incl. the anatomy)."""
  rng = np.random.default_rng([seed, STREAM_TAG, MODALITIES.index(modality), case_index])
  shape = grid_shape(spacing_mm)
  anatomy = sample_anatomy(rng)
  fractions, label = build_phantom(anatomy, shape, spacing_mm)
  params = scan_parameters(modality, rng)
  image = render(fractions, params, rng, spacing_mm)
  return image, label, affine_for(shape, spacing_mm), {**params, "anatomy": anatomy}


def write_cases(folder: Path, *, cases_per_site: int, seed: int, spacing_mm: float = 2.0,
                progress=print) -> dict:
  """Writes `folder/<MR|CT>/caseNNN_{image,label}.nii.gz`; returns the dataset.json content."""
  scans = write_modality_cases(folder, MODALITIES, cases_per_site=cases_per_site, progress=progress,
                               synthesize_case=lambda m, j: synthesize_case(m, j, seed=seed, spacing_mm=spacing_mm))
  ct_table = {k: list(v) if isinstance(v, tuple) else v for k, v in CT_HU.items()}
  return {
      "name": "cardiac-phantom",
      "description": "Procedural hearts (random shape, pose and elastic warp; different subjects per "
                     "modality) scanned as cine bSSFP MR and contrast-enhanced CT, MM-WHS labels; see "
                     "medgen_jax/data/cardiac_phantom.py",
      "modality": ",".join(MODALITIES),
      "labels": {str(k): v for k, v in LABEL_NAMES.items()},
      "label_remap": {},
      "sites": {
          "MR": {"modality": "MR", "description": "1.5 T cine bSSFP: blood bright, fat bright, "
                 "myocardium dark grey, lung dark; bias field, Rician noise",
                 "tissue_means_of_blood": MR_MEANS, "psf_fwhm_mm": MR_PSF_FWHM_MM},
          "CT": {"modality": "CT", "description": "contrast-enhanced CT (arterial phase) in HU, window "
                 f"{list(CT_WINDOW_HU)}; Gaussian noise", "tissue_hu": ct_table,
                 "psf_fwhm_mm": CT_PSF_FWHM_MM, "window_hu": list(CT_WINDOW_HU)},
      },
      "generator": {"seed": seed, "cases_per_site": cases_per_site, "spacing_mm": spacing_mm,
                    "field_of_view_mm": list(FIELD_OF_VIEW_MM), "scans": scans},
      "license": "procedural (no external data); same licence as medgen_jax",
  }
