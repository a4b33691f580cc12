"""Per-volume preprocessing before slices are cached: bias field, in-plane grid, 2.5-D context.

Order (`preprocess_case`): bias-field correction -> intensity normalization -> in-plane
resampling to a target spacing (optional) -> centre crop / pad to the in-plane shape. Slices are
axial (`volume[:, :, k]` in RAS+). Each step is a pure function usable alone.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from medgen_jax.data.errors import DataError

BIAS_CORRECTIONS = ("none", "n4")


def n4_options(options: Mapping | None) -> dict:
  """The `data.n4` block (a dict or ConfigDict; None = defaults) as `n4_correct` keywords;
  an unknown key is a DataError naming it."""
  from medgen_jax.data.bias_field import N4_OPTIONS
  options = {} if options is None else {k: options[k] for k in options}
  unknown = sorted(set(options) - set(N4_OPTIONS))
  if unknown:
    raise DataError.single(f"data.n4.{unknown[0]}", "unknown N4 option", f"use only {', '.join(N4_OPTIONS)}")
  if "iterations" in options:
    options["iterations"] = tuple(options["iterations"])
  return options


def correct_bias_field(x: np.ndarray, *, method: str = "none", spacing: Sequence[float] | None = None,
                       options: Mapping | None = None) -> np.ndarray:
  """Bias-field (intensity non-uniformity) correction; applied before normalization.

  'none': x unchanged. 'n4': N4 (Tustison et al., IEEE TMI 29:1310, 2010) through SimpleITK,
  cached per volume (medgen_jax.data.bias_field.n4_correct); `spacing` is the voxel size (mm) and
  `options` the `data.n4` block (shrink_factor, iterations, convergence_threshold, mask, cache_dir).
  """
  if method == "none":
    return x
  if method == "n4":
    from medgen_jax.data.bias_field import n4_correct
    return n4_correct(x, spacing=spacing, **n4_options(options))
  raise DataError.single(f"data.bias_correction={method!r}", "unknown bias-field correction",
                         f"use one of {', '.join(BIAS_CORRECTIONS)}")


def resample_inplane(volume: np.ndarray, spacing: Sequence[float], target_spacing: Sequence[float],
                     *, order: int) -> np.ndarray:
  """Resamples axes 0 and 1 from `spacing` to `target_spacing` (mm); order 0 for labels."""
  factors = (spacing[0] / target_spacing[0], spacing[1] / target_spacing[1], 1.0)
  if np.allclose(factors, 1.0):
    return volume
  return ndimage.zoom(volume, factors, order=order, mode="nearest", grid_mode=True)


def crop_or_pad(volume: np.ndarray, shape: Sequence[int], *, pad_value: float = 0.0) -> np.ndarray:
  """Centre-crops or pads axes 0 and 1 to `shape` (odd remainders go to the high end)."""
  out = volume
  for axis, size in enumerate(shape):
    current = out.shape[axis]
    if current > size:
      start = (current - size) // 2
      out = np.take(out, np.arange(start, start + size), axis=axis)
    elif current < size:
      before = (size - current) // 2
      widths = [(0, 0)] * out.ndim
      widths[axis] = (before, size - current - before)
      out = np.pad(out, widths, constant_values=pad_value)
  return out


def context_offsets(context_slices: int) -> np.ndarray:
  """Offsets of the k adjacent slices used as channels (2.5-D input), k odd: [-k//2 .. k//2]."""
  if context_slices < 1 or context_slices % 2 == 0:
    raise DataError.single(f"data.context_slices={context_slices}", "must be a positive odd number",
                           "use 1 (2-D) or 3, 5, ... (2.5-D, centre slice labelled)")
  half = context_slices // 2
  return np.arange(-half, half + 1)


def preprocess_case(image: np.ndarray, label: np.ndarray, spacing: Sequence[float], *,
                    normalizer, in_plane_shape: Sequence[int],
                    in_plane_spacing: Sequence[float] | None = None,
                    bias_correction: str = "none", bias_options: Mapping | None = None,
                    site: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Returns (image, label) on the training grid: [H, W, Z] float32 and uint8. `site`: the
  volume's site, passed to the normalizer (needed by per-site ones such as 'site_range').
  `bias_options`: the options of `bias_correction` (the `data.n4` block for 'n4')."""
  image = correct_bias_field(image, method=bias_correction, spacing=spacing, options=bias_options)
  image = normalizer(image, site=site)
  if in_plane_spacing:
    image = resample_inplane(image, spacing, in_plane_spacing, order=1)
    label = resample_inplane(label, spacing, in_plane_spacing, order=0)
  background = float(image.min()) if image.size else 0.0
  return (crop_or_pad(image, in_plane_shape, pad_value=background).astype(np.float32),
          crop_or_pad(label, in_plane_shape, pad_value=0).astype(np.uint8))
