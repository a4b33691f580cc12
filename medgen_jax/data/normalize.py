"""Intensity normalization: one factory, `make_normalizer(name, **options)`, over pure functions.

MR intensities carry no fixed tissue meaning across scanners (Nyul & Udupa, MRM 1999), so every
volume is mapped to a common scale before training. The talk's prostate table (MS-Net, Liu et
al., TMI 2020) compares exactly these choices: none, histogram, scaled, whitening.

* `whitening`: z = (x - mu) / sigma, population standard deviation (ddof = 0), mu and sigma
  taken over a foreground mask when one is asked for, applied to the whole volume.
* `scaled`: x' = (clip(x, lo, hi) - lo) / (hi - lo), lo/hi = the `clip_percentiles` of x (min/max
  by default), so x' lies in [0, 1].
* `histogram`: Nyul standardization (Nyul, Udupa & Zhang, IEEE TMI 2000). Landmarks are the
  percentiles (1, 10, 20, ..., 90, 99) of each volume. Fitting (training sites only): each
  training volume's landmarks are mapped linearly so that its 1st/99th percentiles land on the
  ends s1/s2 of the standard range; the standard landmarks are their mean. Applying: the
  piecewise-linear map through (volume landmarks -> standard landmarks), extended linearly beyond
  the end landmarks with the slopes of the first and last segments (as torchio and
  intensity-normalization do). torchio's standard range is (0, 100); ours defaults to (0, 1) so
  the network sees the same scale as `scaled`.
* `site_range` (SIFA's intensity mapping, Chen et al., IEEE TMI 2020): one linear map per site
  (scanner / modality). Fitting: lo_s/hi_s = the `clip_percentiles` (default (0, 100): min/max)
  of the voxels (inside the foreground mask when one is asked for) of ALL the training volumes of
  site s pooled; applying to a volume of site s: out_lo + (clip(x, lo_s, hi_s) - lo_s) /
  (hi_s - lo_s) * (out_hi - out_lo), `output_range` (out_lo, out_hi) = (-1, 1) by default (the
  range of tanh-output image-translation GANs). A volume of a site the normalizer was not fitted
  on cannot be normalized (DataError): its range must come from that site's own training (or
  unlabelled adaptation) volumes, never from its test volumes.
* `none`: identity.

`whitening`, `scaled`, `histogram` and `none` ignore a volume's site; `site_range` needs it
(`fit(volumes, sites=...)`, `normalizer(x, site=...)`).

Foreground masks: `none` (whole volume), `nonzero` (x != 0, for skull-stripped data without
noise) or `otsu` (x above Otsu's threshold, robust to a noisy, offset background).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from medgen_jax.data.errors import DataError

NORMALIZERS = ("whitening", "scaled", "histogram", "site_range", "none")
PER_SITE_NORMALIZERS = ("site_range",)  # fitted per site: every volume needs its site
FOREGROUNDS = ("none", "nonzero", "otsu")
NYUL_PERCENTILES = (1.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 99.0)


def otsu_threshold(x: np.ndarray, *, bins: int = 256) -> float:
  """Threshold maximizing the between-class variance of a `bins`-bin histogram (Otsu 1979)."""
  hist, edges = np.histogram(x, bins=bins)
  centers = (edges[:-1] + edges[1:]) / 2
  w0 = np.cumsum(hist)
  w1 = w0[-1] - w0
  m0 = np.cumsum(hist * centers)
  mean0 = m0 / np.maximum(w0, 1)
  mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
  between = w0 * w1 * (mean0 - mean1) ** 2
  return float(centers[int(np.argmax(between[:-1]))])


def foreground_mask(x: np.ndarray, method: str) -> np.ndarray | None:
  if method == "none":
    return None
  if method == "nonzero":
    mask = x != 0
  elif method == "otsu":
    mask = x > otsu_threshold(x)
  else:
    raise ValueError(f"unknown foreground {method!r}; use one of {FOREGROUNDS}")
  return mask if mask.any() else None


def _select(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
  return x if mask is None else x[mask]


def whitening(x: np.ndarray, *, mask: np.ndarray | None = None, eps: float = 1e-8) -> np.ndarray:
  """(x - mean) / std over `mask` (population std), applied to every voxel."""
  values = _select(x, mask).astype(np.float64)
  return ((x - values.mean()) / max(values.std(), eps)).astype(np.float32)


def scaled(x: np.ndarray, *, mask: np.ndarray | None = None,
           clip_percentiles: Sequence[float] = (0.0, 100.0), eps: float = 1e-8) -> np.ndarray:
  """Min-max to [0, 1] between the `clip_percentiles` of x over `mask`, clipping outside."""
  lo, hi = np.percentile(_select(x, mask), clip_percentiles)
  return ((np.clip(x, lo, hi) - lo) / max(hi - lo, eps)).astype(np.float32)


def nyul_fit(volumes: Sequence[np.ndarray], *, masks: Sequence[np.ndarray | None] | None = None,
             percentiles: Sequence[float] = NYUL_PERCENTILES,
             standard_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
  """Standard landmarks: the mean over volumes of each volume's landmarks, mapped linearly so
  that its first/last landmark land on `standard_range`."""
  s1, s2 = standard_range
  masks = masks if masks is not None else [None] * len(volumes)
  mapped = []
  for x, m in zip(volumes, masks):
    p = np.percentile(_select(x, m), percentiles)
    mapped.append(s1 + (p - p[0]) / max(p[-1] - p[0], 1e-8) * (s2 - s1))
  return np.mean(mapped, axis=0)


def piecewise_linear(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
  """np.interp through (xp, fp), continued linearly beyond both ends (end-segment slopes)."""
  y = np.interp(x, xp, fp)
  lo_slope = (fp[1] - fp[0]) / max(xp[1] - xp[0], 1e-12)
  hi_slope = (fp[-1] - fp[-2]) / max(xp[-1] - xp[-2], 1e-12)
  y = np.where(x < xp[0], fp[0] + (x - xp[0]) * lo_slope, y)
  return np.where(x > xp[-1], fp[-1] + (x - xp[-1]) * hi_slope, y)


def nyul_apply(x: np.ndarray, standard_landmarks: np.ndarray, *, mask: np.ndarray | None = None,
               percentiles: Sequence[float] = NYUL_PERCENTILES) -> np.ndarray:
  """Maps x's own landmarks onto the standard landmarks, piecewise linearly."""
  p = np.percentile(_select(x, mask), percentiles)
  p = np.maximum.accumulate(p + np.arange(len(p)) * 1e-9)  # strictly increasing for flat volumes
  return piecewise_linear(x, p, np.asarray(standard_landmarks)).astype(np.float32)


