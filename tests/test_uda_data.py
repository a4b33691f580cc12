"""Unsupervised domain adaptation data: target split, label-free adaptation cache, source+target
sampler, and the guarantee that no target label ever reaches a training batch."""

import dataclasses
import json

import jax
import nibabel as nib
import numpy as np
import pytest

from helpers import make_sites_dataset
from medgen_jax import parallel
from medgen_jax.data import pipeline
from medgen_jax.data.errors import DataError
from medgen_jax.data.pipeline import default_data_config, prepare_data
from medgen_jax.data.sampler import (EpisodicSampler, SiteSlices, SliceCache, SliceSampler,
                                     SourceTargetSampler, build_slice_cache)
from medgen_jax.data.splits import make_splits, protocol_cases

SOURCES, TARGETS = ("A", "B"), ("C", "D")


class LabelGuard:
  """A Case whose `label` may not be touched: any access is recorded and raises."""

  touched: list = []

  def __init__(self, case):
    object.__setattr__(self, "_case", case)

  def __getattr__(self, name):
    if name == "label":
      LabelGuard.touched.append(self._case.key)
      raise AssertionError(f"target label of {self._case.key} was read")
    return getattr(self._case, name)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return make_sites_dataset(tmp_path_factory.mktemp("uda") / "ds", sites=SOURCES + TARGETS, cases=5)


def uda_config(root, **changes):
  config = default_data_config()
  config.root = str(root)
  config.held_out = TARGETS
  config.in_plane_shape = (16, 8)
  config.target_adaptation = True
  for key, value in changes.items():
    config[key] = value
  return config


@pytest.fixture(scope="module")
def guarded(root):
  """prepare_data(target_adaptation=True) on data whose target cases refuse label access."""
  real = pipeline.load_dataset

  def load_with_guarded_targets(*args, **kwargs):
    info, cases_by_site = real(*args, **kwargs)
    return info, {site: [LabelGuard(c) for c in cases] if site in TARGETS else cases
                  for site, cases in cases_by_site.items()}

  LabelGuard.touched.clear()
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(pipeline, "load_dataset", load_with_guarded_targets)
    data = prepare_data(uda_config(root, context_slices=3), progress=None)
  return data


def test_protocol_splits_targets_into_adapt_and_test():
  ids = {s: [f"{s}{i}" for i in range(7)] for s in "ABCD"}
  splits = make_splits(ids, seed=3)
  uda = protocol_cases(splits, sources=["A", "B"], held_out=["C", "D"], target_adaptation=True)
  dg = protocol_cases(splits, sources=["A", "B"], held_out=["C", "D"])
  for t in "CD":
    assert not set(uda["adapt"][t]) & set(uda["test"][t])                       # disjoint
    assert sorted(uda["adapt"][t] + uda["test"][t]) == sorted(ids[t])          # covering
    assert sorted(uda["adapt"][t]) == sorted(splits[t]["train"] + splits[t]["val"])
    assert t not in uda["train"] and t not in uda["val"]                       # no target labels
    assert dg["test"][t] == sorted(ids[t])                                     # DG unchanged
  assert dg["adapt"] == {}
  for name in ("train", "val"):
    assert uda[name] == dg[name]
  # The target's test cases are those a run with the target as a source tests in-domain.
  supervised = protocol_cases(splits, sources=list("ABCD"))
  for t in "CD":
    assert uda["test"][t] == supervised["test"][t]


