"""2-D U-Net (Ronneberger et al., MICCAI 2015) in flax.linen.

Encoder blocks of `base_features · 2^level` channels (16-32-64-128 by default), bottleneck
`base_features · 2^depth` (256); each block = 2 × (3×3 conv without bias → norm → ReLU);
2×2 max-pool down; 2×2 stride-2 transposed conv up (with bias); skip concatenation; 1×1 head to
`num_classes` logits. It is the architecture of the PyTorch performance anchor
(../shared/anchors/unet_torch.py). Dropout (rate `dropout`) sits after the bottleneck.

Four layers are written in an equivalent form that XLA:CPU runs much faster, without changing
what the model computes (`fast_ops=True`; `False` gives the textbook flax layers, for the
benchmark). Both variants have the same parameter tree except the head kernel ([C, K] here,
[1, 1, C, K] for the 1×1 nn.Conv), and compute the same function (tests/test_ops.py):
* 3×3 convolutions through models/ops.conv_same, whose second derivatives stay standard
  convolutions (meta-learning's gradient-of-gradient otherwise hits non-canonical layouts);
* 2×2/stride-2 transposed conv = a per-pixel matmul to 4·C_out channels + depth-to-space: the
  windows do not overlap, so out[2i+a, 2j+b, o] = b_o + Σ_c x[i, j, c]·K[1-a, 1-b, c, o] exactly,
  which is nn.ConvTranspose(features, (2, 2), strides=(2, 2)) with the same kernel (lax's
  transposed conv without `transpose_kernel` does not flip the kernel, hence the 1-a, 1-b).
  XLA:CPU's weight gradient of the transposed conv was ~30 % of the step.
* 2×2 max-pool as a reshape + a pick of each window's first maximum (same values and, at ties,
  the same gradient as nn.max_pool).
* the 1×1 head as a Dense on the channel axis: a second-order gradient through a 1×1 conv lowers
  to a huge padded convolution on XLA:CPU (the meta-learning trap).

Domain-specific options (models/adapters.py; off by default, the parameter tree then unchanged):
residual adapters at every 3×3 conv (`adapter` 'series' | 'parallel', Rebuffi et al.) and
squeeze-and-excitation after the blocks of `se_blocks` (`se` 'shared' | 'domain', USE-Net), each
picked per sample by `domain` when per domain.

Every derivative works with either variant, forward mode included (jax.jvp, jax.jacfwd,
jax.hessian): conv_same is a pair of bilinear JAX primitives with their own transposes, not a
custom_vjp (see models/ops.py).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from medgen_jax.models.adapters import ParallelAdapter, SeriesAdapter, SqueezeExcite, check_options
from medgen_jax.models.norms import make_norm
from medgen_jax.models.ops import check_odd_kernel, conv_same


class UpConv2x2(nn.Module):
  """nn.ConvTranspose(features, (2, 2), strides=(2, 2)) as matmul + depth-to-space.

  Same parameters (kernel [2, 2, C, features], bias [features]) and the same function: lax's
  transposed convolution (transpose_kernel=False) correlates the stride-dilated input with the
  unflipped kernel, so output pixel (2i+a, 2j+b) sees kernel tap (1-a, 1-b); the einsum reads the
  kernel rotated by 180° to match (a reverse of a 2×2×C×O array: free)."""

  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (2, 2, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
    b, h, w, _ = x.shape
    y = jnp.einsum("nhwc,abco->nhawbo", x, kernel[::-1, ::-1])
    return y.reshape(b, 2 * h, 2 * w, self.features) + bias


class ConvSame(nn.Module):
  """nn.Conv(features, (k, k), padding="SAME", use_bias=False) through models/ops.conv_same,
  whose derivatives of every order stay standard convolutions. `kernel_size` must be odd: an
  even one raises a ValueError (see models/ops.check_odd_kernel) before any parameter is made."""

  features: int
  kernel_size: int = 3
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    check_odd_kernel((k, k, x.shape[-1], self.features))
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features))
    return conv_same(x.astype(self.dtype), kernel.astype(self.dtype))


def max_pool_2x2(x):
  """nn.max_pool(x, (2, 2), strides=(2, 2)) (padding 'VALID': an odd last row/column is
  dropped) over the non-overlapping windows, by a reshape.

  The maximum is picked by index (the first maximal element of each window, as nn.max_pool's
  gradient does at ties), not with `max`: JAX differentiates `max` as g·[x == max] / count, which
  is 0/0 = NaN wherever XLA recomputes the window's input with other rounding than the max saw
  (seen at XLA:CPU's -O0 behind a norm layer; fusion may duplicate work on other backends too),
  and splits the gradient between tied elements."""
  b, h, w, c = x.shape
  x = x[:, :h - h % 2, :w - w % 2]
  windows = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, h // 2, w // 2, c, 4)
  first_max = jax.nn.one_hot(jnp.argmax(windows, axis=-1), 4, dtype=x.dtype)
  return jnp.sum(windows * first_max, axis=-1)


class ConvBlock(nn.Module):
  """2 × (3×3 conv → norm → ReLU). Optional domain-specific parts (models/adapters.py), absent
  (and the parameter tree unchanged) with the defaults: a residual adapter after each 3×3 conv
  (`adapter` 'series': `adapter{i}` in series on the conv output; 'parallel': a 1×1 conv of the
  conv's input added to its output), and a squeeze-and-excitation block on the block's output
  (`se` 'shared' | 'domain': `se`)."""

  features: int
  norm: str = "batch"
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  fast_ops: bool = True
  num_domains: int = 1
  adapter: str = "none"             # none | series | parallel (Rebuffi et al.)
  se: str = "none"                  # none | shared | domain (Hu et al.; USE-Net)
  se_reduction: int = 8

  @nn.compact
  def __call__(self, x, *, train: bool, domain=None):
    norm = make_norm(self.norm, axis_name=self.bn_axis_name, num_domains=self.num_domains, dtype=self.dtype)
    for i in range(2):
      inputs = x
      if self.fast_ops:
        x = ConvSame(self.features, dtype=self.dtype, name=f"conv{i}")(x)
      else:
        x = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype,
                    param_dtype=jnp.float32, name=f"conv{i}")(x)
      if self.adapter == "series":
        x = SeriesAdapter(self.num_domains, axis_name=self.bn_axis_name, dtype=self.dtype,
                          name=f"adapter{i}")(x, train=train, domain=domain)
      elif self.adapter == "parallel":
        x = x + ParallelAdapter(self.features, self.num_domains, dtype=self.dtype,
                                name=f"adapter{i}")(inputs, domain=domain).astype(x.dtype)
      x = nn.relu(norm(name=f"norm{i}")(x, train=train, domain=domain))
    if self.se != "none":
      x = SqueezeExcite(self.num_domains, self.se_reduction, per_domain=self.se == "domain",
                        dtype=self.dtype, name="se")(x, domain=domain)
    return x


class UNet(nn.Module):
  num_classes: int
  base_features: int = 16
  depth: int = 4
  dropout: float = 0.0
  norm: str = "batch"
  bn_axis_name: str | None = None   # set for synchronized BatchNorm across devices
  dtype: jnp.dtype = jnp.float32    # compute dtype; parameters stay float32
  fast_ops: bool = True
  num_domains: int = 1              # domain-specific layers (norm 'dsbn'): one set per domain
  # Domain-specific parts on the shared U-Net (models/adapters.py); none with the defaults.
  adapter: str = "none"             # none | series | parallel: a residual adapter at every 3×3 conv
  se: str = "none"                  # none | shared | domain: squeeze-and-excitation (USE-Net)
  se_reduction: int = 8             # SE reduction ratio r (hidden width C // r, at least 1)
  se_blocks: str = "encoder_decoder"  # encoder (down*, bottleneck) | encoder_decoder (+ up*)

  @nn.compact
  def __call__(self, x, *, train: bool = False, domain=None, return_features: bool = False,
               return_levels: bool = False):
    """Logits [B, H, W, classes] (float32); with `return_features`, also the last decoder
    block's output [B, H, W, base_features] (the semantic features MASF/SAML embed); with
    `return_levels`, (logits, {name: output}) of every block: down0 .. down{depth-1} (encoder,
    before pooling), bottleneck (after dropout), up{depth-1} .. up0 (decoder), which the
    feature-level adaptation methods feed to their discriminators. `domain` (int [B]): each
    sample's domain id, read by the domain-specific layers (models/domains.py)."""
    if x.shape[1] % 2 ** self.depth or x.shape[2] % 2 ** self.depth:
      raise ValueError(f"input {x.shape[1]}x{x.shape[2]} must be divisible by 2^depth = "
                       f"{2 ** self.depth} (config data.in_plane_shape / model.depth)")
    check_options(adapter=self.adapter, se=self.se, se_reduction=self.se_reduction, se_blocks=self.se_blocks)
    se_in = lambda name: self.se if (self.se_blocks == "encoder_decoder" or not name.startswith("up")) else "none"
    block = lambda f, name: ConvBlock(f, self.norm, self.bn_axis_name, self.dtype, self.fast_ops,
                                      self.num_domains, adapter=self.adapter, se=se_in(name),
                                      se_reduction=self.se_reduction, name=name)
    x = x.astype(self.dtype)
    skips, levels = [], {}
    for level in range(self.depth):
      x = block(self.base_features * 2 ** level, f"down{level}")(x, train=train, domain=domain)
      skips.append(x)
      levels[f"down{level}"] = x
      x = max_pool_2x2(x) if self.fast_ops else nn.max_pool(x, (2, 2), strides=(2, 2))
    x = block(self.base_features * 2 ** self.depth, "bottleneck")(x, train=train, domain=domain)
    if self.dropout > 0:
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    levels["bottleneck"] = x
    for level in reversed(range(self.depth)):
      features = self.base_features * 2 ** level
      if self.fast_ops:
        x = UpConv2x2(features, self.dtype, name=f"upconv{level}")(x)
      else:
        x = nn.ConvTranspose(features, (2, 2), strides=(2, 2), dtype=self.dtype,
                             param_dtype=jnp.float32, name=f"upconv{level}")(x)
      x = block(features, f"up{level}")(jnp.concatenate([x, skips[level]], axis=-1), train=train,
                                               domain=domain)
      levels[f"up{level}"] = x
    if self.fast_ops:
      logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name="head")(x)
    else:
      logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, param_dtype=jnp.float32,
                       name="head")(x)
    logits = logits.astype(jnp.float32)
    if return_levels:
      return logits, levels
    return (logits, x) if return_features else logits
