"""BigAug: deep stacked transformations (Zhang et al., IEEE TMI 2020), on device, per sample.

Each transform is applied with its own probability (0.5 each by default, as in BigAug), in the
paper's order: image quality (blur, sharpen, noise) → appearance (brightness, contrast,
gamma) → spatial (rotation, scaling, elastic deformation; one warp for image and label).

Stochastic augmentation is split in two pure steps: `sample_params(key, batch_size, config)`
draws every random number from the PRNG key; `apply_params(params, image, label)` is
deterministic. So the same key gives the same batch, parameters can be logged, and the step stays
a pure function of (state, batch, key). Usable with any method (`config.augment.enabled`).

Intensity transforms work in units of each image's own standard deviation, so they suit
z-scored, [0, 1]-scaled or histogram-standardized inputs alike. Ranges (defaults below) follow
MONAI/torchio conventions where the BigAug paper leaves them open.

3-D patches (image [B, D, H, W, C], label [B, D, H, W]; BigAug itself is 3-D) take the same
config and the same transforms, generalized: blur and sharpening are separable along D, H and W;
noise and the intensity transforms are unchanged (statistics over the whole patch); the rotation
is about the slice axis D (in the H-W plane, as nnU-Net restricts rotations of anisotropic
data), the scaling is the same factor along every axis, and the elastic displacement has a
component along each axis (a coarse [3, g, g, g] field, in voxels). The 2-D path computes
exactly what it did before the 3-D generalization.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from jax.scipy import ndimage as jndimage

TRANSFORMS = ("blur", "sharpen", "noise", "brightness", "contrast", "gamma", "rotation", "scaling",
              "elastic")
BLUR_RADIUS = 4


def default_augment_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "enabled": False,
      "probability": ml_collections.ConfigDict({name: 0.5 for name in TRANSFORMS}),
      "blur_sigma": (0.25, 1.5),        # pixels
      "sharpen_alpha": (0.5, 2.0),      # x + α (x − blur_1px(x))
      "noise_std": (0.0, 0.1),          # × image std
      "brightness": (-0.1, 0.1),        # shift × image std
      "contrast": (0.65, 1.5),          # scale around the image mean
      "gamma": (0.7, 1.5),              # on the image rescaled to [0, 1]
      "rotation_deg": (-20.0, 20.0),
      "scale": (0.8, 1.2),
      "elastic_std": 2.0,               # pixels, on a coarse grid
      "elastic_grid": 4,
  })


def sample_params(key, batch_size: int, config, *, ndim: int = 2) -> dict:
  """Every random number of one batch's augmentation, [B] arrays, and the elastic field
  [B, ndim, g, ..., g] for `ndim` spatial axes (2: slices, 3: patches)."""
  keys = dict(zip(TRANSFORMS + ("elastic_field", "noise_seed"), jax.random.split(key, len(TRANSFORMS) + 2)))
  params = {}
  for name in TRANSFORMS:
    flag_key, value_key = jax.random.split(keys[name])
    params[f"{name}_on"] = jax.random.bernoulli(flag_key, config.probability[name], (batch_size,))
    keys[name] = value_key

  def uniform(name, bounds):
    return jax.random.uniform(keys[name], (batch_size,), minval=bounds[0], maxval=bounds[1])

  params["blur_sigma"] = uniform("blur", config.blur_sigma)
  params["sharpen_alpha"] = uniform("sharpen", config.sharpen_alpha)
  params["noise_std"] = uniform("noise", config.noise_std)
  params["brightness"] = uniform("brightness", config.brightness)
  params["contrast"] = uniform("contrast", config.contrast)
  params["gamma"] = uniform("gamma", config.gamma)
  params["rotation"] = jnp.deg2rad(uniform("rotation", config.rotation_deg))
  params["scale"] = uniform("scaling", config.scale)
  g = config.elastic_grid
  params["elastic_field"] = config.elastic_std * jax.random.normal(keys["elastic_field"],
                                                                   (batch_size, ndim) + (g,) * ndim)
  params["noise_seed"] = jax.random.split(keys["noise_seed"], batch_size)
  return params


def _gaussian_weights(sigma):
  taps = jnp.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=jnp.float32)
  w = jnp.exp(-0.5 * (taps / jnp.maximum(sigma, 1e-3)) ** 2)
  return w / jnp.sum(w)


def _blur(image, weights):
  """Separable blur of [*spatial, C] along every spatial axis, with edge padding."""
  out = image
  for axis in range(image.ndim - 1):
    n = out.shape[axis]
    pad = [(0, 0)] * out.ndim
    pad[axis] = (BLUR_RADIUS, BLUR_RADIUS)
    out = jnp.pad(out, pad, mode="edge")
    index = lambda k: (slice(None),) * axis + (slice(k, k + n),)
    out = sum(weights[k] * out[index(k)] for k in range(2 * BLUR_RADIUS + 1))
  return out


def apply_params(p: dict, image, label):
  """Deterministic augmentation of one sample: image [*spatial, C] float, label [*spatial] int,
  2-D ([H, W]) or 3-D ([D, H, W]; the elastic field of `sample_params(..., ndim=3)`)."""
  shape = label.shape
  image = image.astype(jnp.float32)
  std = jnp.maximum(jnp.std(image), 1e-6)
  delta = (jnp.arange(2 * BLUR_RADIUS + 1) == BLUR_RADIUS).astype(jnp.float32)
  image = _blur(image, jnp.where(p["blur_on"], _gaussian_weights(p["blur_sigma"]), delta))
  sharpened = image + p["sharpen_alpha"] * (image - _blur(image, _gaussian_weights(1.0)))
  image = jnp.where(p["sharpen_on"], sharpened, image)
  noise = jax.random.normal(p["noise_seed"], image.shape) * p["noise_std"] * std
  image = jnp.where(p["noise_on"], image + noise, image)
  image = jnp.where(p["brightness_on"], image + p["brightness"] * std, image)
  mean = jnp.mean(image)
  image = jnp.where(p["contrast_on"], (image - mean) * p["contrast"] + mean, image)
  lo, hi = jnp.min(image), jnp.max(image)
  span = jnp.maximum(hi - lo, 1e-6)
  gamma = lo + span * ((image - lo) / span) ** p["gamma"]
  image = jnp.where(p["gamma_on"], gamma, image)

  # Output voxel -> source coordinates: rotation in the last two axes (H, W), about the centre;
  # every axis scaled by 1 / scale about the centre; plus the elastic displacement.
  angle = jnp.where(p["rotation_on"], p["rotation"], 0.0)
  scale = jnp.where(p["scaling_on"], p["scale"], 1.0)
  cos, sin = jnp.cos(angle) / scale, jnp.sin(angle) / scale
  grids = jnp.meshgrid(*(jnp.arange(n, dtype=jnp.float32) for n in shape), indexing="ij")
  centre = [(n - 1) / 2.0 for n in shape]
  yy, xx = grids[-2:]
  cy, cx = centre[-2:]
  src_y = cy + cos * (yy - cy) - sin * (xx - cx)
  src_x = cx + sin * (yy - cy) + cos * (xx - cx)
  src = [c + (g - c) / scale for g, c in zip(grids[:-2], centre[:-2])] + [src_y, src_x]
  field = jax.image.resize(p["elastic_field"], (len(shape),) + shape, method="cubic")
  field = jnp.where(p["elastic_on"], field, 0.0)
  coords = [s + f for s, f in zip(src, field)]
  warped = jnp.stack([jndimage.map_coordinates(image[..., c], coords, order=1, mode="nearest")
                      for c in range(image.shape[-1])], axis=-1)
  warped_label = jndimage.map_coordinates(label, coords, order=0, mode="constant", cval=0)
  return warped, warped_label.astype(label.dtype)


def augment_batch(key, batch: dict, config) -> dict:
  """BigAug on a batch {'image': [B, H, W, C], 'label': [B, H, W], ...} of slices or
  {'image': [B, D, H, W, C], 'label': [B, D, H, W], ...} of 3-D patches; other keys kept."""
  params = sample_params(key, batch["image"].shape[0], config, ndim=batch["label"].ndim - 1)
  image, label = jax.vmap(apply_params)(params, batch["image"], batch["label"])
  return dict(batch, image=image, label=label)


def maybe_augment(key, batch: dict, config) -> dict:
  return augment_batch(key, batch, config) if config is not None and config.enabled else batch
