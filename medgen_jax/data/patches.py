"""3-D patch batches: whole normalized volumes in memory, domain-balanced, deterministic, resumable.

For 3-D models (models/unet3d.py). Each case is preprocessed exactly as for the 2-D slice cache
(preprocess.preprocess_case: bias field, normalization, optional in-plane resampling and
crop/pad) and kept whole as `image [D, H, W, C]` (D = the slice axis, Z in RAS+; C = 1) and
`label [D, H, W]`. The through-plane spacing stays the data's own, so thick-slice data gives
anisotropic volumes, for anisotropic patch sizes and pooling (models/unet3d.plan_pooling).

`PatchSampler.batch_at(step)` is a pure function of (seed, step), like the slice samplers
(data/sampler.py: the step's generator is `np.random.default_rng([seed, step])`, so restoring
the step restores the stream). Batches hold `image [B, *patch, C]` float32, `label [B, *patch]`
int32 and `domain [B]` int32 (the site's index in `sites`), sites interleaved A, B, C, A, ...
as SliceSampler's, each sample from a uniformly drawn volume of its site.

Foreground oversampling is nnU-Net's (Isensee et al., Nat. Methods 2021; nnunetv2
training/dataloading/data_loader*.py): sample `b` of a batch of `B` is forced to contain
foreground when `b >= round(B · (1 − oversample_foreground))` (`get_do_oversample`, default
0.33: the last third). Patch placement (`get_bbox`, without nnU-Net's extra border for spatial
augmentation, which here works on the patch itself): with `need = max(patch − shape, 0)` per
axis, the lower corner may range over [−⌈need/2⌉, shape + ⌊need/2⌋ + need mod 2 − patch]; a
random patch draws it uniformly there; a forced one picks a random foreground class present in
the volume, a random voxel of that class (from at most `max_locations` stored per class, a
fixed-seed subsample as nnU-Net's class locations), and puts the corner at
max(lower bound, voxel − ⌊patch/2⌋), so the voxel is inside the patch. A volume without any
foreground falls back to a random patch (as nnU-Net). Whatever lies outside the volume is
zero-padded (image 0, label 0 = background).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from medgen_jax.data.errors import DataError
from medgen_jax.data.preprocess import preprocess_case
from medgen_jax.data.sampler import _per_site, _Resumable
from medgen_jax.parallel import block_rows

OVERSAMPLE_FOREGROUND = 0.33   # nnU-Net's oversample_foreground_percent


@dataclasses.dataclass
class PatchVolume:
  """One preprocessed case, whole: image [D, H, W, C], label [D, H, W] uint8, and per foreground
  class the voxel coordinates [n, 3] (at most `max_locations`) forced patches are centred on."""

  image: np.ndarray
  label: np.ndarray
  case_id: str
  spacing: tuple[float, float, float]          # (D, H, W) in mm, after in-plane resampling
  locations: dict[int, np.ndarray]


@dataclasses.dataclass
class VolumeSet:
  sites: dict[str, list[PatchVolume]]
  domain_ids: dict[str, int]

  def median_spacing(self) -> tuple[float, ...]:
    """Per-axis median voxel spacing (D, H, W) over every volume (nnU-Net plans on it)."""
    return tuple(float(s) for s in np.median([v.spacing for vs in self.sites.values() for v in vs], axis=0))


def foreground_locations(label: np.ndarray, *, max_locations: int = 10_000, seed: int = 1234) -> dict[int, np.ndarray]:
  """{class c > 0: int32 [n, ndim] coordinates of voxels labelled c}, at most `max_locations`
  per class (a subsample drawn with `seed`, fixed so the stored set does not depend on the run)."""
  rng = np.random.default_rng(seed)
  out = {}
  for c in np.unique(label):
    if c <= 0:
      continue
    coords = np.argwhere(label == c)
    if len(coords) > max_locations:
      coords = coords[np.sort(rng.choice(len(coords), max_locations, replace=False))]
    out[int(c)] = coords.astype(np.int32)
  return out


def make_volume(image: np.ndarray, label: np.ndarray, *, case_id: str = "", spacing=(1.0, 1.0, 1.0),
                max_locations: int = 10_000) -> PatchVolume:
  """A PatchVolume from image [D, H, W, C] (or [D, H, W]: one channel) and label [D, H, W]."""
  image = np.asarray(image)
  if image.ndim == 3:
    image = image[..., None]
  label = np.asarray(label)
  if image.shape[:-1] != label.shape or label.ndim != 3:
    raise DataError.single(f"case {case_id!r}", f"image {image.shape} and label {label.shape} are not "
                           "[D, H, W, C] and [D, H, W] of one grid", "pass volumes of the same grid")
  return PatchVolume(image, label.astype(np.uint8), case_id, tuple(float(s) for s in spacing),
                     foreground_locations(label, max_locations=max_locations))


def build_volumes(cases_by_site: Mapping[str, Sequence], *, normalizer, domain_ids: Mapping[str, int],
                  in_plane_spacing=None, in_plane_shape=(), bias_correction: str = "none",
                  bias_options=None, cache_dtype: str = "float32",
                  max_locations: int = 10_000) -> VolumeSet:
  """Every case (data/loading.Case, e.g. PreparedData.cases['train']) preprocessed once by
  preprocess.preprocess_case (with its site, for per-site normalizers) and kept whole as a
  PatchVolume [D = Z, H = X, W = Y, 1]. `in_plane_shape` () keeps each volume's in-plane size (no
  crop/pad); patches are cut from the volume anyway."""
  if cache_dtype not in ("float16", "float32"):
    raise DataError.single(f"data.cache_dtype={cache_dtype!r}", "unsupported cache dtype",
                           "use float16 (half the memory) or float32")
  sites = {}
  for site, cases in cases_by_site.items():
    volumes = []
    for case in cases:
      image, label = preprocess_case(case.image, case.label, case.spacing, normalizer=normalizer,
                                     in_plane_shape=tuple(in_plane_shape or ()),
                                     in_plane_spacing=in_plane_spacing, bias_correction=bias_correction,
                                     bias_options=bias_options, site=site)
      in_plane = tuple(in_plane_spacing) if in_plane_spacing else tuple(case.spacing[:2])
      volumes.append(make_volume(np.moveaxis(image, 2, 0).astype(cache_dtype), np.moveaxis(label, 2, 0),
                                 case_id=case.case_id, spacing=(case.spacing[2],) + in_plane,
                                 max_locations=max_locations))
    if not volumes:
      raise DataError.single(f"site {site}", "has no case to cut patches from", "give it training cases")
    sites[site] = volumes
  return VolumeSet(sites, dict(domain_ids))


def forced_foreground(batch_size: int, oversample_foreground: float = OVERSAMPLE_FOREGROUND) -> np.ndarray:
  """bool [B]: nnU-Net's get_do_oversample, sample b forced iff b >= round(B · (1 − percent))."""
  return np.arange(batch_size) >= round(batch_size * (1 - oversample_foreground))


