"""data/patches.py: determinism per (seed, step), nnU-Net's forced-foreground rule and
placement, site balance, zero padding, resume, and volumes built from loaded cases."""

import numpy as np
import pytest

from medgen_jax.data.errors import DataError
from medgen_jax.data.loading import Case
from medgen_jax.data.normalize import make_normalizer
from medgen_jax.data.patches import (PatchSampler, VolumeSet, build_volumes, crop, forced_foreground,
                                     make_volume)
from medgen_jax.data.preprocess import preprocess_case

PATCH = (4, 8, 8)


def site_volumes(site_value: float, *, count: int = 2, shape=(8, 32, 32), labels=None):
  """Volumes whose image is site_value + a small per-voxel code (never 0), and a label map."""
  rng = np.random.default_rng(int(site_value))
  volumes = []
  for k in range(count):
    image = site_value + rng.uniform(0.1, 0.9, size=shape).astype(np.float32)
    label = np.zeros(shape, np.uint8) if labels is None else labels.copy()
    volumes.append(make_volume(image, label, case_id=f"c{k}"))
  return volumes


def rare_foreground(shape=(8, 32, 32)):
  """Class 1: a 2x4x4 block in a far corner; class 2: one voxel in the opposite corner."""
  label = np.zeros(shape, np.uint8)
  label[-2:, -4:, -4:] = 1
  label[0, 0, 0] = 2
  return label


@pytest.fixture(scope="module")
def volumes():
  return VolumeSet({"A": site_volumes(10.0, labels=rare_foreground()),
                    "B": site_volumes(20.0, labels=rare_foreground())}, {"A": 0, "B": 1})


def test_forced_samples_are_nnunets_last_third():
  # not b < round(B * (1 - 0.33)), by hand: B=2 -> round(1.34)=1; 3 -> round(2.01)=2; 4 -> round(2.68)=3;
  # 6 -> round(4.02)=4; 9 -> round(6.03)=6
  for b, first in [(2, 1), (3, 2), (4, 3), (6, 4), (9, 6)]:
    assert forced_foreground(b).tolist() == [i >= first for i in range(b)]
  assert not forced_foreground(6, 0.0).any() and forced_foreground(6, 1.0).all()


def test_batches_are_deterministic_balanced_and_typed(volumes):
  sampler = PatchSampler(volumes, sites=["A", "B"], batch_size=6, patch_size=PATCH, seed=3)
  batch = sampler.batch_at(5)
  again = PatchSampler(volumes, sites=["A", "B"], batch_size=6, patch_size=PATCH, seed=3).batch_at(5)
  for key in ("image", "label", "domain"):
    np.testing.assert_array_equal(batch[key], again[key])
  assert not np.array_equal(batch["image"], sampler.batch_at(6)["image"])
  assert not np.array_equal(batch["image"], PatchSampler(volumes, sites=["A", "B"], batch_size=6,
                                                         patch_size=PATCH, seed=4).batch_at(5)["image"])
  assert batch["image"].shape == (6, *PATCH, 1) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (6, *PATCH) and batch["label"].dtype == np.int32
  assert batch["domain"].tolist() == [0, 1, 0, 1, 0, 1]
  for step in range(10):   # every sample's (non-padded) voxels come from its own site's volumes
    b = sampler.batch_at(step)
    for i in range(6):
      values = b["image"][i][b["image"][i] != 0]
      site_value = 10.0 if i % 2 == 0 else 20.0
      assert values.size and np.all((values > site_value) & (values < site_value + 1))


def test_forced_patches_hold_foreground_and_random_ones_rarely_do(volumes):
  """Foreground is 33 of 8192 voxels, in two corners: a random 4x8x8 patch (corner uniform over
  5 x 25 x 25 positions) holds some with probability (2/5)(4/25)^2 + 1/3125 ~ 1 %, a forced one always. Forced classes are drawn uniformly
  (nnU-Net), not by voxel count: the one-voxel class 2 is as frequent as the 32-voxel class 1."""
  sampler = PatchSampler(volumes, sites=["A", "B"], batch_size=6, patch_size=PATCH, seed=0)
  holds = np.array([[sampler.batch_at(s)["label"][i].max() > 0 for i in range(6)] for s in range(40)])
  assert holds[:, 4:].all()                              # forced: indices >= round(6 * 0.67) = 4
  assert holds[:, :4].sum() <= 4                         # random: a few at most in 160 draws
  classes = np.array([[set(np.unique(sampler.batch_at(s)["label"][i])) - {0} for i in (4, 5)] for s in range(40)])
  with_two = sum(2 in c for c in classes.ravel())
  assert 25 <= with_two <= 55, with_two                  # ~40 of 80 if classes are uniform; ~1 if by voxels
  none = PatchSampler(volumes, sites=["A", "B"], batch_size=6, patch_size=PATCH, seed=0, oversample_foreground=0.0)
  assert sum(none.batch_at(s)["label"].max() > 0 for s in range(40)) <= 4