def site_range_fit(volumes: Sequence[np.ndarray], sites: Sequence[str], *,
                   masks: Sequence[np.ndarray | None] | None = None,
                   clip_percentiles: Sequence[float] = (0.0, 100.0)) -> dict[str, tuple[float, float]]:
  """{site: (lo, hi)}: the `clip_percentiles` of the (masked) voxels of all of a site's volumes
  pooled. (0, 100) takes min/max volume by volume (no concatenation); other percentiles
  concatenate the site's masked voxels once."""
  masks = masks if masks is not None else [None] * len(volumes)
  by_site: dict[str, list[np.ndarray]] = {}
  for x, m, site in zip(volumes, masks, sites):
    by_site.setdefault(str(site), []).append(np.asarray(_select(np.asarray(x), m)).ravel())
  ranges = {}
  for site, values in sorted(by_site.items()):
    values = [v for v in values if v.size]
    if not values:
      raise DataError.single(f"site {site}", "has only empty training volumes: no intensity range "
                             "to fit", "check its images (or its foreground mask)")
    if tuple(clip_percentiles) == (0.0, 100.0):
      lo, hi = min(float(v.min()) for v in values), max(float(v.max()) for v in values)
    else:
      lo, hi = (float(p) for p in np.percentile(np.concatenate(values), clip_percentiles))
    ranges[site] = (lo, hi)
  return ranges