def corner_bounds(shape: Sequence[int], patch_size: Sequence[int]) -> tuple[list[int], list[int]]:
  """(lowest, highest) lower corner per axis of a patch (nnU-Net's get_bbox bounds, no extra
  border): a patch larger than the volume covers it whole, centred (either way when the
  padding is odd)."""
  need = [max(p - s, 0) for s, p in zip(shape, patch_size)]
  lower = [-(n // 2) - (n % 2) for n in need]
  upper = [s + n // 2 + n % 2 - p for s, n, p in zip(shape, need, patch_size)]
  return lower, upper


def crop(array: np.ndarray, corner: Sequence[int], patch_size: Sequence[int]) -> np.ndarray:
  """array[corner : corner + patch] over the leading len(patch_size) axes, zero where the box
  leaves the array."""
  patch_size = tuple(int(p) for p in patch_size)
  out = np.zeros(patch_size + array.shape[len(patch_size):], array.dtype)
  src, dst = [], []
  for c, p, s in zip(corner, patch_size, array.shape):
    lo, hi = max(c, 0), min(c + p, s)
    if hi <= lo:
      return out
    src.append(slice(lo, hi))
    dst.append(slice(lo - c, hi - c))
  out[tuple(dst)] = array[tuple(src)]
  return out


def sample_corner(volume: PatchVolume, patch_size: Sequence[int], rng: np.random.Generator, *,
                  force_foreground: bool) -> list[int]:
  """The lower corner of one patch (module docstring: nnU-Net's get_bbox)."""
  lower, upper = corner_bounds(volume.label.shape, patch_size)
  if force_foreground and volume.locations:
    classes = sorted(volume.locations)
    coords = volume.locations[classes[rng.integers(len(classes))]]
    voxel = coords[rng.integers(len(coords))]
    return [max(lo, int(v) - p // 2) for lo, v, p in zip(lower, voxel, patch_size)]
  return [int(rng.integers(lo, hi + 1)) for lo, hi in zip(lower, upper)]


class PatchSampler(_Resumable):
  """Domain-balanced 3-D patch batches with nnU-Net's foreground oversampling (module docstring).
  `domain[b]` is the index of the patch's site in `sites`, as SliceSampler's."""

  def __init__(self, volumes: VolumeSet, *, sites: Sequence[str], batch_size: int,
               patch_size: Sequence[int], seed: int,
               oversample_foreground: float = OVERSAMPLE_FOREGROUND, step: int = 0):
    super().__init__(seed, step)
    missing = [s for s in sites if s not in volumes.sites]
    if missing or not sites:
      raise DataError.single(f"sampler sites {list(sites)}", f"site(s) {missing} have no volumes",
                             f"use sites from {sorted(volumes.sites)}")
    self.patch_size = tuple(int(p) for p in patch_size)
    channels = {v.image.shape[-1] for vs in volumes.sites.values() for v in vs}
    ndims = {v.label.ndim for vs in volumes.sites.values() for v in vs}
    if any(p < 1 for p in self.patch_size) or ndims != {len(self.patch_size)}:
      raise DataError.single(f"data.patch_size={tuple(patch_size)}",
                             f"needs {', '.join(map(str, sorted(ndims)))} positive sizes (D, H, W)",
                             "set one size per spatial axis of the volumes")
    if len(channels) != 1:
      raise DataError.single("volumes", f"have different channel counts {sorted(channels)}",
                             "give every volume the same channels")
    if not 0.0 <= oversample_foreground <= 1.0:
      raise DataError.single(f"oversample_foreground={oversample_foreground}", "is not a fraction",
                             "use a value in [0, 1] (nnU-Net: 0.33)")
    self.volumes = volumes
    self.sites = list(sites)
    self.channels = channels.pop()
    self.batch_size = int(batch_size)
    self.per_site = _per_site(self.batch_size, self.sites, key="batch_size", role="source")
    self.forced = forced_foreground(self.batch_size, oversample_foreground)

  def batch_at(self, step: int, *, block: tuple[int, int] = (0, 1)) -> dict[str, np.ndarray]:
    rng = self._rng(step)
    n = len(self.sites)
    start, stop = block_rows(self.batch_size, block)  # every draw is made; only these are cropped
    image = np.empty((stop - start,) + self.patch_size + (self.channels,), np.float32)
    label = np.empty((stop - start,) + self.patch_size, np.int32)
    domain = np.empty((stop - start,), np.int32)
    for b in range(self.batch_size):
      site = self.sites[b % n]
      site_volumes = self.volumes.sites[site]
      volume = site_volumes[rng.integers(len(site_volumes))]
      corner = sample_corner(volume, self.patch_size, rng, force_foreground=bool(self.forced[b]))
      if start <= b < stop:
        image[b - start] = crop(volume.image, corner, self.patch_size)
        label[b - start] = crop(volume.label, corner, self.patch_size)
        domain[b - start] = b % n
    return {"image": image, "label": label, "domain": domain}