def test_prepare_data_never_reads_target_labels(guarded):
  data = guarded
  assert data.sources == list(SOURCES) and data.held_out == list(TARGETS)
  assert sorted(data.adapt.sites) == list(TARGETS) and sorted(data.train.sites) == list(SOURCES)
  for t in TARGETS:
    s = data.adapt.sites[t]
    assert s.labels is None                      # the adaptation cache holds images only
    assert len(s.eligible) == len(s.images) == 6 * len(data.cases["adapt"][t])
    assert len(data.cases["adapt"][t]) == 4 and len(data.cases["test"][t]) == 1
    assert t not in data.cases["train"] and t not in data.cases["val"]
  sampler = SourceTargetSampler(data.train, data.adapt, sources=data.sources, targets=data.held_out,
                                batch_size=4, target_batch_size=6, seed=0)
  for _ in range(3):
    batch = next(sampler)
    assert set(batch) == {"source", "target"}
    assert set(batch["target"]) == {"image", "domain"}      # never a label
    assert batch["source"]["image"].shape == (4, 16, 8, 3)
    assert batch["source"]["label"].shape == (4, 16, 8) and batch["source"]["label"].dtype == np.int32
    assert batch["target"]["image"].shape == (6, 16, 8, 3)
    assert batch["target"]["image"].dtype == np.float32
    np.testing.assert_array_equal(batch["source"]["domain"], np.tile([0, 1], 2))
    np.testing.assert_array_equal(batch["target"]["domain"], np.tile([2, 3], 3))
  assert LabelGuard.touched == []                 # no target case's label attribute was ever read
  # The guard works: a labelled cache of the same cases trips it.
  with pytest.raises(AssertionError, match="target label of C/"):
    build_slice_cache({"C": data.cases["adapt"]["C"]}, normalizer=data.normalizer,
                      in_plane_shape=(16, 8), domain_ids=data.domain_ids, slices="all")
  LabelGuard.touched.clear()


def test_target_images_are_normalized_like_source_ones(root, guarded):
  """Same normalizer, same grid: a target case's cached slices equal those the same case would
  have as a (labelled) source."""
  plain = prepare_data(uda_config(root, context_slices=3, held_out=(), target_adaptation=False),
                       progress=None, build_train=False)
  case = guarded.cases["adapt"]["C"][0]._case
  reference = build_slice_cache({"C": [case]}, normalizer=guarded.normalizer, in_plane_shape=(16, 8),
                                domain_ids=guarded.domain_ids, slices="all")
  np.testing.assert_array_equal(guarded.adapt.sites["C"].images[:6], reference.sites["C"].images)
  # ... and the target's test cases are the in-domain test cases of a run with C as a source.
  for t in TARGETS:
    assert guarded.protocol["test"][t] == plain.protocol["test"][t]
  assert plain.adapt is None and plain.cases["adapt"] == {}


DOMAINS = {s: i for i, s in enumerate(SOURCES + TARGETS)}


def _toy(sites, depth=4, labelled=True):
  """Slice value = 1000 * domain + slice index: tests read back where a slice came from."""
  out = {}
  for s in sites:
    d = DOMAINS[s]
    images = np.stack([np.full((2, 3), 1000 * d + i, np.float32) for i in range(2 * depth)])
    labels = np.ones((2 * depth, 2, 3), np.uint8) if labelled else None
    first = np.repeat([0, depth], depth)
    out[s] = SiteSlices(images, labels, first, first + depth - 1, np.arange(2 * depth), ["v0", "v1"],
                        np.repeat([0, 1], depth))
  return out


def _caches():
  return SliceCache(_toy(SOURCES), DOMAINS), SliceCache(_toy(TARGETS, labelled=False), DOMAINS)