def site_range_apply(x: np.ndarray, lo: float, hi: float, *,
                     output_range: Sequence[float] = (-1.0, 1.0), eps: float = 1e-8) -> np.ndarray:
  """out_lo + (clip(x, lo, hi) - lo) / (hi - lo) * (out_hi - out_lo), as float32."""
  out_lo, out_hi = output_range
  unit = (np.clip(np.asarray(x, np.float64), lo, hi) - lo) / max(hi - lo, eps)
  return (out_lo + unit * (out_hi - out_lo)).astype(np.float32)


# Fields stored in normalizer.json only by the normalizers that use them, so that the files of
# the other normalizers stay byte-for-byte what they were before `site_range` existed.
_SITE_RANGE_FIELDS = ("output_range", "site_ranges")


@dataclasses.dataclass
class Normalizer:
  """A named normalization with its options and its fitted state: landmarks for `histogram`,
  per-site ranges for `site_range`.

  `fit(volumes, sites=...)` learns from the training volumes only (a no-op except for
  `histogram` and `site_range`; `sites`, the site of each volume, is needed by `site_range` and
  ignored by the others); `normalizer(x, site=...)` normalizes one volume (of that site).
  `to_dict`/`from_dict` store it with a run.
  """

  name: str
  foreground: str = "none"
  clip_percentiles: tuple[float, float] = (0.0, 100.0)
  percentiles: tuple[float, ...] = NYUL_PERCENTILES
  standard_range: tuple[float, float] = (0.0, 1.0)
  landmarks: tuple[float, ...] | None = None
  output_range: tuple[float, float] = (-1.0, 1.0)
  site_ranges: dict[str, tuple[float, float]] | None = None

  @property
  def per_site(self) -> bool:
    """True when every volume must be normalized with its site (`site_range`)."""
    return self.name in PER_SITE_NORMALIZERS

  def fit(self, volumes: Sequence[np.ndarray], *, sites: Sequence[str] | None = None) -> "Normalizer":
    if self.name == "site_range":
      return self._fit_site_range(volumes, sites)
    if self.name != "histogram":
      return self
    if not volumes:
      raise DataError.single("data.normalization", "histogram normalization needs training volumes",
                             "include at least one training case")
    landmarks = nyul_fit(volumes, masks=[foreground_mask(v, self.foreground) for v in volumes],
                         percentiles=self.percentiles, standard_range=self.standard_range)
    return dataclasses.replace(self, landmarks=tuple(float(v) for v in landmarks))

  def _fit_site_range(self, volumes, sites) -> "Normalizer":
    if not volumes:
      raise DataError.single("data.normalization", "site_range normalization needs training volumes",
                             "include at least one training case per site")
    if sites is None or len(sites) != len(volumes):
      raise ValueError(f"site_range fit needs the site of each of the {len(volumes)} volumes "
                       f"(sites=...), got {None if sites is None else len(sites)}")
    ranges = site_range_fit(volumes, sites, masks=[foreground_mask(v, self.foreground) for v in volumes],
                            clip_percentiles=self.clip_percentiles)
    return dataclasses.replace(self, site_ranges=ranges)

  def site_range_of(self, site: str | None) -> tuple[float, float]:
    """(lo, hi) fitted for `site`; DataError naming the fitted sites and the fix otherwise."""
    if self.site_ranges is None:
      raise RuntimeError("site_range normalizer used before fit(training_volumes, sites=...)")
    fitted = sorted(self.site_ranges)
    if site is None:
      raise DataError.single("site", f"'site_range' normalization maps each site with its own "
                             f"intensity range and was called without a site (fitted sites: {fitted})",
                             f"pass the volume's site, one of {fitted}")
    if str(site) not in self.site_ranges:
      raise DataError.single(f"site {site!r}", f"has no intensity range in this 'site_range' "
                             f"normalization (fitted sites: {fitted})",
                             f"give the volume's site if it is one of {fitted}; to normalize site "
                             f"{site!r} its range must be fitted on its own training or unlabelled "
                             "adaptation volumes (train with it as a source, or held out with "
                             "data.target_adaptation=True), or use a per-volume normalization such as "
                             "'scaled'")
    return self.site_ranges[str(site)]

  def __call__(self, x: np.ndarray, *, site: str | None = None) -> np.ndarray:
    if self.name == "site_range":
      lo, hi = self.site_range_of(site)
      return site_range_apply(x, lo, hi, output_range=self.output_range)
    mask = foreground_mask(x, self.foreground)
    if self.name == "whitening":
      return whitening(x, mask=mask)
    if self.name == "scaled":
      return scaled(x, mask=mask, clip_percentiles=self.clip_percentiles)
    if self.name == "histogram":
      if self.landmarks is None:
        raise RuntimeError("histogram normalizer used before fit(training_volumes)")
      return nyul_apply(x, np.asarray(self.landmarks), mask=mask, percentiles=self.percentiles)
    return np.asarray(x, dtype=np.float32)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    if self.name != "site_range":
      for key in _SITE_RANGE_FIELDS:
        del d[key]
    elif self.site_ranges is not None:
      d["site_ranges"] = {site: list(r) for site, r in self.site_ranges.items()}
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "Normalizer":
    d = dict(d)
    for key in ("clip_percentiles", "percentiles", "standard_range", "landmarks", "output_range"):
      if d.get(key) is not None:
        d[key] = tuple(d[key])
    if d.get("site_ranges") is not None:
      d["site_ranges"] = {str(site): (float(r[0]), float(r[1])) for site, r in d["site_ranges"].items()}
    return cls(**d)


