"""3-D U-Net (Çiçek et al., MICCAI 2016) with nnU-Net's anisotropic pooling (Isensee et al.,
Nat. Methods 2021), in flax.linen: patches [B, D, H, W, C] -> logits [B, D, H, W, K].

The 2-D model's design (models/unet.py) in three dimensions, with the same factories and the
same parameter-tree names (`down{l}`, `bottleneck`, `upconv{l}`, `up{l}`, `head`; each block
`conv0`, `norm0`, `conv1`, `norm1`), so consumers of `return_levels` work unchanged: encoder
blocks of `base_features · 2^level` channels, bottleneck `base_features · 2^depth`, each block
= 2 × (conv without bias → norm (models/norms.make_norm) → ReLU), max-pool down, transposed
conv up (kernel = stride, with bias), skip concatenation, a 1×1×1 head; dropout after the
bottleneck.

Anisotropy (thick slices). Level `l` pools by `pool_sizes[l]` (per axis 1 or 2, e.g. (1, 2, 2)
keeps the slice axis) and its blocks convolve with `kernel_sizes[l]` (odd per axis, e.g.
(1, 3, 3)); `kernel_sizes[depth]` is the bottleneck's. Empty (the default) = 2 and 3 on every
axis. `plan_pooling(patch_size, spacing, depth)` derives both from the voxel spacing with
nnU-Net's rule (nnunetv2 experiment_planning get_pool_and_conv_props): at each level an axis is
pooled when its current spacing is within a factor 2 of the finest current spacing and its
feature map is still at least 2 × `min_feature_map` voxels; its kernel becomes 3 (and stays 3)
once its spacing is within a factor 2 of the finest, 1 before; pooling doubles the axis' spacing.
Unlike nnU-Net the number of levels is the config's `depth` (not as many as fit), so a patch too
small for `depth` levels is an error.

Fast layers (`fast_ops=True`; False gives the textbook flax layers, same function and the same
parameter tree except the head kernel), generalizing the 2-D ones of models/unet.py:
* the stride-s transposed conv (kernel = stride, non-overlapping windows) = a per-voxel matmul to
  prod(s)·C_out channels + depth-to-space: out[s·i + a, o] = b_o + Σ_c x[i, c]·K[s − 1 − a, c, o]
  per axis, i.e. nn.ConvTranspose(features, s, strides=s) with the same kernel (lax's transposed
  conv does not flip the kernel, hence s − 1 − a);
* max-pool over non-overlapping windows by a reshape and a pick of each window's first maximum
  (nn.max_pool's values and, at ties, its gradient);
* the 1×1×1 head as a Dense on the channel axis.
The 3-D convolutions are nn.Conv (lax's N-D convolution): models/ops.conv_same, which keeps
second-order gradients in canonical layouts for the 2-D meta-learning methods, is 2-D only.
Adapters and squeeze-and-excitation (models/adapters.py) are not built in 3-D.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medgen_jax.models.norms import make_norm


def _prod(values) -> int:
  return int(np.prod(values, dtype=np.int64))


class UpConv(nn.Module):
  """nn.ConvTranspose(features, strides, strides=strides) (kernel = stride, 'SAME') over any
  number of spatial axes, as a matmul + depth-to-space: same parameters (kernel
  [*strides, C, features], bias [features]) and the same function (see the module docstring)."""

  features: int
  strides: Sequence[int]
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    strides = tuple(int(s) for s in self.strides)
    n = len(strides)
    kernel = self.param("kernel", nn.initializers.lecun_normal(), strides + (x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
    flipped = kernel[tuple(slice(None, None, -1) for _ in range(n))]
    space, taps = "pqrstu"[:n], "PQRSTU"[:n]   # input positions, kernel taps (letters not n, c, o)
    y = jnp.einsum(f"n{space}c,{taps}co->n{''.join(s + t for s, t in zip(space, taps))}o", x, flipped)
    shape = (x.shape[0],) + tuple(size * s for size, s in zip(x.shape[1:-1], strides)) + (self.features,)
    return y.reshape(shape) + bias


def max_pool(x, window: Sequence[int]):
  """nn.max_pool(x, window, strides=window) (padding 'VALID': a remainder along an axis is
  dropped) by a reshape, for x [B, *spatial, C] of any number of spatial axes. The maximum is
  picked by index (each window's first maximal element in row-major order, as nn.max_pool's
  gradient does at ties), never with `max`, whose derivative is g·[x == max] / count (see
  models/unet.max_pool_2x2)."""
  window = tuple(int(p) for p in window)
  n = len(window)
  if x.ndim != n + 2:
    raise ValueError(f"max_pool: a {n}-axis window {window} for an input of shape {x.shape}")
  b, c = x.shape[0], x.shape[-1]
  out = tuple(size // p for size, p in zip(x.shape[1:-1], window))
  x = x[(slice(None),) + tuple(slice(0, o * p) for o, p in zip(out, window))]
  split = x.reshape((b,) + tuple(v for o, p in zip(out, window) for v in (o, p)) + (c,))
  order = (0,) + tuple(1 + 2 * i for i in range(n)) + (2 * n + 1,) + tuple(2 + 2 * i for i in range(n))
  windows = split.transpose(order).reshape((b,) + out + (c, _prod(window)))
  first_max = jax.nn.one_hot(jnp.argmax(windows, axis=-1), _prod(window), dtype=x.dtype)
  return jnp.sum(windows * first_max, axis=-1)


def plan_pooling(patch_size: Sequence[int], spacing: Sequence[float], depth: int, *,
                 min_feature_map: int = 4) -> tuple[tuple, tuple]:
  """(pool_sizes, kernel_sizes) for `depth` levels by nnU-Net's rule (module docstring):
  `pool_sizes` has `depth` per-axis tuples of 1/2, `kernel_sizes` `depth + 1` of 1/3 (the last
  for the bottleneck). One clear ValueError when the patch cannot be pooled `depth` times."""
  size = [int(p) for p in patch_size]
  current = [float(s) for s in spacing]
  if len(size) != len(current):
    raise ValueError(f"patch size {tuple(patch_size)} and spacing {tuple(spacing)} have different axes")
  kernel = [1] * len(size)
  pools, kernels = [], []

  def update_kernel():
    finest = min(current)
    for axis, s in enumerate(current):
      if s / finest < 2:
        kernel[axis] = 3
    kernels.append(tuple(kernel))

  for level in range(depth):
    update_kernel()
    finest = min(current)
    axes = [a for a in range(len(size))
            if current[a] / finest < 2 and size[a] >= 2 * min_feature_map and size[a] % 2 == 0]
    if not axes:
      raise ValueError(f"patch {tuple(patch_size)} (spacing {tuple(spacing)}) cannot be pooled {depth} times: "
                       f"level {level} has feature maps {tuple(size)}, none even and >= {2 * min_feature_map} along "
                       f"an axis within 2x of the finest spacing. Fix: a larger data.patch_size or a smaller model.depth")
    pools.append(tuple(2 if a in axes else 1 for a in range(len(size))))
    for a in axes:
      size[a] //= 2
      current[a] *= 2
  update_kernel()
  return tuple(pools), tuple(kernels)


def _levels(values, count: int, default: int, *, what: str, rank: int) -> tuple:
  """Per-level per-axis sizes: `values` (count tuples of `rank` ints) or `default` everywhere."""
  if not values:
    return ((default,) * rank,) * count
  values = tuple(tuple(int(v) for v in level) for level in values)
  if len(values) != count or any(len(level) != rank for level in values):
    raise ValueError(f"model.{what}={values}: needs {count} entries of {rank} sizes each "
                     f"(one per {'level' if what == 'pool_sizes' else 'level and the bottleneck'})")
  return values


def check_levels(patch_size: Sequence[int], *, depth: int, pool_sizes=(), kernel_sizes=()) -> tuple[tuple, tuple]:
  """(pool_sizes, kernel_sizes) per level with the defaults filled in, checked against a patch
  [D, H, W]: pools 1 or 2, kernels odd, and each patch axis divisible by the product of its
  pools. One clear ValueError naming the config keys otherwise (UNet3D and config.validate)."""
  rank = len(patch_size)
  pools = _levels(pool_sizes, depth, 2, what="pool_sizes", rank=rank)
  kernels = _levels(kernel_sizes, depth + 1, 3, what="kernel_sizes", rank=rank)
  if any(p not in (1, 2) for level in pools for p in level):
    raise ValueError(f"model.pool_sizes={pools}: each size must be 1 or 2")
  if any(k < 1 or k % 2 == 0 for level in kernels for k in level):
    raise ValueError(f"model.kernel_sizes={kernels}: each size must be odd ('SAME' padding)")
  divisor = tuple(_prod([level[a] for level in pools]) for a in range(rank))
  if any(int(size) % d for size, d in zip(patch_size, divisor)):
    raise ValueError(f"patch {tuple(int(s) for s in patch_size)} must be divisible by {divisor} per axis, the "
                     f"product of model.pool_sizes {pools} (config data.patch_size / model.depth)")
  return pools, kernels


class ConvBlock3D(nn.Module):
  """2 × (conv `kernel_size` without bias → norm → ReLU), named as models/unet.ConvBlock."""

  features: int
  kernel_size: Sequence[int] = (3, 3, 3)
  norm: str = "batch"
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  num_domains: int = 1

  @nn.compact
  def __call__(self, x, *, train: bool, domain=None):
    norm = make_norm(self.norm, axis_name=self.bn_axis_name, num_domains=self.num_domains, dtype=self.dtype)
    for i in range(2):
      x = nn.Conv(self.features, tuple(self.kernel_size), padding="SAME", use_bias=False, dtype=self.dtype,
                  param_dtype=jnp.float32, name=f"conv{i}")(x)
      x = nn.relu(norm(name=f"norm{i}")(x, train=train, domain=domain))
    return x


class UNet3D(nn.Module):
  num_classes: int
  base_features: int = 16
  depth: int = 4
  dropout: float = 0.0
  norm: str = "batch"
  bn_axis_name: str | None = None   # set for synchronized BatchNorm across devices
  dtype: jnp.dtype = jnp.float32    # compute dtype; parameters stay float32
  fast_ops: bool = True
  num_domains: int = 1              # domain-specific layers (norm 'dsbn'): one set per domain
  pool_sizes: tuple = ()            # `depth` per-axis pool sizes (1 | 2); () = 2 everywhere
  kernel_sizes: tuple = ()          # `depth + 1` per-axis odd kernel sizes; () = 3 everywhere

  @nn.compact
  def __call__(self, x, *, train: bool = False, domain=None, return_features: bool = False,
               return_levels: bool = False):
    """Logits [B, D, H, W, classes] (float32) for patches [B, D, H, W, C]; `return_features`,
    `return_levels` and `domain` as in models/unet.UNet."""
    if x.ndim != 5:
      raise ValueError(f"UNet3D needs patches [B, D, H, W, C], got shape {x.shape}")
    rank = x.ndim - 2
    pools, kernels = check_levels(x.shape[1:-1], depth=self.depth, pool_sizes=self.pool_sizes,
                                  kernel_sizes=self.kernel_sizes)
    block = lambda f, kernel, name: ConvBlock3D(f, kernel, self.norm, self.bn_axis_name, self.dtype,
                                                self.num_domains, name=name)
    x = x.astype(self.dtype)
    skips, levels = [], {}
    for level in range(self.depth):
      x = block(self.base_features * 2 ** level, kernels[level], f"down{level}")(x, train=train, domain=domain)
      skips.append(x)
      levels[f"down{level}"] = x
      x = max_pool(x, pools[level]) if self.fast_ops else nn.max_pool(x, pools[level], strides=pools[level])
    x = block(self.base_features * 2 ** self.depth, kernels[self.depth], "bottleneck")(x, train=train, domain=domain)
    if self.dropout > 0:
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    levels["bottleneck"] = x
    for level in reversed(range(self.depth)):
      features = self.base_features * 2 ** level
      if self.fast_ops:
        x = UpConv(features, pools[level], self.dtype, name=f"upconv{level}")(x)
      else:
        x = nn.ConvTranspose(features, pools[level], strides=pools[level], dtype=self.dtype,
                             param_dtype=jnp.float32, name=f"upconv{level}")(x)
      x = block(features, kernels[level], f"up{level}")(jnp.concatenate([x, skips[level]], axis=-1),
                                                        train=train, domain=domain)
      levels[f"up{level}"] = x
    if self.fast_ops:
      logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name="head")(x)
    else:
      logits = nn.Conv(self.num_classes, (1,) * rank, dtype=self.dtype, param_dtype=jnp.float32, name="head")(x)
    logits = logits.astype(jnp.float32)
    if return_levels:
      return logits, levels
    return (logits, x) if return_features else logits
