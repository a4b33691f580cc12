"""SIFA's segmentation-side networks (flax.linen, NHWC): encoder e_B, decoder de_B, pixel heads.

SIFA: Chen et al., "Unsupervised Bidirectional Cross-Modality Adaptation via Deeply Synergistic
Image and Feature Alignment for Medical Image Segmentation", IEEE TMI 2020 (cchen-cc/SIFA master);
SIFA-v1: Chen et al., "Synergistic Image and Feature Adaptation", AAAI 2019 (branch SIFA-v1).
Translated from the released TF code, model.py (build_encoder, build_decoder, build_segmenter,
build_resnet_block[_ds], build_drn_block) and layers.py (general_conv2d, dilate_conv2d,
general_deconv2d); methods.md §3.5 and §7. The image generator g_A and the discriminators are in
gan.py (ResNetGenerator, PatchGAN).

Every convolution is SIFA's general_conv2d: conv (no bias, truncated_normal(σ) kernel) → dropout
→ norm → ReLU (or none).

* `SIFAEncoder` (e_B; BN momentum 0.9, eps 1e-3; σ = 0.01; F = `base_features`, 16 in SIFA):
  7×7 conv F → res(F) → 2×2 max pool → res_ds(F→2F) → pool → res_ds(2F→4F), res(4F) → pool →
  res_ds(4F→8F), res(8F) → res_ds(8F→16F), res(16F) ×3 → res_ds(16F→32F), res(32F) [latent_ll]
  → 2 dilated (rate 2) res(32F) → 3×3 conv 32F → 3×3 conv 32F [latent]. 256² → 32×32×512 twice.
  `SIFAResidualBlock` is res / res_ds / the dilated block: relu(x' + norm(conv(relu(norm(conv(x))))))
  with 3×3 convs zero-padded 'SAME' (TF: tf.pad "CONSTANT" + VALID, the same), where x' is x
  zero-padded on the channel axis by (c_out − c_in)/2 on each side when the block widens.
  Submodules carry the TF scope names (c1, r1…r12, d1, d2, c2, c3) to ease weight import.
* `SIFADecoder` (de_B; instance norm, eps 1e-6; σ = 0.02; F = `features`, ngf = 32 in SIFA):
  3×3 conv 4F → `num_blocks` (4) res(4F) → transposed 3×3 stride-2 convs to 2F, 2F, F (each with
  IN + ReLU) → 7×7 'SAME' conv to `out_channels` → tanh(image + out) (`skip`, SIFA's skip = 1) or
  tanh(out). A 32×32 latent gives a 256×256 image.
* `PixelClassifier` (s_B, s_B_ll): 1×1 conv to `num_classes` logits → bilinear resize to
  `out_shape`. Output float32 logits.
* `SIFASegmenter`: what is evaluated, encoder + s_B (+ s_B_ll on latent_ll, `deep_supervision`,
  TMI; SIFA-v1 has none).

Deliberate differences from the TF code:
* Dropout (`dropout_rate` = 1 − keep_rate; TMI keep_rate 1.0 → 0, v1 0.75 → 0.25) is active only
  with train=True; TF's tf.nn.dropout also ran at evaluation (evaluate.py feeds keep_rate 1).
* The decoder's residual blocks are gan.ResidualBlock, without dropout: TF's build_resnet_block
  defaults keep_rate to 0.75 and build_decoder does not pass it, so de_B dropped 25% of its
  residual-block activations even in the TMI config. Their σ is TF's hard-coded 0.01.
* No biases before a norm: TF's dilate_conv2d and general_deconv2d add a zero-initialised bias that
  the following BN / IN removes, so only the parameter counts differ (e_B by 4·32F, de_B by 5F).
* PixelClassifier uses jax.image.resize (half-pixel centres); TF1's resize_images uses the legacy
  mapping (input i·in/out), a ≤ ½-pixel shift — irrelevant when training from scratch (§7); only a
  bit-faithful import of the released weights would need the legacy sampling.
* H and W must be multiples of 8 (three 2×2 pools, and the decoder's three 2× upsamplings back);
  TF's 'SAME' pooling accepted any size but the decoder's output shapes were hard-coded to 256.

Parameters are float32; `dtype` is the compute dtype; logits and images are returned in float32.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from medgen_jax.models.gan import ResidualBlock, _conv
from medgen_jax.models.norms import make_norm


def _general_conv(module: nn.Module, x, features: int, kernel: int, *, norm, train: bool,
                  relu: bool = True, dilation: int = 1, name: str):
  """SIFA's general_conv2d / dilate_conv2d: conv → dropout → norm → ReLU, 'SAME' zero padding.

  gan._conv has no dilation; 'SAME' with rhs dilation 2 pads 2 on each side, TF's tf.pad 2 +
  atrous VALID. `module` provides init_stddev, dropout_rate and dtype.
  """
  y = nn.Conv(features, (kernel, kernel), padding="SAME", kernel_dilation=(dilation, dilation),
              use_bias=False, kernel_init=nn.initializers.truncated_normal(module.init_stddev),
              dtype=module.dtype, param_dtype=jnp.float32, name=name)(x)
  y = nn.Dropout(module.dropout_rate, deterministic=not train)(y)
  y = norm(name=f"{name}_norm")(y, train=train)
  return nn.relu(y) if relu else y


class SIFAResidualBlock(nn.Module):
  """SIFA's res / res_ds / dilated block (build_resnet_block[_ds], build_drn_block), with BN.

  relu(x' + norm(conv(relu(norm(conv(x)))))) with 3×3 zero-padded convs to `features` at
  `dilation`; x' is x zero-padded on the channel axis by (features − c_in)/2 on each side.
  """

  features: int
  dilation: int = 1
  dropout_rate: float = 0.0
  bn_axis_name: str | None = None
  init_stddev: float = 0.01
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    widen = self.features - x.shape[-1]
    if widen < 0 or widen % 2:
      raise ValueError(f"SIFAResidualBlock widens the channels symmetrically: features "
                       f"({self.features}) minus input channels ({x.shape[-1]}) must be even and "
                       f">= 0")
    norm = make_norm("batch", axis_name=self.bn_axis_name, dtype=self.dtype)
    y = x
    for i in range(2):
      y = _general_conv(self, y, self.features, 3, norm=norm, train=train, relu=i == 0,
                        dilation=self.dilation, name=f"c{i + 1}")
    shortcut = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (widen // 2, widen // 2)))
    return nn.relu(shortcut + y)


class SIFAEncoder(nn.Module):
  """SIFA's shared encoder e_B: image → (latent, latent_ll), both [B, H/8, W/8, 32F]."""

  base_features: int = 16
  dropout_rate: float = 0.0            # 1 − keep_rate: TMI 0.0, SIFA-v1 0.25
  bn_axis_name: str | None = None      # pmap axis for global BN statistics
  init_stddev: float = 0.01
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    if x.ndim != 4:
      raise ValueError(f"SIFAEncoder needs NHWC images [B, H, W, C], got shape {x.shape}")
    if x.shape[1] % 8 or x.shape[2] % 8:
      raise ValueError(f"SIFA's encoder pools 3 times (and its decoder upsamples 3 times): height "
                       f"and width must be multiples of 8, got {x.shape[1]}x{x.shape[2]}")
    f = self.base_features
    norm = make_norm("batch", axis_name=self.bn_axis_name, dtype=self.dtype)

    def block(y, features, name, dilation=1):
      return SIFAResidualBlock(features, dilation, self.dropout_rate, self.bn_axis_name,
                               self.init_stddev, self.dtype, name=name)(y, train=train)

    def pool(y):
      return nn.max_pool(y, (2, 2), strides=(2, 2), padding="SAME")

    y = _general_conv(self, x.astype(self.dtype), f, 7, norm=norm, train=train, name="c1")
    y = pool(block(y, f, "r1"))
    y = pool(block(y, 2 * f, "r2"))
    y = pool(block(block(y, 4 * f, "r3"), 4 * f, "r4"))
    y = block(block(y, 8 * f, "r5"), 8 * f, "r6")
    for i, features in enumerate((16 * f,) * 4 + (32 * f,) * 2):
      y = block(y, features, f"r{7 + i}")
    latent_ll = y
    y = block(block(y, 32 * f, "d1", dilation=2), 32 * f, "d2", dilation=2)
    for name in ("c2", "c3"):
      y = _general_conv(self, y, 32 * f, 3, norm=norm, train=train, name=name)
    return y, latent_ll


class SIFADecoder(nn.Module):
  """SIFA's decoder de_B: (latent [B, h, w, C], image [B, 8h, 8w, c]) → image in [−1, 1]."""

  features: int = 32                   # SIFA's ngf
  num_blocks: int = 4
  out_channels: int = 1
  skip: bool = True                    # SIFA: tanh(image + out)
  init_stddev: float = 0.02
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, latent, image, *, train: bool = False):
    if latent.ndim != 4 or image.ndim != 4 or (
        latent.shape[1] * 8, latent.shape[2] * 8) != tuple(image.shape[1:3]):
      raise ValueError(f"SIFADecoder upsamples 8x: the image's height and width must be 8 times the "
                       f"latent's, got latent {latent.shape} and image {image.shape}")
    channels = image.shape[-1]
    if self.skip:
      if self.out_channels == channels:
        residual = image
      elif self.out_channels == 1 and channels % 2 == 1:
        residual = image[..., channels // 2:channels // 2 + 1]   # SIFA-v1: the middle slice
      else:
        raise ValueError(f"skip=True adds the image to the output: out_channels "
                         f"({self.out_channels}) must equal the image channels ({channels}), or be "
                         f"1 with an odd number of image channels (the middle one is added)")
    norm = make_norm("instance", dtype=self.dtype)
    f = self.features
    y = _conv(self, 4 * f, 3, padding="SAME", use_bias=False, name="c1")(latent.astype(self.dtype))
    y = nn.relu(norm(name="c1_norm")(y, train=train))
    for i in range(self.num_blocks):
      # TF's build_resnet_block fixes σ = 0.01 whatever the caller's σ.
      y = ResidualBlock(4 * f, "constant", "instance", 0.01, self.dtype, name=f"r{i + 1}")(
          y, train=train)
    for i, features in enumerate((2 * f, 2 * f, f)):
      # As gan.ResNetGenerator's 'transpose' upsampling: TF's conv2d_transpose, 'SAME', stride 2.
      y = nn.ConvTranspose(features, (3, 3), strides=(2, 2), padding="SAME", transpose_kernel=True,
                           use_bias=False, kernel_init=nn.initializers.truncated_normal(self.init_stddev),
                           dtype=self.dtype, param_dtype=jnp.float32, name=f"c{3 + i}")(y)
      y = nn.relu(norm(name=f"c{3 + i}_norm")(y, train=train))
    # TF: general_conv2d without norm or ReLU, so no bias either.
    y = _conv(self, self.out_channels, 7, padding="SAME", use_bias=False, name="c6")(y)
    y = y.astype(jnp.float32)
    if self.skip:
      y = y + residual.astype(jnp.float32)
    return jnp.tanh(y)


class PixelClassifier(nn.Module):
  """SIFA's s_B / s_B_ll: 1×1 conv to logits, then bilinear resize to `out_shape` (H, W).

  jax.image.resize(method='linear') samples at half-pixel centres, TF1's resize_images at the
  legacy input i·in/out: a ≤ ½-pixel shift, irrelevant when training from scratch (methods.md §7).
  """

  num_classes: int
  out_shape: tuple[int, int]
  dropout_rate: float = 0.0
  init_stddev: float = 0.01
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    y = _conv(self, self.num_classes, 1, use_bias=False, name="c8")(x.astype(self.dtype))
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y).astype(jnp.float32)
    return jax.image.resize(y, (y.shape[0], *self.out_shape, self.num_classes), method="linear")


class SIFASegmenter(nn.Module):
  """Encoder e_B + pixel classifier s_B (+ s_B_ll on latent_ll): logits [B, H, W, K]."""

  num_classes: int
  base_features: int = 16
  deep_supervision: bool = True        # TMI's s_B_ll; SIFA-v1: False
  dropout_rate: float = 0.0
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False, return_all: bool = False):
    latent, latent_ll = SIFAEncoder(self.base_features, self.dropout_rate, self.bn_axis_name,
                                    dtype=self.dtype, name="encoder")(x, train=train)
    size = tuple(x.shape[1:3])
    logits = PixelClassifier(self.num_classes, size, self.dropout_rate, dtype=self.dtype,
                             name="classifier")(latent, train=train)
    out = {"logits": logits, "latent": latent, "latent_ll": latent_ll}
    if self.deep_supervision:
      # Always applied, so that init creates its parameters even when only logits are returned.
      out["logits_ll"] = PixelClassifier(self.num_classes, size, self.dropout_rate, dtype=self.dtype,
                                         name="classifier_ll")(latent_ll, train=train)
    return out if return_all else logits


__all__ = ["PixelClassifier", "SIFADecoder", "SIFAEncoder", "SIFAResidualBlock", "SIFASegmenter"]
