"""Splits (leakage), slice cache, domain-balanced and episodic samplers, resume, sharding."""

import json

import numpy as np
import pytest

from helpers import make_sites_dataset, toy_case, write_nii
from medgen_jax import parallel
from medgen_jax.data.errors import DataError
from medgen_jax.data.normalize import nyul_fit
from medgen_jax.data.pipeline import default_data_config, prepare_data
from medgen_jax.data.sampler import EpisodicSampler, SiteSlices, SliceCache, SliceSampler
from medgen_jax.data.splits import (check_splits, leave_one_site_out, load_splits, make_splits,
                                    protocol_cases, save_splits)


def test_make_splits_partition_each_site_deterministically():
  ids = {"A": [f"c{i}" for i in range(10)], "B": ["x", "y", "z"]}
  s = make_splits(ids, val_fraction=0.2, test_fraction=0.3, seed=1)
  assert s == make_splits(ids, val_fraction=0.2, test_fraction=0.3, seed=1)
  for site, by_split in s.items():
    members = sum(by_split.values(), [])
    assert sorted(members) == sorted(ids[site])  # a partition: nothing lost, nothing twice
  assert [len(s["A"][k]) for k in ("train", "val", "test")] == [5, 2, 3]
  assert [len(s["B"][k]) for k in ("train", "val", "test")] == [1, 1, 1]
  assert make_splits(ids, seed=2) != make_splits(ids, seed=1)


def test_leakage_is_an_error_naming_file_and_case(tmp_path):
  path = tmp_path / "splits.json"
  path.write_text(json.dumps({"version": 1, "sites": {"A": {"train": ["c1", "c2"], "test": ["c2"]}}}))
  with pytest.raises(DataError, match=r"splits.json: case A/c2 is in both 'train' and 'test'"):
    load_splits(path)
  with pytest.raises(DataError, match="leakage"):
    save_splits(tmp_path / "x.json", {"A": {"train": ["c"], "val": ["c"]}})
  assert not (tmp_path / "x.json").exists()


def test_split_file_round_trip(tmp_path):
  s = make_splits({"A": list("abcde")}, seed=0)
  save_splits(tmp_path / "s.json", s, seed=0)
  assert load_splits(tmp_path / "s.json") == s
  check_splits(s)


def test_leave_one_site_out_protocol():
  folds = leave_one_site_out(["A", "B", "C"])
  assert folds == [{"held_out": "A", "sources": ["B", "C"]}, {"held_out": "B", "sources": ["A", "C"]},
                   {"held_out": "C", "sources": ["A", "B"]}]
  splits = {s: {"train": [f"{s}1", f"{s}2"], "val": [f"{s}3"], "test": [f"{s}4"]} for s in "ABC"}
  p = protocol_cases(splits, sources=["B", "C"], held_out=["A"])
  assert p["train"] == {"B": ["B1", "B2"], "C": ["C1", "C2"]}
  assert p["test"]["A"] == ["A1", "A2", "A3", "A4"]  # every case of the unseen site
  assert "A" not in p["train"] and "A" not in p["val"]
  with pytest.raises(DataError, match="both source and held out"):
    protocol_cases(splits, sources=["A", "B"], held_out=["A"])


def _toy_cache(depths=(4, 3), sites=("A", "B", "C"), h=2, w=3):
  """Slice value = 100 * volume + slice-in-volume: lets tests read back which slice came out."""
  out = {}
  for s in sites:
    images, first, last = [], [], []
    offset = 0
    for v, d in enumerate(depths):
      for z in range(d):
        images.append(np.full((h, w), 100 * v + z, np.float32))
        first.append(offset)
        last.append(offset + d - 1)
      offset += d
    n = len(images)
    labels = np.ones((n, h, w), np.uint8)
    out[s] = SiteSlices(np.stack(images), labels, np.array(first), np.array(last), np.arange(n),
                        [f"v{v}" for v in range(len(depths))], np.repeat(np.arange(len(depths)), depths))
  return SliceCache(out, {s: i for i, s in enumerate(sites)})


def test_context_slices_are_neighbours_clamped_within_their_volume():
  cache = _toy_cache()
  cache.context_slices = 3
  image, _ = cache.gather("A", np.array([0, 2, 3, 4, 6]))
  got = image[:, 0, 0, :]
  np.testing.assert_array_equal(got, [[0, 0, 1], [1, 2, 3], [2, 3, 3], [100, 100, 101], [101, 102, 102]])