def test_volume_smaller_than_the_patch_is_zero_padded_around_it():
  image = np.arange(1, 2 * 3 * 3 + 1, dtype=np.float32).reshape(2, 3, 3)
  label = np.ones((2, 3, 3), np.uint8)
  volumes = VolumeSet({"A": [make_volume(image, label)]}, {"A": 0})
  for force in (0.0, 1.0):
    sampler = PatchSampler(volumes, sites=["A"], batch_size=3, patch_size=(4, 4, 4), seed=1,
                           oversample_foreground=force)
    for step in range(5):
      batch = sampler.batch_at(step)
      for i in range(3):
        patch = batch["image"][i, ..., 0]
        # need = (2, 1, 1): axis 0 is centred exactly (offset 1), axes 1, 2 offset 0 or 1.
        assert np.all(patch[0] == 0) and np.all(patch[3] == 0)
        nz = np.argwhere(patch)
        assert len(nz) == image.size and np.array_equal(np.sort(patch[patch != 0]), image.ravel())
        lo = nz.min(axis=0)
        np.testing.assert_array_equal(patch[lo[0]:lo[0] + 2, lo[1]:lo[1] + 3, lo[2]:lo[2] + 3], image)
        assert batch["label"][i].sum() == label.sum()


def test_crop_pads_outside_the_array_with_zeros():
  a = np.arange(1, 5 * 6 + 1).reshape(5, 6)
  padded = np.pad(a, 10)
  for corner in [(0, 0), (-2, 3), (3, 4), (-7, -1), (4, 5)]:
    np.testing.assert_array_equal(crop(a, corner, (3, 4)),
                                  padded[corner[0] + 10:corner[0] + 13, corner[1] + 10:corner[1] + 14])


def test_resume_from_state_dict_continues_the_stream(volumes):
  def make(**kw):
    return PatchSampler(volumes, sites=["A", "B"], batch_size=4, patch_size=PATCH, seed=7, **kw)
  run = make()
  for _ in range(3):
    next(run)
  state = run.state_dict()
  expected = [next(run) for _ in range(2)]
  resumed = make()
  resumed.load_state_dict(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])
  with pytest.raises(ValueError, match="seed"):
    PatchSampler(volumes, sites=["A"], batch_size=2, patch_size=PATCH, seed=8).load_state_dict(state)


def test_bad_arguments_are_one_clear_error(volumes):
  for kwargs, text in [({"batch_size": 3}, "multiple of the 2"), ({"patch_size": (8, 8)}, "patch_size"),
                       ({"sites": ["A", "Z"]}, "no volumes"), ({"oversample_foreground": 1.5}, "fraction")]:
    args = {"sites": ["A", "B"], "batch_size": 4, "patch_size": PATCH, "seed": 0, **kwargs}
    with pytest.raises(DataError, match=text):
      PatchSampler(volumes, **args)


def test_build_volumes_preprocesses_cases_like_the_slice_cache():
  rng = np.random.default_rng(0)
  cases = []
  for k in range(3):
    image = rng.normal(5.0, 2.0, size=(12, 10, 4 + k)).astype(np.float32)   # [X, Y, Z]
    label = (image > 6).astype(np.uint8)
    cases.append(Case("S", f"c{k}", image, label, np.diag([1.0, 1.0, 3.0 + k, 1.0]), "", ""))
  normalizer = make_normalizer("whitening")
  vs = build_volumes({"S": cases}, normalizer=normalizer, domain_ids={"S": 0})
  for case, volume in zip(cases, vs.sites["S"]):
    want_image, want_label = preprocess_case(case.image, case.label, case.spacing, normalizer=normalizer,
                                             in_plane_shape=case.image.shape[:2], site="S")
    np.testing.assert_array_equal(volume.image[..., 0], np.moveaxis(want_image, 2, 0))   # [Z, X, Y]
    np.testing.assert_array_equal(volume.label, np.moveaxis(want_label, 2, 0))
    assert volume.spacing == (case.spacing[2], 1.0, 1.0)
    np.testing.assert_array_equal(volume.locations[1], np.argwhere(volume.label == 1))
  assert vs.median_spacing() == (4.0, 1.0, 1.0)
  resampled = build_volumes({"S": cases[:1]}, normalizer=normalizer, domain_ids={"S": 0},
                            in_plane_spacing=(2.0, 2.0), in_plane_shape=(8, 8))
  assert resampled.sites["S"][0].image.shape == (4, 8, 8, 1) and resampled.sites["S"][0].spacing == (3.0, 2.0, 2.0)


def test_a_process_block_is_its_rows_of_the_whole_batch(volumes):
  from medgen_jax import parallel
  sampler = PatchSampler(volumes, sites=["A", "B"], batch_size=6, patch_size=PATCH, seed=3)
  whole = sampler.batch_at(4)
  for processes in (2, 3):
    for p in range(processes):
      rows = sampler.batch_at(4, block=(p, processes))
      expected = parallel.process_rows(whole, process_index=p, process_count=processes)
      for key in whole:
        np.testing.assert_array_equal(rows[key], expected[key])
