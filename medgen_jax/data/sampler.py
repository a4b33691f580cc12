"""Slice cache and batch samplers: domain-balanced, deterministic, resumable.

Volumes are preprocessed once into a per-site slice cache `[N, H, W]` (float16 or float32).
A batch is a pure function of `(seed, step)`: the step's generator is
`np.random.default_rng([seed, step])`, so restoring a sampler is restoring its step, and the
batches after a restart are exactly those of an uninterrupted run.

Batches hold `image [B, H, W, C]` float32, `label [B, H, W]` int32 and `domain [B]` int32.
Sites are interleaved (A, B, C, A, B, C, ...), so any contiguous chunk whose size is a multiple
of the number of sites is itself domain-balanced: `parallel.shard_batch` relies on that to give
every device a balanced share.

Unsupervised domain adaptation: a cache built with `labelled=False` (the target sites'
adaptation cases) holds images only (`SiteSlices.labels is None`; the cases' label arrays are
never read). `SourceTargetSampler` draws labelled source slices from the training cache and
unlabelled target slices from the adaptation cache, `{"source": {image, label, domain}, "target": {image, domain}}`;
the labelled samplers refuse a label-free site.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from medgen_jax.data.errors import DataError
from medgen_jax.data.preprocess import context_offsets, preprocess_case
from medgen_jax.parallel import block_rows

SLICE_SELECTIONS = ("foreground", "all")
UNLABELLED_SLICE_SELECTIONS = ("nonempty", "all")  # label-free caches: no 'foreground' without labels


@dataclasses.dataclass
class SiteSlices:
  """All slices of one site's cases, stacked: slice i belongs to volume `case_index[i]`,
  whose slices are `first[i] .. last[i]` (for clamping 2.5-D context at volume ends)."""

  images: np.ndarray     # [N, H, W] cache dtype
  labels: np.ndarray | None  # [N, H, W] uint8; None for unlabelled (adaptation) data
  first: np.ndarray      # [N] int64
  last: np.ndarray       # [N] int64
  eligible: np.ndarray   # indices that may be drawn as centre slices
  case_ids: list[str]
  case_index: np.ndarray  # [N] int64


@dataclasses.dataclass
class SliceCache:
  sites: dict[str, SiteSlices]
  domain_ids: dict[str, int]
  context_slices: int = 1

  def is_labelled(self, site: str) -> bool:
    return self.sites[site].labels is not None

  def gather_images(self, site: str, indices: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """image [n, H, W, C] float32 for centre slices `indices` (never reads a label), written
    into `out` when given (any float32 [n, H, W, C] array or view, e.g. every n-th row of a
    batch) and returned.

    Slice by slice into the destination: each cached slice is read and converted once, with no
    temporary [n, ...] copies (fancy indexing, then astype, then the batch assignment were three
    full copies: ~2x slower at 256x256, benchmarks/data_pipeline.py)."""
    s = self.sites[site]
    if out is None:
      out = np.empty((len(indices),) + s.images.shape[1:] + (self.context_slices,), np.float32)
    if self.context_slices == 1:
      for k, i in enumerate(indices):
        out[k, :, :, 0] = s.images[i]
    else:
      neighbours = indices[:, None] + context_offsets(self.context_slices)[None, :]
      neighbours = np.clip(neighbours, s.first[indices, None], s.last[indices, None])
      for k, row in enumerate(neighbours):
        for c, i in enumerate(row):
          out[k, :, :, c] = s.images[i]
    return out

  def gather(self, site: str, indices: np.ndarray, *, out: tuple[np.ndarray, np.ndarray] | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """(image [n, H, W, C] float32, label [n, H, W] int32) for centre slices `indices`, written
    into `out = (image, label)` when given (see gather_images)."""
    s = self.sites[site]
    if s.labels is None:
      raise _unlabelled_error([site])
    if out is None:
      out = (None, np.empty((len(indices),) + s.labels.shape[1:], np.int32))
    image = self.gather_images(site, indices, out=out[0])
    label = out[1]
    for k, i in enumerate(indices):
      label[k] = s.labels[i]
    return image, label


def _unlabelled_error(sites: Sequence[str]) -> DataError:
  return DataError.single(
      f"site(s) {list(sites)}", "are unlabelled adaptation (target) data: their labels are never "
      "loaded, so no labelled batch can be drawn from them",
      "draw them as targets of a SourceTargetSampler, or make them sources (data.sites, not data.held_out)")


def build_slice_cache(cases_by_site: Mapping[str, Sequence], *, normalizer, in_plane_shape,
                      domain_ids: Mapping[str, int], in_plane_spacing=None, context_slices: int = 1,
                      cache_dtype: str = "float32", slices: str = "foreground",
                      bias_correction: str = "none", bias_options=None,
                      labelled: bool = True) -> SliceCache:
  """Preprocesses every case once (see preprocess.preprocess_case, with the case's site, the key
  it is listed under, for per-site normalizers) and stacks its axial slices.

  `slices='foreground'` draws only slices holding some label > 0 (the prostate code samples
  within the gland's extent); 'all' draws every slice. Context neighbours may be any slice.

  `labelled=False` (unsupervised-adaptation target data) builds an image-only cache: no case's
  `label` attribute is ever read (the image goes through the same preprocess_case with a zero
  stand-in label, so it is preprocessed exactly as a labelled case's), `SiteSlices.labels` is
  None, and `slices` is 'nonempty' (every slice whose preprocessed image is not constant, i.e.
  not a blank slice; 'foreground' would need labels) or 'all'.
  """
  selections = SLICE_SELECTIONS if labelled else UNLABELLED_SLICE_SELECTIONS
  if slices not in selections:
    why = "needs labels, which unlabelled data does not have" if slices in SLICE_SELECTIONS \
        else "unknown slice selection"
    raise DataError.single(f"data.slices={slices!r}", why, f"use one of {', '.join(selections)}")
  if cache_dtype not in ("float16", "float32"):
    raise DataError.single(f"data.cache_dtype={cache_dtype!r}", "unsupported cache dtype",
                           "use float16 (half the memory) or float32")
  context_offsets(context_slices)  # validates
  out = {}
  for site, cases in cases_by_site.items():
    images, labels, first, last, case_index = [], [], [], [], []
    offset = 0
    for k, case in enumerate(cases):
      # Unlabelled: a zero stand-in (read-only, no memory) instead of `case.label`, never read.
      label_in = case.label if labelled else np.broadcast_to(np.uint8(0), np.shape(case.image))
      image, label = preprocess_case(case.image, label_in, case.spacing, normalizer=normalizer,
                                     in_plane_shape=in_plane_shape, in_plane_spacing=in_plane_spacing,
                                     bias_correction=bias_correction, bias_options=bias_options,
                                     site=site)
      depth = image.shape[2]
      # Slice-major and C-contiguous: each cached slice is one block of memory. (moveaxis alone
      # kept the volume's layout, slices interleaved pixel by pixel: reading one slice touched
      # the whole cache, 10x slower batches at 256x256.)
      images.append(np.ascontiguousarray(np.moveaxis(image, 2, 0), dtype=cache_dtype))
      if labelled:
        labels.append(np.ascontiguousarray(np.moveaxis(label, 2, 0)))
      first.append(np.full(depth, offset))
      last.append(np.full(depth, offset + depth - 1))
      case_index.append(np.full(depth, k))
      offset += depth
    images_arr = np.concatenate(images)
    labels_arr = np.concatenate(labels) if labelled else None
    if slices == "foreground":
      eligible = np.flatnonzero(labels_arr.reshape(len(labels_arr), -1).max(axis=1) > 0)
    elif slices == "nonempty":
      flat = images_arr.reshape(len(images_arr), -1)
      eligible = np.flatnonzero(flat.max(axis=1) > flat.min(axis=1))
    else:
      eligible = np.arange(len(images_arr))
    if len(eligible) == 0:
      what = "has no slice with a foreground label to sample" if labelled else \
          "has no non-blank slice to sample (every slice is constant)"
      fix = "check its labels, or set data.slices='all'" if labelled else "check its images"
      raise DataError.single(f"site {site}", what, fix)
    out[site] = SiteSlices(images_arr, labels_arr, np.concatenate(first),
                           np.concatenate(last), eligible, [c.case_id for c in cases],
                           np.concatenate(case_index))
  return SliceCache(out, dict(domain_ids), context_slices)


def _balanced_batch(cache: SliceCache, sites: Sequence[str], per_site: int,
                    rng: np.random.Generator, *, labels: bool = True,
                    domain_ids: Mapping[str, int] | None = None,
                    block: tuple[int, int] = (0, 1)) -> dict[str, np.ndarray]:
  """`per_site` random slices from each site, interleaved A, B, C, A, B, C, ...
  `labels=False`: {'image', 'domain'} only, and no label is read. `domain` = `domain_ids[site]`
  (default: the cache's dataset-wide ids). `block=(p, P)`: only rows of block p of P of that
  batch are gathered (the random draws are the same), what process p of P keeps."""
  domain_ids = cache.domain_ids if domain_ids is None else domain_ids
  n = len(sites)
  start, stop = block_rows(per_site * n, block)
  first = cache.sites[sites[0]]
  h, w = first.images.shape[1:]
  image = np.empty((stop - start, h, w, cache.context_slices), np.float32)
  label = np.empty((stop - start, h, w), np.int32) if labels else None
  domain = np.empty((stop - start,), np.int32)
  for j, site in enumerate(sites):
    eligible = cache.sites[site].eligible
    idx = eligible[rng.integers(0, len(eligible), size=per_site)]
    # global rows j, j + n, j + 2n, ... of this site that fall in [start, stop)
    k0 = max(0, -(-(start - j) // n))
    k1 = max(k0, -(-(stop - j) // n))
    first_row = j + n * k0 - start
    idx = idx[k0:k1]
    if labels:
      cache.gather(site, idx, out=(image[first_row::n], label[first_row::n]))
    else:
      cache.gather_images(site, idx, out=image[first_row::n])
    domain[first_row::n] = domain_ids[site]
  if not labels:
    return {"image": image, "domain": domain}
  return {"image": image, "label": label, "domain": domain}


class _Resumable:
  """Deterministic in (seed, step); `state_dict`/`load_state_dict` save and restore the step."""

  def __init__(self, seed: int, step: int = 0):
    self.seed = int(seed)
    self.step = int(step)

  def __iter__(self):
    return self

  def __next__(self):
    batch = self.batch_at(self.step)
    self.step += 1
    return batch

  def batch_at(self, step: int, *, block: tuple[int, int] = (0, 1)):
    """The batch of `step`; with `block=(p, P)` only block p of P of each of its arrays (the
    same rows as parallel.process_rows of the whole batch, without assembling the others)."""
    raise NotImplementedError

  def _rng(self, step: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, int(step)])

  def state_dict(self) -> dict:
    return {"seed": self.seed, "step": self.step}

  def load_state_dict(self, state: Mapping) -> None:
    if int(state["seed"]) != self.seed:
      raise ValueError(f"sampler state has seed {state['seed']} but this sampler uses {self.seed}; "
                       "resume with the same config (data seed) as the saved run")
    self.step = int(state["step"])


def _check_sites(cache: SliceCache, sites: Sequence[str], *, labelled: bool = True) -> list[str]:
  missing = [s for s in sites if s not in cache.sites]
  if missing or not sites:
    raise DataError.single(f"sampler sites {list(sites)}", f"site(s) {missing} are not in the cache",
                           f"use sites from {sorted(cache.sites)}")
  unlabelled = [s for s in sites if not cache.is_labelled(s)]
  if labelled and unlabelled:
    raise _unlabelled_error(unlabelled)
  return list(sites)


def _per_site(batch_size: int, sites: Sequence[str], *, key: str, role: str) -> int:
  if batch_size < 1 or batch_size % len(sites):
    raise DataError.single(f"{key}={batch_size}",
                           f"is not a positive multiple of the {len(sites)} {role} sites",
                           f"use a multiple of {len(sites)} so each batch is domain-balanced")
  return batch_size // len(sites)


class SliceSampler(_Resumable):
  """Domain-balanced 2-D slice batches: `batch_size / len(sites)` slices from each site.

  `domain[b]` is the index of the slice's site in `sites` (the model's training sites, the
  order of its domain-specific layers: methods/base.RunInfo.domains), not the dataset-wide id."""

  def __init__(self, cache: SliceCache, *, sites: Sequence[str], batch_size: int, seed: int,
               step: int = 0):
    super().__init__(seed, step)
    self.cache = cache
    self.sites = _check_sites(cache, sites)
    if batch_size % len(self.sites):
      raise DataError.single(f"batch_size={batch_size}",
                             f"is not a multiple of the {len(self.sites)} source sites",
                             f"use a multiple of {len(self.sites)} so each batch is domain-balanced")
    self.per_site = batch_size // len(self.sites)

  def batch_at(self, step: int, *, block: tuple[int, int] = (0, 1)) -> dict[str, np.ndarray]:
    return _balanced_batch(self.cache, self.sites, self.per_site, self._rng(step),
                           domain_ids={site: i for i, site in enumerate(self.sites)}, block=block)


class EpisodicSampler(_Resumable):
  """Per step, a random split of the source sites into meta-train and meta-test groups.

  Returns {'meta_train': batch, 'meta_test': batch}, each domain-balanced with
  `slices_per_domain` slices per site (MASF: 2 + 1 of 3 sites; SAML: 2 + 1 of 5, the other two
  sites unused that step).
  """

  def __init__(self, cache: SliceCache, *, sites: Sequence[str], meta_train_domains: int,
               meta_test_domains: int, slices_per_domain: int, seed: int, step: int = 0):
    super().__init__(seed, step)
    self.cache = cache
    self.sites = _check_sites(cache, sites)
    if meta_train_domains < 1 or meta_test_domains < 1 or \
        meta_train_domains + meta_test_domains > len(self.sites):
      raise DataError.single(
          f"meta_train_domains={meta_train_domains}, meta_test_domains={meta_test_domains}",
          f"need >= 1 each and at most {len(self.sites)} source sites in total",
          "lower the group sizes or add source sites")
    self.meta_train_domains = meta_train_domains
    self.meta_test_domains = meta_test_domains
    self.slices_per_domain = slices_per_domain

  def batch_at(self, step: int, *, block: tuple[int, int] = (0, 1)) -> dict[str, dict[str, np.ndarray]]:
    rng = self._rng(step)
    order = [self.sites[i] for i in rng.permutation(len(self.sites))]
    train_sites = order[: self.meta_train_domains]
    test_sites = order[self.meta_train_domains: self.meta_train_domains + self.meta_test_domains]
    return {"meta_train": _balanced_batch(self.cache, train_sites, self.slices_per_domain, rng, block=block),
            "meta_test": _balanced_batch(self.cache, test_sites, self.slices_per_domain, rng, block=block)}


class SourceTargetSampler(_Resumable):
  """Unsupervised domain adaptation: labelled source slices and unlabelled target slices.

  `batch_at(step)` -> {'source': {'image', 'label', 'domain'}, 'target': {'image', 'domain'}}:
  `batch_size / len(sources)` slices from each source site of `cache` and
  `target_batch_size / len(targets)` (default `batch_size`) from each target site of
  `adapt_cache`, each part interleaved by site like SliceSampler's, so `parallel.shard_batch`
  gives every device a balanced share of both when each part's size per device is a multiple of
  its number of sites. The target part never has a 'label' key and no target label is read
  (`adapt_cache` is built without labels by prepare_data(target_adaptation=True)).

  Both parts come from the step's one generator, source first: the source part equals
  SliceSampler(cache, sites=sources, batch_size=batch_size, seed=seed).batch_at(step), so a UDA
  run sees the same source stream as its source-only baseline.
  """

  def __init__(self, cache: SliceCache, adapt_cache: SliceCache | None, *, sources: Sequence[str],
               targets: Sequence[str], batch_size: int, target_batch_size: int | None = None,
               seed: int, step: int = 0):
    super().__init__(seed, step)
    if adapt_cache is None:
      raise DataError.single("data.target_adaptation", "there is no unlabelled target (adaptation) data",
                             "set data.target_adaptation=True and hold the target site(s) out "
                             "(data.held_out)")
    both = sorted(set(sources) & set(targets))
    if both:
      raise DataError.single(f"sites {both}", "cannot be both source and target",
                             "a site is either labelled source data or unlabelled target data")
    self.cache = cache
    self.adapt_cache = adapt_cache
    self.sources = _check_sites(cache, sources)
    self.targets = _check_sites(adapt_cache, targets, labelled=False)
    self.target_batch_size = batch_size if target_batch_size is None else int(target_batch_size)
    self.per_source = _per_site(batch_size, self.sources, key="batch_size", role="source")
    self.per_target = _per_site(self.target_batch_size, self.targets, key="target_batch_size",
                                role="target")

  def batch_at(self, step: int, *, block: tuple[int, int] = (0, 1)) -> dict[str, dict[str, np.ndarray]]:
    rng = self._rng(step)
    return {"source": _balanced_batch(self.cache, self.sources, self.per_source, rng, block=block),
            "target": _balanced_batch(self.adapt_cache, self.targets, self.per_target, rng,
                                      labels=False, block=block)}