def test_source_target_sampler_is_deterministic_and_resumable():
  cache, adapt = _caches()
  make = lambda: SourceTargetSampler(cache, adapt, sources=SOURCES, targets=TARGETS, batch_size=4,
                                     seed=5)
  straight = make()
  reference = [next(straight) for _ in range(6)]
  assert reference[0]["target"]["image"].shape[0] == 4     # target_batch_size defaults to batch_size
  first = make()
  for _ in range(2):
    next(first)
  state = json.loads(json.dumps(first.state_dict()))
  resumed = make()
  resumed.load_state_dict(state)
  for expected in reference[2:]:
    got = next(resumed)
    for part in expected:
      for key in expected[part]:
        np.testing.assert_array_equal(got[part][key], expected[part][key])
  np.testing.assert_array_equal(make().batch_at(4)["target"]["image"], reference[4]["target"]["image"])
  assert not np.array_equal(reference[0]["target"]["image"], reference[1]["target"]["image"])
  # The source part is the source-only baseline's batch (same seed and step).
  baseline = SliceSampler(cache, sites=SOURCES, batch_size=4, seed=5)
  for key in ("image", "label", "domain"):
    np.testing.assert_array_equal(baseline.batch_at(3)[key], reference[3]["source"][key])
  # Each target slice comes from its own site (values 1000 * domain + i).
  t = reference[0]["target"]
  np.testing.assert_array_equal(t["image"][:, 0, 0, 0] // 1000, t["domain"])


def test_source_target_sampler_errors():
  cache, adapt = _caches()
  kw = dict(sources=SOURCES, targets=TARGETS, seed=0)
  with pytest.raises(DataError, match="batch_size=3: is not a positive multiple of the 2 source"):
    SourceTargetSampler(cache, adapt, batch_size=3, **kw)
  with pytest.raises(DataError, match="target_batch_size=5: is not a positive multiple of the 2 target"):
    SourceTargetSampler(cache, adapt, batch_size=4, target_batch_size=5, **kw)
  with pytest.raises(DataError, match="target_adaptation=True"):
    SourceTargetSampler(cache, None, batch_size=4, **kw)
  # A label-free site can never feed a labelled batch.
  for make in (lambda: SliceSampler(adapt, sites=TARGETS, batch_size=2, seed=0),
               lambda: EpisodicSampler(adapt, sites=TARGETS, meta_train_domains=1, meta_test_domains=1,
                                       slices_per_domain=1, seed=0),
               lambda: SourceTargetSampler(adapt, adapt, sources=["C"], targets=["D"], batch_size=2,
                                           seed=0),
               lambda: adapt.gather("C", np.array([0]))):
    with pytest.raises(DataError, match=r"\['C'.*unlabelled adaptation \(target\) data"):
      make()
  with pytest.raises(DataError, match="both source and target"):
    SourceTargetSampler(cache, SliceCache({**_toy(SOURCES), **_toy(TARGETS, labelled=False)}, {}),
                        sources=SOURCES, targets=["A", "C"], batch_size=2, seed=0)


def test_unlabelled_cache_refuses_foreground_slices_and_prepare_data_checks_targets(root):
  with pytest.raises(DataError, match="'foreground'.*needs labels"):
    build_slice_cache({}, normalizer=None, in_plane_shape=(4, 4), domain_ids={}, labelled=False)
  with pytest.raises(DataError, match="needs target sites"):
    prepare_data(uda_config(root, held_out=()), progress=None, build_train=False)
  with pytest.raises(DataError, match=r"target sites \['C', 'D'\]: have no test case"):
    prepare_data(uda_config(root, split={"val_fraction": 0.2, "test_fraction": 0.0, "seed": 0}),
                 progress=None, build_train=False)


@pytest.mark.parametrize("devices", [2, 4])
def test_nested_source_target_batch_shards_balanced(devices):
  cache, adapt = _caches()
  sampler = SourceTargetSampler(cache, adapt, sources=SOURCES, targets=TARGETS, batch_size=8, seed=0)
  batch = next(sampler)
  sharded = parallel.shard_batch(batch, devices)
  per_device = 8 // devices
  assert sharded["source"]["image"].shape == (devices, per_device, 2, 3, 1)
  assert "label" not in sharded["target"]
  for d in range(devices):
    assert sorted(sharded["source"]["domain"][d].tolist()) == sorted([0, 1] * (per_device // 2))
    assert sorted(sharded["target"]["domain"][d].tolist()) == sorted([2, 3] * (per_device // 2))
  if jax.local_device_count() >= devices:  # DataParallel.put: the same split, on the devices
    put = parallel.DataParallel(lambda s, b, k: (s, {}), num_devices=devices).put(batch)
    np.testing.assert_array_equal(np.asarray(put["target"]["domain"]), sharded["target"]["domain"])
    assert len(put["target"]["image"].sharding.device_set) == devices


# --- site_range: per-site ranges fitted on each site's own training / adaptation images ----------


def site_range_config(root, **changes):
  config = uda_config(root, **changes)
  config.normalization.name = "site_range"
  return config


def _disk_range(root, site, case_ids):
  """min/max of the stored images (read with nibabel, independent of our loader)."""
  values = [np.asarray(nib.load(str(root / site / f"{cid}_image.nii.gz")).dataobj) for cid in case_ids]
  return float(min(v.min() for v in values)), float(max(v.max() for v in values))


@pytest.fixture(scope="module")
def site_range_data(root):
  return prepare_data(site_range_config(root), progress=None)


def test_site_range_fits_sources_on_train_and_targets_on_adapt_only(root, site_range_data):
  data = site_range_data
  splits = json.loads(json.dumps(data.splits))
  ranges = data.normalizer.site_ranges
  assert sorted(ranges) == sorted(SOURCES + TARGETS)
  for site in SOURCES:
    ids = splits[site]["train"]
    assert sorted(data.protocol["train"][site]) == sorted(ids)
    assert ranges[site] == pytest.approx(_disk_range(root, site, ids), abs=1e-4)
  # The check can tell: with its val/test cases some source site's range would differ.
  every = [f"case{j}" for j in range(5)]
  assert any(ranges[s] != pytest.approx(_disk_range(root, s, every), abs=1e-4) for s in SOURCES)
  for site in TARGETS:
    ids = splits[site]["train"] + splits[site]["val"]
    assert sorted(data.protocol["adapt"][site]) == sorted(ids)
    assert ranges[site] == pytest.approx(_disk_range(root, site, ids), abs=1e-4)
  for cache in (data.train, data.adapt):
    for site, s in cache.sites.items():
      assert s.images.min() >= -1.0 and s.images.max() <= 1.0, site
      assert s.images.min() == -1.0  # each site's own minimum (kept by the crop, or the padding)


def test_site_range_never_sees_target_test_volumes(root, site_range_data, monkeypatch):
  """Rescaling the target TEST volumes (and the sources' val/test ones) changes nothing;
  rescaling an adaptation volume does."""
  data = site_range_data
  test_keys = {f"{site}/{cid}" for site in TARGETS for cid in data.protocol["test"][site]}
  test_keys |= {f"{site}/{cid}" for site in SOURCES for split in ("val", "test")
                for cid in data.protocol[split][site]}
  adapt_keys = {f"C/{data.protocol['adapt']['C'][0]}"}
  real = pipeline.load_dataset

  def changed(keys):
    def load(*args, **kwargs):
      info, by_site = real(*args, **kwargs)
      return info, {site: [dataclasses.replace(c, image=c.image * 50.0 + 1e4) if c.key in keys else c
                           for c in cases] for site, cases in by_site.items()}
    return load

  monkeypatch.setattr(pipeline, "load_dataset", changed(test_keys))
  other = prepare_data(site_range_config(root), progress=None)
  for split, site in (("test", "C"), ("test", "A"), ("val", "B")):  # the change did happen
    assert other.cases[split][site][0].image.max() > 1e4 - 1000
  assert other.normalizer == data.normalizer
  for name in ("train", "adapt"):
    for site, s in getattr(data, name).sites.items():
      np.testing.assert_array_equal(getattr(other, name).sites[site].images, s.images)
  monkeypatch.setattr(pipeline, "load_dataset", changed(adapt_keys))
  moved = prepare_data(site_range_config(root), progress=None, build_train=False)
  assert moved.normalizer.site_ranges["C"] != data.normalizer.site_ranges["C"]
  assert {s: moved.normalizer.site_ranges[s] for s in "ABD"} == {
      s: data.normalizer.site_ranges[s] for s in "ABD"}


def test_site_range_refuses_held_out_sites_without_adaptation_data(root):
  with pytest.raises(DataError, match=r"site_range.*held-out site\(s\) \['C', 'D'\] have none.*"
                                      r"Fix: set data.target_adaptation=True.*'scaled'"):
    prepare_data(site_range_config(root, target_adaptation=False), progress=None, build_train=False)
  # Without held-out sites every site is fitted on its own training cases.
  data = prepare_data(site_range_config(root, held_out=(), target_adaptation=False), progress=None,
                      build_train=False)
  for site in SOURCES + TARGETS:
    assert data.normalizer.site_ranges[site] == pytest.approx(
        _disk_range(root, site, data.splits[site]["train"]), abs=1e-4)
