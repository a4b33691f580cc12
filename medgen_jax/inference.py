"""Whole-volume prediction, slice by slice in fixed-size batches, back on the original grid.

A volume is preprocessed exactly as for training (normalization, in-plane resampling, crop/pad),
every axial slice is predicted (no truncation to a multiple of the batch size: the last batch
is padded), and the label map is mapped back to the volume's own grid (crop/pad inverted,
in-plane resampling undone by nearest neighbour), so metrics use the file's voxel spacing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from medgen_jax.data.preprocess import context_offsets, crop_or_pad, preprocess_case


def make_predict_fn(model, *, domains: bool = False):
  """jit(variables, images [B, H, W, C]) -> labels [B, H, W] int32 (argmax of the logits); with
  `domains` (a network with domain-specific layers), jit(variables, images, domain [B]) ->
  labels."""
  if domains:
    return jax.jit(lambda variables, x, domain: jnp.argmax(
        model.apply(variables, x, train=False, domain=domain), axis=-1))
  return jax.jit(lambda variables, x: jnp.argmax(model.apply(variables, x, train=False), axis=-1))


def slice_stack(volume: np.ndarray, context_slices: int) -> np.ndarray:
  """[H, W, Z] -> [Z, H, W, k]: each slice with its k neighbours, clamped at the volume ends."""
  depth = volume.shape[2]
  index = np.clip(np.arange(depth)[:, None] + context_offsets(context_slices)[None, :], 0, depth - 1)
  return np.moveaxis(volume[:, :, index], (2, 3), (0, 3)).astype(np.float32)


def predict_volume(predict_fn, variables, image: np.ndarray, spacing, *, normalizer, data_config,
                   batch_size: int, site: str | None = None, domain: int | None = None) -> np.ndarray:
  """Label map [X, Y, Z] (uint8) on the grid of `image` (RAS+, as loaded). `site`: the volume's
  site, needed when the normalizer is per-site ('site_range'); ignored otherwise. `domain`: the
  volume's domain id for a `make_predict_fn(..., domains=True)` network (methods/base.domain_index)."""
  in_plane_spacing = tuple(data_config.in_plane_spacing) or None
  processed, _ = preprocess_case(image, np.zeros(image.shape, np.uint8), spacing,
                                 normalizer=normalizer, in_plane_shape=tuple(data_config.in_plane_shape),
                                 in_plane_spacing=in_plane_spacing,
                                 bias_correction=data_config.bias_correction,
                                 bias_options=data_config.get("n4"), site=site)
  stack = slice_stack(processed, data_config.context_slices)
  depth = len(stack)
  padded = -(-depth // batch_size) * batch_size
  stack = np.concatenate([stack, np.zeros((padded - depth,) + stack.shape[1:], stack.dtype)])
  extra = () if domain is None else (np.full((batch_size,), domain, np.int32),)
  labels = np.concatenate([np.asarray(predict_fn(variables, stack[i:i + batch_size], *extra))
                           for i in range(0, padded, batch_size)])[:depth]
  labels = np.moveaxis(labels, 0, 2).astype(np.uint8)  # [H, W, Z]
  if in_plane_spacing:
    resampled_shape = (round(image.shape[0] * spacing[0] / in_plane_spacing[0]),
                       round(image.shape[1] * spacing[1] / in_plane_spacing[1]))
    labels = crop_or_pad(labels, resampled_shape)
    factors = (image.shape[0] / resampled_shape[0], image.shape[1] / resampled_shape[1], 1.0)
    labels = ndimage.zoom(labels, factors, order=0, grid_mode=True, mode="nearest")
  return crop_or_pad(labels, image.shape[:2]).astype(np.uint8)
