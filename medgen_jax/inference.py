"""Whole-volume prediction, slice by slice or by 3-D patches in fixed-size batches, back on the
original grid.

A volume is preprocessed exactly as for training (normalization, in-plane resampling, crop/pad),
then a 2-D model predicts every axial slice (`predict_volume`; no truncation to a multiple of the
batch size: the last batch is padded) and a 3-D patch model (`data.patch_size` set) the whole
volume by sliding-window inference (`predict_volume_patches`, below); the label map is mapped
back to the volume's own grid (crop/pad inverted, in-plane resampling undone by nearest
neighbour), so metrics use the file's voxel spacing. `predict_case` picks the path from the data
config; evaluation and `python -m medgen_jax.predict` call it.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from medgen_jax.data.preprocess import context_offsets, crop_or_pad, preprocess_case


def make_predict_fn(model, *, domains: bool = False, logits: bool = False):
  """jit(variables, images [B, H, W, C]) -> labels [B, H, W] int32 (argmax of the logits); with
  `domains` (a network with domain-specific layers), jit(variables, images, domain [B]) ->
  labels. `logits=True`: the logits [B, ..., K] themselves (float32), what sliding-window
  inference blends (3-D patch models: images [B, D, H, W, C])."""
  head = (lambda out: out.astype(jnp.float32)) if logits else (lambda out: jnp.argmax(out, axis=-1))
  if domains:
    return jax.jit(lambda variables, x, domain: head(model.apply(variables, x, train=False, domain=domain)))
  return jax.jit(lambda variables, x: head(model.apply(variables, x, train=False)))


def is_volumetric(data_config) -> bool:
  """True for 3-D patch models (data.patch_size set), False for 2-D / 2.5-D slice models."""
  return bool(tuple(data_config.get("patch_size", ())))


def predict_case(predict_fn, variables, image: np.ndarray, spacing, *, normalizer, data_config,
                 batch_size: int, overlap: float = 0.5, site: str | None = None,
                 domain: int | None = None) -> np.ndarray:
  """Label map [X, Y, Z] (uint8) on the grid of `image`: slice by slice (predict_volume) or, when
  `data_config.patch_size` is set, by sliding-window inference on 3-D patches
  (predict_volume_patches: `batch_size` patches per forward, `overlap`), where `predict_fn` must
  return logits (make_predict_fn(..., logits=True)). `site`, `domain` as in predict_volume."""
  if not is_volumetric(data_config):
    return predict_volume(predict_fn, variables, image, spacing, normalizer=normalizer, data_config=data_config,
                          batch_size=batch_size, site=site, domain=domain)
  extra = () if domain is None else (np.full((batch_size,), domain, np.int32),)
  return predict_volume_patches(lambda x: predict_fn(variables, x, *extra), image, spacing, normalizer=normalizer,
                                data_config=data_config, patch_size=tuple(data_config.patch_size),
                                overlap=overlap, batch_size=batch_size, site=site)


def slice_stack(volume: np.ndarray, context_slices: int) -> np.ndarray:
  """[H, W, Z] -> [Z, H, W, k]: each slice with its k neighbours, clamped at the volume ends."""
  depth = volume.shape[2]
  index = np.clip(np.arange(depth)[:, None] + context_offsets(context_slices)[None, :], 0, depth - 1)
  return np.moveaxis(volume[:, :, index], (2, 3), (0, 3)).astype(np.float32)


def preprocess_for_prediction(image: np.ndarray, spacing, *, normalizer, data_config, site: str | None = None):
  """(volume [X', Y', Z] preprocessed exactly as for training, its in-plane spacing or None)."""
  in_plane_spacing = tuple(data_config.in_plane_spacing) or None
  processed, _ = preprocess_case(image, np.zeros(image.shape, np.uint8), spacing,
                                 normalizer=normalizer, in_plane_shape=tuple(data_config.in_plane_shape),
                                 in_plane_spacing=in_plane_spacing,
                                 bias_correction=data_config.bias_correction,
                                 bias_options=data_config.get("n4"), site=site)
  return processed, in_plane_spacing


def predict_volume(predict_fn, variables, image: np.ndarray, spacing, *, normalizer, data_config,
                   batch_size: int, site: str | None = None, domain: int | None = None) -> np.ndarray:
  """Label map [X, Y, Z] (uint8) on the grid of `image` (RAS+, as loaded). `site`: the volume's
  site, needed when the normalizer is per-site ('site_range'); ignored otherwise. `domain`: the
  volume's domain id for a `make_predict_fn(..., domains=True)` network (methods/base.domain_index)."""
  processed, in_plane_spacing = preprocess_for_prediction(image, spacing, normalizer=normalizer,
                                                          data_config=data_config, site=site)
  stack = slice_stack(processed, data_config.context_slices)
  depth = len(stack)
  padded = -(-depth // batch_size) * batch_size
  stack = np.concatenate([stack, np.zeros((padded - depth,) + stack.shape[1:], stack.dtype)])
  extra = () if domain is None else (np.full((batch_size,), domain, np.int32),)
  labels = np.concatenate([np.asarray(predict_fn(variables, stack[i:i + batch_size], *extra))
                           for i in range(0, padded, batch_size)])[:depth]
  return to_case_grid(np.moveaxis(labels, 0, 2), image.shape, spacing, in_plane_spacing)


def to_case_grid(labels: np.ndarray, image_shape, spacing, in_plane_spacing) -> np.ndarray:
  """Labels [H, W, Z] on the preprocessed grid -> uint8 [X, Y, Z] on the case's own grid: the
  in-plane crop/pad inverted and the in-plane resampling (if any) undone by nearest neighbour."""
  labels = np.asarray(labels).astype(np.uint8)
  if in_plane_spacing:
    resampled_shape = (round(image_shape[0] * spacing[0] / in_plane_spacing[0]),
                       round(image_shape[1] * spacing[1] / in_plane_spacing[1]))
    labels = crop_or_pad(labels, resampled_shape)
    factors = (image_shape[0] / resampled_shape[0], image_shape[1] / resampled_shape[1], 1.0)
    labels = ndimage.zoom(labels, factors, order=0, grid_mode=True, mode="nearest")
  return crop_or_pad(labels, image_shape[:2]).astype(np.uint8)


# --- Sliding-window inference ------------------------------------------------------------
# Sliding-window inference for volumes larger than what a network sees at once (3-D patch
# models): overlapping patches, each prediction weighted by a Gaussian importance map
# (nnU-Net, Isensee et al., Nat. Methods 2021: σ = patch/8 per axis, highest at the patch centre
# where the receptive field is complete), averaged where patches overlap:
#
#     out(x) = Σ_p w(x − s_p) · f(patch_p)(x − s_p) / Σ_p w(x − s_p)
#
# Patches are cut and accumulated on the host and sent to `apply_fn` `batch_size` at a time (the
# last batch padded, so one compiled shape), so the device never holds the whole volume.
#
# Against the references (tests/test_sliding_window.py, MONAI oracle): patch placement and the
# Gaussian are MONAI's (monai.inferers.sliding_window_inference, mode='gaussian',
# sigma_scale=0.125): the same start offsets whenever patch·(1 − overlap) is a whole number (MONAI
# floors a fractional stride, we round it), the same exp(−x²/2σ²) about the patch centre
# (p − 1)/2, and the same output (≤ 1e-5) given the same weights. Three differences: MONAI floors
# its weights at 1e-3 (here only zeros are raised, as nnU-Net does), which changes the blend
# wherever several patches overlap only with their low-weight borders; a volume smaller than the
# patch is zero-padded at the end here, symmetrically by MONAI; and nnU-Net itself spreads its
# steps evenly ((size − patch) / (n − 1), rounded) and centres its Gaussian at p // 2, so both
# differ from nnU-Net's for some sizes (same σ, same idea).


BLENDS = ("gaussian", "constant")


def patch_starts(size: int, patch: int, overlap: float) -> list[int]:
  """Start offsets along one axis: a stride of patch·(1 − overlap) (at least 1), and a last patch
  flush with the end so every voxel is covered."""
  if size <= patch:
    return [0]
  stride = max(1, int(round(patch * (1.0 - overlap))))
  starts = list(range(0, size - patch + 1, stride))
  if starts[-1] != size - patch:
    starts.append(size - patch)
  return starts


def importance_map(patch_size, blend: str = "gaussian", sigma_scale: float = 0.125) -> np.ndarray:
  """The per-voxel weight of a patch's prediction: a separable Gaussian with σ = sigma_scale ·
  patch per axis centred on the patch (max 1; zeros, if any, raised to the smallest positive
  value so every voxel keeps a weight), or ones ('constant')."""
  if blend not in BLENDS:
    raise ValueError(f"blend={blend!r}: use one of {', '.join(BLENDS)}")
  if blend == "constant":
    return np.ones(patch_size, np.float32)
  weight = np.ones((), np.float64)
  for n in patch_size:
    x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
    weight = np.multiply.outer(weight, np.exp(-0.5 * (x / (sigma_scale * n)) ** 2))
  weight = weight / weight.max()
  weight[weight <= 0] = weight[weight > 0].min()
  return weight.astype(np.float32)


def sliding_window_predict(apply_fn, volume, *, patch_size, overlap: float = 0.5, blend: str = "gaussian",
                           batch_size: int = 4) -> np.ndarray:
  """`apply_fn`: [B, *patch_size, C] → [B, *patch_size, K]; `volume`: [*spatial, C] → [*spatial, K]
  (float32), blended as in the module docstring. A volume smaller than the patch along an axis
  is zero-padded at its end for the forward pass and the output cropped back."""
  volume = np.asarray(volume)
  patch_size = tuple(int(p) for p in patch_size)
  spatial = volume.shape[:-1]
  if len(patch_size) != len(spatial):
    raise ValueError(f"patch_size {patch_size} has {len(patch_size)} axes; the volume {volume.shape} has "
                     f"{len(spatial)} spatial axes (+ channels last)")
  if not 0.0 <= overlap < 1.0:
    raise ValueError(f"overlap={overlap}: must be in [0, 1)")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}: must be >= 1")
  padded_shape = tuple(max(s, p) for s, p in zip(spatial, patch_size))
  if padded_shape != spatial:
    pad = [(0, t - s) for s, t in zip(spatial, padded_shape)] + [(0, 0)]
    volume = np.pad(volume, pad)
  weight_map = importance_map(patch_size, blend)
  corners = list(itertools.product(*(patch_starts(s, p, overlap) for s, p in zip(padded_shape, patch_size))))
  total, norm = None, np.zeros(padded_shape, np.float32)
  for first in range(0, len(corners), batch_size):
    chunk = corners[first:first + batch_size]
    patches = np.stack([volume[tuple(slice(c, c + p) for c, p in zip(corner, patch_size))] for corner in chunk])
    if len(chunk) < batch_size:   # one compiled shape for every batch
      patches = np.concatenate([patches, np.zeros((batch_size - len(chunk),) + patches.shape[1:], patches.dtype)])
    logits = np.asarray(apply_fn(patches), np.float32)[:len(chunk)]
    if total is None:
      total = np.zeros(padded_shape + logits.shape[-1:], np.float32)
    for corner, out in zip(chunk, logits):
      where = tuple(slice(c, c + p) for c, p in zip(corner, patch_size))
      total[where] += out * weight_map[..., None]
      norm[where] += weight_map
  result = total / norm[..., None]
  return result[tuple(slice(0, s) for s in spatial)]


def predict_volume_patches(apply_fn, image: np.ndarray, spacing, *, normalizer, data_config, patch_size,
                           overlap: float = 0.5, batch_size: int = 4, site: str | None = None) -> np.ndarray:
  """Label map [X, Y, Z] (uint8) on the grid of `image` from a 3-D patch model: the volume
  preprocessed as for training (as predict_volume, then [Z, H, W, 1] as data/patches.build_volumes
  keeps it), segmented by sliding_window_predict (`apply_fn`: [B, *patch_size, 1] -> logits), the
  argmax mapped back by to_case_grid. `data_config.in_plane_shape` () keeps the in-plane size."""
  processed, in_plane_spacing = preprocess_for_prediction(image, spacing, normalizer=normalizer,
                                                          data_config=data_config, site=site)
  logits = sliding_window_predict(apply_fn, np.moveaxis(processed, 2, 0)[..., None], patch_size=patch_size,
                                  overlap=overlap, batch_size=batch_size)
  return to_case_grid(np.moveaxis(np.argmax(logits, axis=-1), 0, 2), image.shape, spacing, in_plane_spacing)
