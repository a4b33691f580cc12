"""Dice, ASSD, HD95 on analytic shapes and against a brute-force numpy computation."""


import numpy as np
import pytest

from medgen_jax import metrics


def brute_surface(mask):
  """A voxel is on the surface if it is set and a 6-neighbour is unset or outside the array."""
  out = np.zeros_like(mask, bool)
  for idx in zip(*np.nonzero(mask)):
    for axis in range(mask.ndim):
      for step in (-1, 1):
        n = list(idx)
        n[axis] += step
        if not 0 <= n[axis] < mask.shape[axis] or not mask[tuple(n)]:
          out[idx] = True
  return out


def brute_directed(a, b, spacing):
  pa = np.argwhere(brute_surface(a)) * spacing
  pb = np.argwhere(brute_surface(b)) * spacing
  return np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1)).min(axis=1)


def test_dice_closed_form():
  a = np.zeros((10, 10, 10), bool)
  b = np.zeros_like(a)
  a[2:6, 2:6, 2:6] = True        # 64 voxels
  b[4:8, 2:6, 2:6] = True        # 64 voxels, overlap 2*4*4 = 32
  assert metrics.dice_score(a, b) == pytest.approx(2 * 32 / 128)


def test_parallel_planes_with_anisotropic_spacing():
  a = np.zeros((12, 6, 5), bool)
  b = np.zeros_like(a)
  a[3] = True
  b[7] = True
  spacing = (2.5, 0.7, 3.0)
  # Every surface voxel of each plane is 4 voxels x 2.5 mm from the other plane.
  assert metrics.average_surface_distance(a, b, spacing=spacing) == pytest.approx(10.0)
  assert metrics.hausdorff_distance(a, b, spacing=spacing) == pytest.approx(10.0)
  assert metrics.average_surface_distance(a, b) == pytest.approx(4.0)  # voxel units


@pytest.mark.parametrize("seed", range(4))
def test_distances_match_brute_force(seed):
  rng = np.random.default_rng(seed)
  shape = (9, 8, 7)
  a = rng.random(shape) < 0.3
  b = rng.random(shape) < 0.3
  spacing = np.array([0.8, 1.3, 2.9])
  d_ab, d_ba = brute_directed(a, b, spacing), brute_directed(b, a, spacing)
  np.testing.assert_allclose(np.sort(metrics.directed_surface_distances(a, b, spacing=spacing)),
                             np.sort(d_ab), rtol=1e-9)
  pooled = np.concatenate([d_ab, d_ba]).mean()
  assert metrics.average_surface_distance(a, b, spacing=spacing) == pytest.approx(pooled)
  assert metrics.average_surface_distance(a, b, spacing=spacing, symmetric=False) == pytest.approx(d_ab.mean())
  hd95 = max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))
  assert metrics.hausdorff_distance(a, b, spacing=spacing) == pytest.approx(hd95)
  assert metrics.hausdorff_distance(a, b, spacing=spacing, percentile=100) == pytest.approx(
      max(d_ab.max(), d_ba.max()))


def test_symmetric_asd_pools_both_sets_not_mean_of_means():
  """A small blob inside a big box: the two directed sets differ in size, so pooling matters."""
  big = np.zeros((20, 20, 20), bool)
  big[2:18, 2:18, 2:18] = True
  small = np.zeros_like(big)
  small[9:11, 9:11, 9:11] = True
  d1, d2 = brute_directed(big, small, np.ones(3)), brute_directed(small, big, np.ones(3))
  pooled = metrics.average_surface_distance(big, small)
  assert pooled == pytest.approx(np.concatenate([d1, d2]).mean())
  assert abs(pooled - (d1.mean() + d2.mean()) / 2) > 0.5


def test_ball_radii_difference():
  """Concentric balls of radii 10 and 13 voxels: surface distances close to 3."""
  grid = np.stack(np.meshgrid(*[np.arange(40)] * 3, indexing="ij")) - 19.5
  r = np.sqrt((grid ** 2).sum(0))
  assert metrics.average_surface_distance(r < 10, r < 13) == pytest.approx(3.0, abs=0.5)


def test_empty_mask_policy():
  empty = np.zeros((4, 5, 6), bool)
  full = empty.copy()
  full[1:3, 1:3, 1:3] = True
  spacing = (1.0, 2.0, 3.0)
  diagonal = np.sqrt(4 ** 2 + 10 ** 2 + 18 ** 2)
  assert metrics.dice_score(empty, empty) == 1.0
  assert metrics.average_surface_distance(empty, empty, spacing=spacing) == 0.0
  assert metrics.hausdorff_distance(empty, empty, spacing=spacing) == 0.0
  assert metrics.dice_score(empty, full) == 0.0
  for pred, ref, flag in ((empty, full, "pred_empty"), (full, empty, "ref_empty")):
    assert metrics.average_surface_distance(pred, ref, spacing=spacing) == pytest.approx(diagonal)
    assert metrics.hausdorff_distance(pred, ref, spacing=spacing) == pytest.approx(diagonal)
    assert metrics.empty_flag(pred, ref) == flag
  assert metrics.empty_flag(empty, empty) == "both_empty"
  scores = metrics.score_volume(np.zeros((4, 5, 6), int), full.astype(int) * 2, num_classes=3, spacing=spacing)
  assert scores["dice"] == [1.0, 0.0] and scores["flag"] == ["both_empty", "pred_empty"]
  assert all(np.isfinite(scores["asd"])) and all(np.isfinite(scores["hd95"]))


def test_two_dimensional_masks_work():
  a = np.zeros((8, 8), bool)
  b = np.zeros_like(a)
  a[:, 2] = True
  b[:, 5] = True
  assert metrics.average_surface_distance(a, b, spacing=(1.0, 0.5)) == pytest.approx(1.5)
