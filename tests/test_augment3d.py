"""augment.py on 3-D patches: each transform alone against a closed form, scipy, or numpy.

One jitted vmap(apply_params) serves every case (the parameters are arrays), so the 3-D
pipeline compiles once for the closed-form checks."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from medgen_jax import augment

SHAPE = (6, 8, 8)   # D, H, W (H = W for the 90-degree rotation)
RNG = np.random.default_rng(0)
IMAGE = RNG.normal(2.0, 1.5, size=(2, *SHAPE, 3)).astype(np.float32)
LABEL = RNG.integers(0, 3, size=(2, *SHAPE)).astype(np.int32)
apply = jax.jit(jax.vmap(augment.apply_params))


def off_params(**values):
  """Every transform off (probability 0), then `name=value` sets a transform's parameter for
  both samples and turns it on (`elastic_field` / `noise_seed` only set their arrays)."""
  config = augment.default_augment_config()
  for name in augment.TRANSFORMS:
    config.probability[name] = 0.0
  p = augment.sample_params(jax.random.PRNGKey(0), 2, config, ndim=3)
  switch = {"blur_sigma": "blur", "sharpen_alpha": "sharpen", "noise_std": "noise", "scale": "scaling",
            "elastic_field": "elastic"}
  for key, value in values.items():
    p[key] = jnp.broadcast_to(jnp.asarray(value, p[key].dtype), p[key].shape)
    p[f"{switch.get(key, key)}_on"] = jnp.ones((2,), bool)
  return p


def run(image=IMAGE, label=LABEL, **values):
  out, out_label = apply(off_params(**values), jnp.asarray(image), jnp.asarray(label))
  return np.asarray(out), np.asarray(out_label)


def per_sample(f, image=IMAGE):
  return np.stack([f(x) for x in image])


def test_all_off_is_the_identity():
  out, label = run()
  np.testing.assert_array_equal(out, IMAGE)
  np.testing.assert_array_equal(label, LABEL)


def test_intensity_transforms_closed_forms():
  std = lambda x: max(float(np.std(x)), 1e-6)
  out, label = run(brightness=0.1)
  np.testing.assert_allclose(out, per_sample(lambda x: x + 0.1 * std(x)), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(label, LABEL)
  out, _ = run(contrast=1.4)
  np.testing.assert_allclose(out, per_sample(lambda x: (x - x.mean()) * 1.4 + x.mean()), rtol=1e-5, atol=1e-5)
  out, _ = run(gamma=1.3)
  gamma = lambda x: x.min() + np.ptp(x) * ((x - x.min()) / np.ptp(x)) ** 1.3
  np.testing.assert_allclose(out, per_sample(gamma), rtol=1e-4, atol=1e-4)
  out, _ = run(noise_std=0.1)
  noise = out - IMAGE   # N(0, (0.1 · std)²) per voxel: 1152 draws per sample
  for n, x in zip(noise, IMAGE):
    assert abs(n.mean()) < 0.02 * std(x) and abs(n.std() / (0.1 * std(x)) - 1) < 0.1


def test_blur_and_sharpen_equal_scipy_gaussian_filter_along_d_h_w():
  """Our blur: a normalized Gaussian truncated at radius 4, edge padding = scipy's
  gaussian_filter(mode='nearest') with truncate = 4 / sigma, along the three spatial axes."""
  blur = lambda x, s: ndimage.gaussian_filter(x.astype(np.float64), (s, s, s, 0), mode="nearest", truncate=4.0 / s)
  out, _ = run(blur_sigma=0.8)
  np.testing.assert_allclose(out, per_sample(lambda x: blur(x, 0.8)), rtol=1e-5, atol=1e-5)
  out, _ = run(sharpen_alpha=1.5)
  np.testing.assert_allclose(out, per_sample(lambda x: x + 1.5 * (x - blur(x, 1.0))), rtol=1e-5, atol=1e-4)


def test_rotation_is_about_the_slice_axis():
  """90 degrees: out[d, y, x] = in[d, H-1-x, y], i.e. np.rot90(k=-1) in the H-W plane."""
  out, label = run(rotation=np.pi / 2)
  np.testing.assert_allclose(out, np.rot90(IMAGE, k=-1, axes=(2, 3)), atol=1e-5)
  np.testing.assert_array_equal(label, np.rot90(LABEL, k=-1, axes=(2, 3)))


def test_scaling_acts_on_every_axis_about_the_centre():
  """On linear ramps (exact under linear interpolation): channel a = the coordinate along axis
  a, so the output is c_a + (coordinate - c_a) / scale along each axis, D included."""
  grids = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in SHAPE), indexing="ij")
  ramps = np.stack(grids, axis=-1)[None].repeat(2, axis=0)
  out, _ = run(image=ramps, scale=1.25)
  centre = (np.array(SHAPE) - 1) / 2.0
  np.testing.assert_allclose(out, centre + (ramps - centre) / 1.25, atol=1e-5)


def test_elastic_field_warps_image_and_label_alike_in_3d():
  """A constant displacement of +1 voxel along D (cubic upsampling keeps a constant field):
  out[d] = in[d + 1], the last slice repeated for the image (mode 'nearest'), background (0)
  for the label (mode 'constant')."""
  field = np.zeros((3, 4, 4, 4), np.float32)
  field[0] = 1.0
  out, label = run(elastic_field=field)
  np.testing.assert_allclose(out[:, :-1], IMAGE[:, 1:], atol=1e-5)
  np.testing.assert_allclose(out[:, -1], IMAGE[:, -1], atol=1e-5)
  np.testing.assert_array_equal(label[:, :-1], LABEL[:, 1:])
  assert not label[:, -1].any()


def test_augment_batch_on_3d_patches():
  """Every transform on at once (the same compiled program: the parameters are arrays), and
  augment_batch's 3-D dispatch by shape (traced only)."""
  config = augment.default_augment_config()
  for name in augment.TRANSFORMS:
    config.probability[name] = 1.0
  params = augment.sample_params(jax.random.PRNGKey(1), 2, config, ndim=3)
  assert params["elastic_field"].shape == (2, 3, 4, 4, 4)
  assert jax.eval_shape(lambda k: augment.sample_params(k, 2, config), jax.random.PRNGKey(1))[
      "elastic_field"].shape == (2, 2, 4, 4)   # slices: unchanged
  image, label = apply(params, jnp.asarray(IMAGE), jnp.asarray(LABEL))
  assert np.all(np.isfinite(image)) and not np.allclose(image, IMAGE) and set(np.unique(label)) <= {0, 1, 2}
  batch = {"image": jnp.asarray(IMAGE), "label": jnp.asarray(LABEL), "domain": jnp.arange(2)}
  out = jax.eval_shape(lambda k: augment.augment_batch(k, batch, config), jax.random.PRNGKey(1))
  assert out["image"].shape == IMAGE.shape and out["label"].shape == LABEL.shape
  assert out["label"].dtype == jnp.int32 and out["domain"].shape == (2,)
