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
* `none`: identity.

Foreground masks: `none` (whole volume), `nonzero` (x != 0, for skull-stripped data without
noise) or `otsu` (x above Otsu's threshold, robust to a noisy, offset background).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from medgen_jax.data.errors import DataError

NORMALIZERS = ("whitening", "scaled", "histogram", "none")
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


@dataclasses.dataclass
class Normalizer:
  """A named normalization with its options and, for `histogram`, its fitted landmarks.

  `fit(volumes)` learns from the training volumes only (a no-op except for `histogram`);
  calling it on a volume normalizes that volume. `to_dict`/`from_dict` store it with a run.
  """

  name: str
  foreground: str = "none"
  clip_percentiles: tuple[float, float] = (0.0, 100.0)
  percentiles: tuple[float, ...] = NYUL_PERCENTILES
  standard_range: tuple[float, float] = (0.0, 1.0)
  landmarks: tuple[float, ...] | None = None

  def fit(self, volumes: Sequence[np.ndarray]) -> "Normalizer":
    if self.name != "histogram":
      return self
    if not volumes:
      raise DataError.single("data.normalization", "histogram normalization needs training volumes",
                             "include at least one training case")
    landmarks = nyul_fit(volumes, masks=[foreground_mask(v, self.foreground) for v in volumes],
                         percentiles=self.percentiles, standard_range=self.standard_range)
    return dataclasses.replace(self, landmarks=tuple(float(v) for v in landmarks))

  def __call__(self, x: np.ndarray) -> np.ndarray:
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
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "Normalizer":
    d = dict(d)
    for key in ("clip_percentiles", "percentiles", "standard_range", "landmarks"):
      if d.get(key) is not None:
        d[key] = tuple(d[key])
    return cls(**d)


_OPTIONS = {
    "whitening": {"foreground"},
    "scaled": {"foreground", "clip_percentiles"},
    "histogram": {"foreground", "percentiles", "standard_range"},
    "none": set(),
}


_SEQUENCE_OPTIONS = ("clip_percentiles", "percentiles", "standard_range")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Normalizer) if f.name in
             {o for opts in _OPTIONS.values() for o in opts}}


def make_normalizer(name: str, **options) -> Normalizer:
  """The normalization factory.

  An option set to None or to its default value (e.g. the config's `foreground='none'`) is
  ignored, so one config block serves every normalizer; an option with any other value that
  `name` does not use is rejected (it would be silently ignored otherwise).

  Example: `make_normalizer('scaled', clip_percentiles=(0.5, 99.5))`.
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
  if options.get("foreground", "none") not in FOREGROUNDS:
    raise DataError.single("data.normalization.foreground", f"unknown value {options['foreground']!r}",
                           f"use one of {', '.join(FOREGROUNDS)}")
  return Normalizer(name=name, **options)
