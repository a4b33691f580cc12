"""Generators and discriminators for adversarial domain adaptation (flax.linen, NHWC).

* `ResNetGenerator` — CycleGAN's ResNet generator (Johnson et al. 2016; Zhu et al., ICCV 2017) as
  SIFA's image generator g_A (cchen-cc/SIFA model.py::build_generator_resnet_9blocks; methods.md
  §3.5): pad 3 → 7×7 conv F → 3×3 stride-2 conv 2F → 3×3 stride-2 conv 4F → `num_blocks`
  residual blocks at 4F (pad 1, 3×3 conv, norm, ReLU, pad 1, 3×3 conv, norm; `relu(x + F(x))`
  as SIFA's build_resnet_block_ins) → two stride-2 upsamplings (2F, F) → pad 3 → 7×7 conv to
  `out_features` → tanh. Every conv but the last is followed by the norm (instance norm) and a
  ReLU. F = `base_features` (SIFA ngf = 32, CycleGAN 64); 9 blocks for 256² images (6 in
  CycleGAN for 128²); a tiny test config uses 1–2.
  - `padding_mode` of the explicit pads: 'reflect' (CycleGAN) or 'constant' (zeros): SIFA's
    g_A uses `padding = "CONSTANT"` for the first conv and the residual blocks and a zero-'SAME'
    last 7×7 conv, i.e. SIFA = 'constant'.
  - `upsampling`: 'transpose' (default, what SIFA uses: layers.general_deconv2d =
    tf.contrib.layers.conv2d_transpose, 3×3, stride 2, 'SAME') = nn.ConvTranspose with
    `transpose_kernel=True`, which is TF's conv2d_transpose exactly (the input-gradient of a
    'SAME' stride-2 conv; kernel [3, 3, out, in] as TF's; tests/test_adversarial.py checks it);
    'resize' = nearest 2× upsampling + 3×3 conv (Odena et al., Distill 2016: no checkerboard).
  - `skip` (SIFA `skip = 1`): output tanh(x + out) instead of tanh(out), so the generator learns
    a residual on its input image; `out_features` must equal the input channels, or be 1 with an
    odd number of input channels (the middle slice is added, as SIFA-v1's 3-slice input).
  - Height and width must be multiples of 4 (two stride-2 steps and back); others raise.
* `PatchGAN` — the 70×70 PatchGAN discriminator (Isola et al., CVPR 2017; CycleGAN; SIFA's d_A,
  d_B, d_P): zero pad `pad` → 4×4 conv, stride 2, F (no norm) → `num_layers` − 1 more stride-2
  convs F·2^n (capped at 8F) with norm → one stride-1 conv F·min(2^num_layers, 8) with norm →
  one stride-1 conv to `out_features`; leaky ReLU 0.2 after every conv but the last. With
  num_layers = 3 the receptive field is 70×70 pixels. Output map size per spatial axis, from
  n ↦ ⌊(n + 2·pad − 4) / s⌋ + 1: SIFA's pad 2 (tf.pad 2 + VALID) gives 256 → 129 → 65 → 33 →
  34 → 35, a 35×35 map; pix2pix/CycleGAN-PyTorch's pad 1 gives 256 → 128 → 64 → 32 → 31 → 30.
  `out_features = 2` is SIFA's d_A with its auxiliary head (channel 0 image real/fake, channel
  1 the auxiliary "reconstructed source" output; both share the trunk, only the last conv is
  wider). SIFA's discriminator convs have no bias (`use_bias=False`); by default the two convs
  without a norm (first and last) have one, as pix2pix.
* `FeatureDiscriminator` — a small fully-convolutional domain classifier / WGAN critic on
  feature maps (DANN, ADDA, PnP-AdaNet's feature critic in spirit; PnP's exact DCM is a deeper
  residual critic on a 32-channel multi-level stack, methods.md §3.4): `num_layers` 3×3 convs,
  stride 2, F·2^i channels, leaky ReLU 0.2 (optional norm, none by default: WGAN-GP advises
  against batch statistics in a critic), then either global average pooling + Dense(1) → one
  logit / critic value per sample, shape [B] (`patch=False`), or a 1×1 conv → a [B, h, w, 1]
  map (`patch=True`). Any input size works ('SAME' convs).
* `OutputDiscriminator` — AdaptSegNet's output-space discriminator (Tsai et al., CVPR 2018,
  model/discriminator.py FCDiscriminator): five 4×4 stride-2 convs (pad 1) with F, 2F, 4F, 8F, 1
  channels (64-128-256-512-1 by default), leaky ReLU 0.2 between them, biases, no norm; an H×W
  input gives an ⌊H/32⌋×⌊W/32⌋ logit map (H, W ≥ 32). It judges segmentation probabilities:
  `softmax_input=True` applies the softmax over the channel axis to the logits it is given, as
  Tsai et al. do before D; `softmax_input=False` takes the input as it is (SIFA's d_P is a
  PatchGAN on the logits).

Convolutions followed by a normalization have no bias (a per-channel constant is removed by the
norm and its learned offset takes its place); kernels are truncated_normal(`init_stddev`), 0.02
as SIFA's GAN layers (TF truncated_normal_initializer, §7). Parameters are float32; `dtype` is
the compute dtype; outputs are float32.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from medgen_jax.models.norms import make_norm

PADDING_MODES = ("reflect", "constant")
UPSAMPLINGS = ("transpose", "resize")


def _pad(x, width: int, mode: str):
  return jnp.pad(x, ((0, 0), (width, width), (width, width), (0, 0)), mode=mode)


def _conv(module: nn.Module, features: int, kernel: int, *, stride: int = 1, padding="VALID",
          use_bias: bool, name: str):
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 use_bias=use_bias, kernel_init=nn.initializers.truncated_normal(module.init_stddev),
                 dtype=module.dtype, param_dtype=jnp.float32, name=name)


class ResidualBlock(nn.Module):
  """relu(x + norm(conv(pad(relu(norm(conv(pad(x)))))))) with 3×3 convs and 1-pixel pads."""

  features: int
  padding_mode: str = "reflect"
  norm: str = "instance"
  init_stddev: float = 0.02
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    norm = make_norm(self.norm, dtype=self.dtype)
    y = x
    for i in range(2):
      y = _conv(self, self.features, 3, use_bias=self.norm == "none", name=f"conv{i}")(
          _pad(y, 1, self.padding_mode))
      y = norm(name=f"norm{i}")(y, train=train)
      if i == 0:
        y = nn.relu(y)
    return nn.relu(x + y)


class ResNetGenerator(nn.Module):
  """CycleGAN / SIFA ResNet generator (see the module docstring). Output in [−1, 1]."""

  base_features: int = 32
  num_blocks: int = 9
  out_features: int | None = None      # None: as many channels as the input
  skip: bool = False                   # SIFA: True (tanh(x + out))
  padding_mode: str = "reflect"        # SIFA: 'constant'
  upsampling: str = "transpose"        # SIFA: 'transpose'
  norm: str = "instance"
  init_stddev: float = 0.02
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    if self.padding_mode not in PADDING_MODES:
      raise ValueError(f"unknown padding_mode {self.padding_mode!r}: {' | '.join(PADDING_MODES)}")
    if self.upsampling not in UPSAMPLINGS:
      raise ValueError(f"unknown upsampling {self.upsampling!r}: {' | '.join(UPSAMPLINGS)}")
    if x.ndim != 4:
      raise ValueError(f"ResNetGenerator needs NHWC images [B, H, W, C], got shape {x.shape}")
    _, height, width, channels = x.shape
    if height % 4 or width % 4:
      raise ValueError(f"ResNetGenerator needs height and width divisible by 4 (two stride-2 "
                       f"downsamplings and two 2x upsamplings), got {height}x{width}; pad or crop "
                       f"the images first")
    out_features = channels if self.out_features is None else self.out_features
    if self.skip:
      if out_features == channels:
        residual = x
      elif out_features == 1 and channels % 2 == 1:
        residual = x[..., channels // 2:channels // 2 + 1]   # SIFA-v1: the middle slice
      else:
        raise ValueError(f"skip=True adds the input to the output: out_features ({out_features}) "
                         f"must equal the input channels ({channels}), or be 1 with an odd number "
                         f"of input channels (the middle one is added)")
    norm = make_norm(self.norm, dtype=self.dtype)
    bias = self.norm == "none"
    f = self.base_features
    y = x.astype(self.dtype)
    y = _conv(self, f, 7, use_bias=bias, name="conv_in")(_pad(y, 3, self.padding_mode))
    y = nn.relu(norm(name="norm_in")(y, train=train))
    for i, mult in enumerate((2, 4)):
      y = _conv(self, f * mult, 3, stride=2, padding="SAME", use_bias=bias, name=f"down{i}")(y)
      y = nn.relu(norm(name=f"down{i}_norm")(y, train=train))
    for i in range(self.num_blocks):
      y = ResidualBlock(4 * f, self.padding_mode, self.norm, self.init_stddev, self.dtype,
                        name=f"block{i}")(y, train=train)
    for i, mult in enumerate((2, 1)):
      if self.upsampling == "transpose":
        y = nn.ConvTranspose(f * mult, (3, 3), strides=(2, 2), padding="SAME", transpose_kernel=True,
                             use_bias=bias, kernel_init=nn.initializers.truncated_normal(self.init_stddev),
                             dtype=self.dtype, param_dtype=jnp.float32, name=f"up{i}")(y)
      else:
        y = jnp.repeat(jnp.repeat(y, 2, axis=1), 2, axis=2)   # nearest-neighbour 2x
        y = _conv(self, f * mult, 3, padding="SAME", use_bias=bias, name=f"up{i}")(y)
      y = nn.relu(norm(name=f"up{i}_norm")(y, train=train))
    y = _conv(self, out_features, 7, use_bias=True, name="conv_out")(_pad(y, 3, self.padding_mode))
    y = y.astype(jnp.float32)
    if self.skip:
      y = y + residual.astype(jnp.float32)
    return jnp.tanh(y)


def patchgan_layers(features: int, num_layers: int, out_features: int):
  """[(channels, stride, normalized)] of the PatchGAN convolutions, input to output."""
  layers = [(features, 2, False)]
  layers += [(features * min(2 ** n, 8), 2, True) for n in range(1, num_layers)]
  layers += [(features * min(2 ** num_layers, 8), 1, True), (out_features, 1, False)]
  return layers


class PatchGAN(nn.Module):
  """70×70 PatchGAN (num_layers = 3): a map of real/fake logits (see the module docstring)."""

  features: int = 64
  num_layers: int = 3
  out_features: int = 1                # SIFA's d_A: 2 (image + auxiliary head)
  pad: int = 2                         # SIFA: 2 (35×35 at 256²); pix2pix / CycleGAN-PyTorch: 1
  norm: str = "instance"
  use_bias: bool = True                # on the convs without a norm; SIFA: False
  init_stddev: float = 0.02
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    if self.num_layers < 1:
      raise ValueError(f"PatchGAN needs num_layers >= 1, got {self.num_layers}")
    layers = patchgan_layers(self.features, self.num_layers, self.out_features)
    sizes = list(x.shape[1:3])
    for _, stride, _ in layers:
      sizes = [(n + 2 * self.pad - 4) // stride + 1 for n in sizes]
      if min(sizes) < 1:
        raise ValueError(f"input {x.shape[1]}x{x.shape[2]} is too small for a PatchGAN with "
                         f"num_layers={self.num_layers} and pad={self.pad}: a 4x4 convolution "
                         f"would get fewer than 4 pixels")
    norm = make_norm(self.norm, dtype=self.dtype)
    y = x.astype(self.dtype)
    for i, (channels, stride, normalized) in enumerate(layers):
      has_norm = normalized and self.norm != "none"
      y = _conv(self, channels, 4, stride=stride, use_bias=self.use_bias and not has_norm,
                name=f"conv{i}")(_pad(y, self.pad, "constant"))
      if has_norm:
        y = norm(name=f"norm{i}")(y, train=train)
      if i < len(layers) - 1:
        y = nn.leaky_relu(y, negative_slope=0.2)
    return y.astype(jnp.float32)


class FeatureDiscriminator(nn.Module):
  """Domain classifier / critic on feature maps: [B] values, or a [B, h, w, 1] map (`patch`)."""

  features: int = 64
  num_layers: int = 3
  patch: bool = False
  norm: str = "none"
  init_stddev: float = 0.02
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    norm = make_norm(self.norm, dtype=self.dtype)
    y = x.astype(self.dtype)
    for i in range(self.num_layers):
      y = _conv(self, self.features * 2 ** i, 3, stride=2, padding="SAME",
                use_bias=self.norm == "none", name=f"conv{i}")(y)
      y = nn.leaky_relu(norm(name=f"norm{i}")(y, train=train), negative_slope=0.2)
    if self.patch:
      y = _conv(self, 1, 1, use_bias=True, name="head")(y)
      return y.astype(jnp.float32)
    y = jnp.mean(y.astype(jnp.float32), axis=(1, 2))
    y = nn.Dense(1, kernel_init=nn.initializers.truncated_normal(self.init_stddev),
                 param_dtype=jnp.float32, name="head")(y)
    return y[:, 0]


class OutputDiscriminator(nn.Module):
  """AdaptSegNet's output-space discriminator (Tsai et al. 2018): [B, H/32, W/32, 1] logits."""

  features: int = 64
  softmax_input: bool = True
  init_stddev: float = 0.02
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    if x.shape[1] < 32 or x.shape[2] < 32:
      raise ValueError(f"OutputDiscriminator halves the input 5 times: it needs height and width "
                       f">= 32, got {x.shape[1]}x{x.shape[2]}")
    y = x.astype(jnp.float32)
    if self.softmax_input:
      y = nn.softmax(y, axis=-1)
    y = y.astype(self.dtype)
    f = self.features
    widths = (f, 2 * f, 4 * f, 8 * f, 1)
    for i, channels in enumerate(widths):
      y = _conv(self, channels, 4, stride=2, padding=((1, 1), (1, 1)), use_bias=True, name=f"conv{i}")(y)
      if i < len(widths) - 1:
        y = nn.leaky_relu(y, negative_slope=0.2)
    return y.astype(jnp.float32)


__all__ = ["FeatureDiscriminator", "OutputDiscriminator", "PatchGAN", "ResNetGenerator",
           "ResidualBlock", "patchgan_layers"]
