"""inference.sliding_window_predict: equal to a whole-volume forward for a voxel-wise network,
the blend against a brute-force loop written from the formula, patches batched with one shape."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medgen_jax.inference import (importance_map, patch_starts, predict_volume, predict_volume_patches,
                                  sliding_window_predict)

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


def test_patch_prediction_of_a_case_equals_the_slice_path_for_a_voxelwise_net():
  """predict_volume_patches (whole preprocessed volume, sliding 3-D window, back to the case grid)
  against predict_volume (slice by slice, the same voxel-wise logits): the same label map on the
  case's own grid, through in-plane resampling and crop/pad."""
  import ml_collections
  from medgen_jax.data.normalize import make_normalizer
  w = RNG.normal(size=(1, 3)).astype(np.float32)
  logits = jax.jit(lambda x: x @ w + jnp.asarray([0.0, 0.3, -0.2]))
  image = RNG.normal(size=(23, 18, 7)).astype(np.float32)
  data_config = ml_collections.ConfigDict({"in_plane_spacing": (1.5, 1.5), "in_plane_shape": (12, 16),
                                           "bias_correction": "none", "context_slices": 1})
  common = dict(normalizer=make_normalizer("whitening"), data_config=data_config)
  slices = predict_volume(lambda v, x: jnp.argmax(logits(x), axis=-1), None, image, (1.0, 1.2, 3.0),
                          batch_size=4, **common)
  patches = predict_volume_patches(logits, image, (1.0, 1.2, 3.0), patch_size=(4, 8, 8), batch_size=3, **common)
  assert patches.shape == image.shape and patches.dtype == np.uint8 and len(np.unique(patches)) == 3
  np.testing.assert_array_equal(patches, slices)


# --- MONAI oracle (optional: pip install 'medgen_jax[oracle]') ----------------------------------
# A fixed random non-local network (3x3x3 'SAME' convolution: outputs near a patch's border see
# its zero padding; plus the patch mean), the same JAX function behind both implementations.
W3 = RNG.normal(size=(3, 3, 3, 2, 4)).astype(np.float32) * 0.3
W4 = RNG.normal(size=(4, 3)).astype(np.float32)


@jax.jit
def conv_net(x):   # [B, D, H, W, 2] -> [B, D, H, W, 3]
  h = jax.lax.conv_general_dilated(x, W3, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
  return jnp.tanh(h) @ W4 + jnp.mean(x, axis=(1, 2, 3), keepdims=True)[..., :1]


def monai_predict(volume, patch, **kwargs):
  """MONAI's sliding_window_inference on [*spatial, C] (it works channel-first, batch of one)."""
  torch = pytest.importorskip("torch")
  inferers = pytest.importorskip("monai.inferers")
  def predictor(t):
    out = np.asarray(conv_net(np.moveaxis(t.numpy(), 1, -1)))
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(out, -1, 1)))
  x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(volume, -1, 0)[None]))
  out = inferers.sliding_window_inference(x, patch, 4, predictor, overlap=0.5, **kwargs)
  return np.moveaxis(out[0].numpy(), 0, -1)


def test_monai_oracle_same_patches_same_blend():
  """Even patch sizes (MONAI's stride int(p/2) = ours round(p/2)), volume >= patch: MONAI's
  output equals ours exactly with constant weights, and with Gaussian weights once it is given
  our importance map (its own differs only by its 1e-3 floor: next test)."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("monai")
  volume = RNG.normal(size=(10, 13, 12, 2)).astype(np.float32)
  patch = (4, 6, 8)
  for blend in ("constant", "gaussian"):
    ours = sliding_window_predict(conv_net, volume, patch_size=patch, overlap=0.5, blend=blend, batch_size=4)
    weights = {"roi_weight_map": torch.from_numpy(importance_map(patch))} if blend == "gaussian" else {}
    theirs = monai_predict(volume, patch, mode=blend, **weights)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
  assert np.abs(ours - sliding_window_predict(conv_net, volume, patch_size=patch, blend="constant")).max() > 0.1


def test_monai_oracle_gaussian_map_and_default_blend():
  """MONAI's own map (mode='gaussian', sigma_scale=0.125) = the same separable Gaussian
  exp(-x²/2σ²), σ = p/8, x from the patch centre (p-1)/2, not rescaled to max 1 (a factor that
  cancels in the blend) and floored at 1e-3 (ours raises only zeros, as nnU-Net). Where that
  floor is inactive (patch (1, 2, 4): smallest weight e^-2·e^-4.5 = 1.5e-3), MONAI's default
  output equals ours."""
  pytest.importorskip("torch")
  data_utils = pytest.importorskip("monai.data.utils")
  for patch in [(4, 6, 8), (1, 2, 4)]:
    theirs = data_utils.compute_importance_map(patch, mode="gaussian", sigma_scale=0.125).numpy()
    np.testing.assert_allclose(theirs, np.maximum(importance_map(patch) * theirs.max(), 1e-3), rtol=1e-5, atol=1e-8)
  volume = RNG.normal(size=(3, 5, 9, 2)).astype(np.float32)
  ours = sliding_window_predict(conv_net, volume, patch_size=(1, 2, 4), overlap=0.5, batch_size=4)
  np.testing.assert_allclose(ours, monai_predict(volume, (1, 2, 4), mode="gaussian", sigma_scale=0.125),
                             rtol=1e-5, atol=1e-5)


def test_patch_starts_are_monais_when_the_stride_is_whole():
  """MONAI's stride is int(p·(1 − overlap)), ours round(p·(1 − overlap)): the same start offsets
  whenever p·(1 − overlap) is an integer (e.g. even p at overlap 0.5)."""
  pytest.importorskip("torch")
  data_utils = pytest.importorskip("monai.data.utils")
  inferer_utils = pytest.importorskip("monai.inferers.utils")
  for overlap in (0.25, 0.5, 0.75):
    for p in range(1, 13):
      for size in range(p, 30):
        interval = inferer_utils._get_scan_interval((size,), (p,), 1, (overlap,))
        theirs = [s[0].start for s in data_utils.dense_patch_slices((size,), (p,), interval)]
        if float(p * (1 - overlap)).is_integer():
          assert patch_starts(size, p, overlap) == theirs, (overlap, p, size)
  assert patch_starts(11, 7, 0.5) == [0, 4] and [s[0].start for s in data_utils.dense_patch_slices((11,), (7,), (3,))] == [0, 3, 4]