_OPTIONS = {
    "whitening": {"foreground"},
    "scaled": {"foreground", "clip_percentiles"},
    "histogram": {"foreground", "percentiles", "standard_range"},
    "site_range": {"foreground", "clip_percentiles", "output_range"},
    "none": set(),
}


_SEQUENCE_OPTIONS = ("clip_percentiles", "percentiles", "standard_range", "output_range")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Normalizer) if f.name in
             {o for opts in _OPTIONS.values() for o in opts}}


def make_normalizer(name: str, **options) -> Normalizer:
  """The normalization factory.

  An option set to None or to its default value (e.g. the config's `foreground='none'`) is
  ignored, so one config block serves every normalizer; an option with any other value that
  `name` does not use is rejected (it would be silently ignored otherwise).

  Examples: `make_normalizer('scaled', clip_percentiles=(0.5, 99.5))`,
  `make_normalizer('site_range', output_range=(-1, 1))`.
  """
  if name not in NORMALIZERS:
    raise DataError.single(f"data.normalization.name={name!r}", "unknown normalization",
                           f"use one of {', '.join(NORMALIZERS)}")
  options = {k: v for k, v in options.items() if v is not None}
  for key in _SEQUENCE_OPTIONS:
    if key in options:
      try:
        options[key] = tuple(float(v) for v in options[key])
      except (TypeError, ValueError):
        raise DataError.single(f"data.normalization.{key}", f"{options[key]!r} is not a list of numbers",
                               f"write numbers, e.g. {key}={_DEFAULTS[key]}") from None
  options = {k: v for k, v in options.items() if not (k in _DEFAULTS and v == _DEFAULTS[k])}
  unknown = sorted(set(options) - _OPTIONS[name])
  if unknown:
    raise DataError.single(f"data.normalization.{unknown[0]}",
                           f"option not used by {name!r} (value {options[unknown[0]]!r})",
                           f"{name!r} takes {sorted(_OPTIONS[name]) or 'no options'}; "
                           f"unset {unknown[0]} or choose a normalization that uses it")
  for key in ("clip_percentiles", "output_range"):
    if name == "site_range" and key in options:
      pair = options[key]
      in_bounds = key != "clip_percentiles" or all(0.0 <= v <= 100.0 for v in pair)
      if len(pair) != 2 or not pair[0] < pair[1] or not in_bounds:
        raise DataError.single(f"data.normalization.{key}", f"{pair!r} is not an increasing pair"
                               + (" of percentiles in [0, 100]" if key == "clip_percentiles" else ""),
                               f"write two increasing numbers, e.g. {key}={_DEFAULTS[key]}")
  if options.get("foreground", "none") not in FOREGROUNDS:
    raise DataError.single("data.normalization.foreground", f"unknown value {options['foreground']!r}",
                           f"use one of {', '.join(FOREGROUNDS)}")
  return Normalizer(name=name, **options)