def test_batches_are_domain_balanced_and_interleaved():
  cache = _toy_cache()
  sampler = SliceSampler(cache, sites=["A", "B", "C"], batch_size=12, seed=0)
  for _ in range(5):
    batch = next(sampler)
    assert batch["image"].shape == (12, 2, 3, 1) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (12, 2, 3) and batch["label"].dtype == np.int32
    np.testing.assert_array_equal(batch["domain"], np.tile([0, 1, 2], 4))
  with pytest.raises(DataError, match="multiple of the 3 source sites"):
    SliceSampler(cache, sites=["A", "B", "C"], batch_size=10, seed=0)


def test_sharded_batch_is_balanced_on_every_device():
  sampler = SliceSampler(_toy_cache(), sites=["A", "B", "C"], batch_size=12, seed=0)
  sharded = parallel.shard_batch(next(sampler), 4)
  assert sharded["image"].shape == (4, 3, 2, 3, 1)
  for device in range(4):
    assert sorted(sharded["domain"][device].tolist()) == [0, 1, 2]
  with pytest.raises(ValueError, match="multiple of 5"):
    parallel.shard_batch(next(sampler), 5)


def test_sampler_resume_gives_the_uninterrupted_batches():
  cache = _toy_cache()
  straight = SliceSampler(cache, sites=["A", "C"], batch_size=4, seed=7)
  reference = [next(straight) for _ in range(8)]
  first = SliceSampler(cache, sites=["A", "C"], batch_size=4, seed=7)
  for _ in range(3):
    next(first)
  state = json.loads(json.dumps(first.state_dict()))  # as saved in a checkpoint
  resumed = SliceSampler(cache, sites=["A", "C"], batch_size=4, seed=7)
  resumed.load_state_dict(state)
  for expected in reference[3:]:
    got = next(resumed)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])
  with pytest.raises(ValueError, match="seed"):
    SliceSampler(cache, sites=["A"], batch_size=2, seed=8).load_state_dict(state)


def test_episodic_sampler_splits_sites_per_step():
  sites = ["A", "B", "C", "D", "E"]
  cache = _toy_cache(sites=tuple(sites))
  sampler = EpisodicSampler(cache, sites=sites, meta_train_domains=2, meta_test_domains=1,
                            slices_per_domain=3, seed=0)
  seen = set()
  for _ in range(20):
    ep = next(sampler)
    train, test = set(ep["meta_train"]["domain"].tolist()), set(ep["meta_test"]["domain"].tolist())
    assert len(train) == 2 and len(test) == 1 and not train & test
    assert ep["meta_train"]["image"].shape[0] == 6 and ep["meta_test"]["image"].shape[0] == 3
    seen.add(tuple(sorted(test)))
  assert len(seen) >= 4  # the held-out role rotates
  again = EpisodicSampler(cache, sites=sites, meta_train_domains=2, meta_test_domains=1,
                          slices_per_domain=3, seed=0)
  np.testing.assert_array_equal(again.batch_at(5)["meta_test"]["domain"],
                                sampler.batch_at(5)["meta_test"]["domain"])
  with pytest.raises(DataError, match="at most 5"):
    EpisodicSampler(cache, sites=sites, meta_train_domains=4, meta_test_domains=2,
                    slices_per_domain=1, seed=0)


def test_prepare_data_fits_normalizer_on_training_cases_only(tmp_path):
  root = make_sites_dataset(tmp_path / "ds", sites=("A", "B", "C"), cases=5)
  config = default_data_config()
  config.root = str(root)
  config.held_out = ("C",)
  config.in_plane_shape = (16, 8)
  config.context_slices = 3
  config.normalization.name = "histogram"
  data = prepare_data(config, progress=None)
  assert data.sources == ["A", "B"] and data.held_out == ["C"]
  assert data.domain_ids == {"A": 0, "B": 1, "C": 2}
  save_splits(tmp_path / "run" / "splits.json", data.splits)
  train_images = [c.image for s in ("A", "B") for c in data.cases["train"][s]]
  assert len(train_images) == 6  # 3 train cases per source site (5 cases, 20 % val, 20 % test)
  np.testing.assert_allclose(data.normalizer.landmarks, nyul_fit(train_images, standard_range=(0, 1)))
  assert len(data.cases["test"]["C"]) == 5
  batch = next(SliceSampler(data.train, sites=data.sources, batch_size=4, seed=0))
  assert batch["image"].shape == (4, 16, 8, 3)
  # Reusing the saved split file reproduces the protocol.
  config.split_file = str(tmp_path / "run" / "splits.json")
  again = prepare_data(config, progress=None)
  assert again.protocol == data.protocol


def dict_config(config, **changes):
  config = config.copy_and_resolve_references()
  for key, value in changes.items():
    config[key] = value
  return config


