"""inference.sliding_window_predict: equal to a whole-volume forward for a voxel-wise network,
the blend against a brute-force loop written from the formula, patches batched with one shape."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medgen_jax.inference import importance_map, patch_starts, sliding_window_predict

RNG = np.random.default_rng(0)
W, B = RNG.normal(size=(2, 3)).astype(np.float32), RNG.normal(size=3).astype(np.float32)


@jax.jit
def voxelwise(x):   # a 1x1 convolution: each output voxel sees only its own input voxel
  return jnp.tanh(x @ W + B)


@pytest.mark.parametrize("shape,patch,blend", [
    ((10, 9, 2), (4, 4), "gaussian"), ((10, 9, 2), (4, 4), "constant"),
    ((7, 6, 5, 2), (4, 4, 4), "gaussian"), ((3, 9, 2), (4, 4), "gaussian")])   # last: smaller than the patch
def test_voxelwise_network_equals_the_whole_volume_forward(shape, patch, blend):
  volume = RNG.normal(size=shape).astype(np.float32)
  out = sliding_window_predict(voxelwise, volume, patch_size=patch, overlap=0.5, blend=blend, batch_size=3)
  assert out.shape == shape[:-1] + (3,)
  np.testing.assert_allclose(out, np.asarray(voxelwise(volume)), rtol=1e-5, atol=1e-6)


def test_blend_is_the_gaussian_weighted_average_of_the_patches():
  """A non-local network (each patch's output = its mean, + the position inside the patch)
  against a loop written from out(x) = Σ_p w·f / Σ_p w with σ = patch/8 and hand start offsets."""
  def patch_mean(x):
    ramp = np.arange(x.shape[1], dtype=np.float32)[None, :, None, None] * 0.1
    return np.broadcast_to(x.mean(axis=(1, 2), keepdims=True), x.shape[:3] + (1,)) + ramp
  volume = RNG.normal(size=(9, 10, 1)).astype(np.float32)
  out = sliding_window_predict(patch_mean, volume, patch_size=(4, 4), overlap=0.5, batch_size=4)
  starts0, starts1 = [0, 2, 4, 5], [0, 2, 4, 6]   # stride 2; the last patch flush with the end
  g = np.exp(-0.5 * ((np.arange(4) - 1.5) / 0.5) ** 2)   # σ = 4/8
  w = np.outer(g, g) / np.outer(g, g).max()
  num, den = np.zeros((9, 10)), np.zeros((9, 10))
  for a, b in itertools.product(starts0, starts1):
    patch = volume[a:a + 4, b:b + 4, 0]
    f = patch.mean() + 0.1 * np.arange(4)[:, None] * np.ones((4, 4))
    num[a:a + 4, b:b + 4] += w * f
    den[a:a + 4, b:b + 4] += w
  np.testing.assert_allclose(out[..., 0], num / den, rtol=1e-5, atol=1e-6)
  constant = sliding_window_predict(patch_mean, volume, patch_size=(4, 4), overlap=0.5, blend="constant")
  assert np.abs(constant - out).max() > 1e-3   # the weights matter here


def test_patches_reach_the_network_in_batches_of_one_shape():
  seen = []

  def recording(x):
    seen.append(x.shape)
    return np.asarray(voxelwise(x))
  volume = RNG.normal(size=(9, 10, 7, 2)).astype(np.float32)
  sliding_window_predict(recording, volume, patch_size=(4, 4, 4), overlap=0.5, batch_size=5)
  patches = 4 * 4 * 3   # starts (0,2,4,5) x (0,2,4,6) x (0,2,3)
  assert seen == [(5, 4, 4, 4, 2)] * math.ceil(patches / 5)


def test_starts_importance_map_and_bad_arguments():
  assert patch_starts(10, 4, 0.5) == [0, 2, 4, 6] and patch_starts(9, 4, 0.5) == [0, 2, 4, 5]
  assert patch_starts(3, 4, 0.5) == [0] and patch_starts(8, 4, 0.0) == [0, 4]
  m = importance_map((8, 16))
  assert m.max() == pytest.approx(1.0) and m.min() > 0
  # separable Gaussian with σ = n/8 along each axis
  np.testing.assert_allclose(m[0, 7] / m[3, 7], math.exp(-0.5 * (3.5 ** 2 - 0.5 ** 2) / 1.0), rtol=1e-5)
  np.testing.assert_allclose(importance_map((4, 4), "constant"), np.ones((4, 4)))
  volume = np.zeros((8, 8, 1), np.float32)
  for kwargs, text in [({"patch_size": (4, 4, 4)}, "spatial axes"), ({"patch_size": (4, 4), "overlap": 1.0}, "overlap"),
                       ({"patch_size": (4, 4), "batch_size": 0}, "batch_size"),
                       ({"patch_size": (4, 4), "blend": "median"}, "blend")]:
    with pytest.raises(ValueError, match=text):
      sliding_window_predict(voxelwise, volume, **kwargs)
