"""Brain anatomy for the embedded benchmark: the MNI152 2009 template shipped inside nilearn.

`nilearn.datasets.load_mni152_template`, `load_mni152_gm_template` and
`load_mni152_wm_template` read files inside the nilearn wheel (no network). Labels:
{0 background, 1 CSF, 2 GM, 3 WM} by argmax over [1 - mask, csf, gm·mask, wm·mask] with
csf = clip(1 - gm - wm, 0, 1)·mask and mask = T1 > 0.2 (nilearn's brain mask threshold).

Random "subjects" are made from this single average brain by a random smooth elastic warp plus
a small affine (rotation, scaling, translation) applied to image, probabilities and labels
together (labels by nearest neighbour): `random_subject`.

MNI152 licence (from TemplateFlow's tpl-MNI152NLin2009aSym): Copyright (C) 1993-2004 Louis
Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University.
Permission to use, copy, modify, and distribute this software and its documentation for any
purpose and without fee is hereby granted, provided that the above copyright notice appear in
all copies. The authors and McGill University make no representations about the suitability of
this software for any purpose. It is provided "as is" without express or implied warranty.
Cite Fonov et al., NeuroImage 47:S102 (2009) and 54:313 (2011); Collins et al. (1999).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from scipy import ndimage

LABEL_NAMES = {0: "background", 1: "CSF", 2: "GM", 3: "WM"}
BRAIN_MASK_THRESHOLD = 0.2


@dataclasses.dataclass(frozen=True)
class Anatomy:
  """T1 intensities in [0, 1], tissue probabilities, hard labels, on one RAS+ grid."""

  t1: np.ndarray      # float32 [X, Y, Z]
  csf: np.ndarray     # float32 probabilities
  gm: np.ndarray
  wm: np.ndarray
  mask: np.ndarray    # float32 brain mask in [0, 1] (soft after warping)
  label: np.ndarray   # uint8 {0, 1, 2, 3}
  affine: np.ndarray


def labels_from_probabilities(mask, csf, gm, wm) -> np.ndarray:
  return np.argmax(np.stack([1.0 - mask, csf, gm * mask, wm * mask]), axis=0).astype(np.uint8)


@functools.lru_cache(maxsize=2)
def mni152(resolution_mm: int = 2) -> Anatomy:
  """The MNI152 2009 anatomy at `resolution_mm` (nilearn resamples for resolutions other than 1)."""
  from nilearn import datasets  # slow import (~2 s); only the synthesizer needs it

  t1_img = datasets.load_mni152_template(resolution=resolution_mm)
  t1 = t1_img.get_fdata().astype(np.float32).clip(0, 1)
  gm = datasets.load_mni152_gm_template(resolution=resolution_mm).get_fdata().astype(np.float32).clip(0, 1)
  wm = datasets.load_mni152_wm_template(resolution=resolution_mm).get_fdata().astype(np.float32).clip(0, 1)
  mask = (t1 > BRAIN_MASK_THRESHOLD).astype(np.float32)
  csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * mask
  return Anatomy(t1, csf, gm * mask, wm * mask, mask,
                 labels_from_probabilities(mask, csf, gm, wm), np.asarray(t1_img.affine))


def random_warp_coordinates(rng: np.random.Generator, shape, *, max_rotation_deg: float = 10.0,
                            max_scale: float = 0.10, max_translation_vox: float = 3.0,
                            elastic_sd_vox: float = 1.5, control_points: int = 6) -> np.ndarray:
  """Sampling coordinates [3, X, Y, Z] of a random affine + smooth elastic warp.

  Affine: rotation about each axis uniform in ±max_rotation_deg, isotropic scale in
  1 ± max_scale, translation uniform in ±max_translation_vox, all about the volume centre.
  Elastic: Gaussian displacements (sd `elastic_sd_vox`) on a control_points³ lattice,
  upsampled with cubic splines: smooth, topology-preserving for these magnitudes.
  """
  shape = tuple(shape)
  angles = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg, size=3))
  scale = 1.0 + rng.uniform(-max_scale, max_scale)
  shift = rng.uniform(-max_translation_vox, max_translation_vox, size=3)
  cx, cy, cz = np.cos(angles)
  sx, sy, sz = np.sin(angles)
  rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
  rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
  rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
  matrix = (rot_z @ rot_y @ rot_x) / scale  # output -> input mapping
  centre = (np.array(shape) - 1) / 2.0
  grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
  coords = np.einsum("ij,j...->i...", matrix.astype(np.float32),
                     grid - centre[:, None, None, None].astype(np.float32))
  coords += (centre + shift)[:, None, None, None].astype(np.float32)
  coarse = rng.normal(0.0, elastic_sd_vox, size=(3,) + (control_points,) * 3)
  zoom = [n / control_points for n in shape]
  for axis in range(3):
    coords[axis] += ndimage.zoom(coarse[axis], zoom, order=3, mode="nearest", grid_mode=True
                                 )[: shape[0], : shape[1], : shape[2]].astype(np.float32)
  return coords


def warp(volume: np.ndarray, coords: np.ndarray, *, order: int) -> np.ndarray:
  """Samples `volume` at `coords` (order 1 for intensities, 0 for labels); outside = 0."""
  return ndimage.map_coordinates(volume, coords, order=order, mode="constant", cval=0.0
                                 ).astype(volume.dtype)


def random_subject(anatomy: Anatomy, rng: np.random.Generator, **warp_options) -> Anatomy:
  """One random subject: the anatomy warped by `random_warp_coordinates`."""
  coords = random_warp_coordinates(rng, anatomy.t1.shape, **warp_options)
  gm, wm, mask = (warp(v, coords, order=1) for v in (anatomy.gm, anatomy.wm, anatomy.mask))
  csf = np.clip(mask - gm - wm, 0.0, 1.0)
  return Anatomy(warp(anatomy.t1, coords, order=1), csf, gm, wm, mask,
                 warp(anatomy.label, coords, order=0), anatomy.affine)


# Relative T1 tissue intensities of BrainWeb (brainweb package constants: CSF 48, GM 106,
# WM 154), divided by WM.
T1_TISSUE_MEANS = {"csf": 48 / 154, "gm": 106 / 154, "wm": 1.0}


def rerender(subject: Anatomy, rng: np.random.Generator, *, mean_jitter: float = 0.08,
             texture_sd: float = 0.03) -> Anatomy:
  """SynthSeg-style re-rendering (Billot et al., MedIA 2023): intensity = Σ_k p_k·μ_k with
  per-subject tissue means μ_k jittered by ±mean_jitter around BrainWeb's T1 contrasts, plus a
  smooth multiplicative texture. Labels are unchanged."""
  means = {k: v * (1 + rng.uniform(-mean_jitter, mean_jitter)) for k, v in T1_TISSUE_MEANS.items()}
  image = subject.csf * means["csf"] + subject.gm * means["gm"] + subject.wm * means["wm"]
  texture = ndimage.gaussian_filter(rng.normal(0, 1, subject.t1.shape), 1.0)
  texture *= texture_sd / max(texture.std(), 1e-8)
  image = np.clip(image * (1 + texture), 0, 1).astype(np.float32)
  return dataclasses.replace(subject, t1=image)