def test_resumed_run_reuses_its_split_and_normalizer_and_refuses_changed_data(tmp_path):
  root = make_sites_dataset(tmp_path / "ds", sites=("A", "B", "C"), cases=5)
  config = default_data_config()
  config.root = str(root)
  config.held_out = ("C",)
  config.in_plane_shape = (16, 8)
  config.normalization.name = "histogram"
  run = tmp_path / "run"
  first = prepare_data(config, progress=None, build_train=False)
  # A split and landmarks that differ from what recomputing would give: resuming must keep them.
  split = {site: {"train": [], "val": [], "test": []} for site in first.splits}
  for site, by_split in first.splits.items():
    ids = sorted(c for name in by_split for c in by_split[name])
    split[site] = {"train": ids[:2], "val": ids[2:4], "test": ids[4:]}
  save_splits(run / "splits.json", split)
  (run / "data_info.json").write_text(json.dumps({"cases": {s: sorted(c for n in b for c in b[n])
                                                            for s, b in first.splits.items()}}))
  landmarks = [0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0]
  (run / "normalizer.json").write_text(json.dumps(dict(first.normalizer.to_dict(), landmarks=landmarks)))
  resumed = prepare_data(config, run_dir=run, progress=None, build_train=False)
  assert resumed.splits == split and resumed.splits != first.splits
  assert list(resumed.normalizer.landmarks) == landmarks
  # A case added to the data between the kill and the resume is refused, naming it.
  image, label = toy_case(np.random.default_rng(9))
  write_nii(root / "A" / "case9_image.nii.gz", image)
  write_nii(root / "A" / "case9_label.nii.gz", label)
  with pytest.raises(DataError, match=r"run/data_info.json: site 'A' now holds case\(s\) \['case9'\]"):
    prepare_data(config, run_dir=run, progress=None, build_train=False)
  # ... and so is a site that disappeared.
  import shutil
  shutil.move(str(root / "C"), str(tmp_path / "C-away"))
  with pytest.raises(DataError, match=r"site 'C' of this run is gone"):
    prepare_data(dict_config(config, held_out=()), run_dir=run, progress=None, build_train=False)
  shutil.move(str(tmp_path / "C-away"), str(root / "C"))
  # Other normalization settings than the run's: refused too.
  (root / "A" / "case9_image.nii.gz").unlink()
  (root / "A" / "case9_label.nii.gz").unlink()
  config.normalization.name = "whitening"
  with pytest.raises(DataError, match="normalizer.json: holds 'histogram' normalization"):
    prepare_data(config, run_dir=run, progress=None, build_train=False)


def test_prepare_data_errors_name_the_key(tmp_path):
  root = make_sites_dataset(tmp_path / "ds", sites=("A", "B"), cases=3)
  config = default_data_config()
  config.root = str(root)
  config.held_out = ("Q",)
  with pytest.raises(DataError, match="'Q'"):
    prepare_data(config, progress=None)
  config.held_out = ()
  config.normalization.name = "zscore"
  with pytest.raises(DataError, match="data.normalization.name='zscore'"):
    prepare_data(config, progress=None)
  config.lock()  # as the trainer does: a misspelt key fails instead of being ignored
  with pytest.raises(AttributeError, match="normalisation"):
    config.normalisation = "whitening"


@pytest.mark.parametrize("processes", [2, 3, 4])
def test_a_process_block_is_its_rows_of_the_whole_batch(processes):
  """batch_at(step, block=(p, P)) assembles only process p's rows, and they are exactly
  parallel.process_rows of the whole batch (blocks not aligned with the site interleave too)."""
  from medgen_jax.data.sampler import SourceTargetSampler
  cache = _toy_cache(depths=(5, 4), sites=("A", "B", "C", "D", "E"))
  samplers = [SliceSampler(cache, sites=["A", "B"], batch_size=12, seed=1),
              EpisodicSampler(cache, sites=["A", "B", "C"], meta_train_domains=2, meta_test_domains=1,
                              slices_per_domain=12, seed=2),
              SourceTargetSampler(cache, cache, sources=["A", "B", "C"], targets=["D", "E"], batch_size=12,
                                  target_batch_size=24, seed=3)]
  for sampler in samplers:
    whole = sampler.batch_at(7)
    for p in range(processes):
      rows = sampler.batch_at(7, block=(p, processes))
      expected = parallel.process_rows(whole, process_index=p, process_count=processes)
      assert jax_tree_equal(rows, expected), (type(sampler).__name__, p)
  with pytest.raises(ValueError, match="cannot be split over 5 processes"):
    samplers[0].batch_at(0, block=(0, 5))


def jax_tree_equal(a, b) -> bool:
  import jax
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(la, lb))
