"""MS-Net's networks (Liu, Dou, Yu, Heng, IEEE TMI 2020; released code liuquande/MS-Net,
`network.py`), built from this project's U-Net parts (models/unet.py) so that the MS-Net row is
comparable with the Joint / DSBN / adapter rows that train the same U-Net:

* `Encoder`  — the U-Net's encoder path: blocks down0 .. down{depth-1} (2 × (3×3 conv → norm →
  ReLU), `base_features · 2^level` channels) with 2×2 max-pool between them, the bottleneck block
  (`base_features · 2^depth`) and config.model.dropout after it. In MS-Net it is shared by every
  site and its norms are DSBN (one BatchNorm per site, shared kernels; the released `bn_scope=
  'source_k'`).
* `Decoder`  — the U-Net's decoder path: at each level a 2×2 stride-2 transposed conv, the skip
  concatenation and a block (up{level}), then the 1×1 head to logits. MS-Net has K+1 of them:
  one *auxiliary* decoder per site (`teachers_k`, own kernels, plain BatchNorm since it only ever
  sees site k; the released `teacher_k` scopes) and one *universal* decoder (`student`, DSBN; the
  released `student_decoder`).
* `MSNet`    — the whole network (its parameters: `encoder`, `student`, `teachers_0` ..
  `teachers_{K-1}`), applied at evaluation as `apply(v, x, train=False, domain=ids)`:
  branch 'universal' = student(encoder(x; BN_d); BN_d) — the deployed model; 'auxiliary' =
  teachers_d(encoder(x; BN_d)), the auxiliary decoder of each sample's own site. A sample of an
  unseen site (domain id UNSEEN = −1) gets the mean of the domain-specific parameters
  (models/domains.select_domain) in the DSBN layers and, in the auxiliary branch, the ensemble of
  the K auxiliary decoders: log of the mean of their softmax outputs (argmax = the ensemble's
  label; its softmax = the mean probabilities). Training applies the parts separately
  (`parts(model)`, methods/multisite/msnet.py).

With the same parameters, encoder + student IS models/unet.UNet(norm='dsbn') (same layers, names
and order; tests/test_msnet.py checks it).

Not reproduced (on purpose, for the comparison above): the released network is a pre-activation
residual U-Net — `conv → res_block` per level with res_block(x) = x + BN-ReLU-conv(BN-ReLU-conv(x)),
feature_base 32 .. 512 with two residual blocks at the bottom, BN-ReLU-3×3 transposed convs up,
a final BN-ReLU-3×3 conv to the logits, kernels truncated_normal(0.1), no biases (methods.md §3.1).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from medgen_jax.models.domains import check_domain
from medgen_jax.models.unet import ConvBlock, UpConv2x2, max_pool_2x2

BRANCHES = ("universal", "auxiliary")


class Encoder(nn.Module):
  """The U-Net's encoder: returns (skips, bottom) = ((down0, .., down{depth-1}) before pooling,
  the bottleneck block's output after dropout)."""

  base_features: int = 16
  depth: int = 4
  dropout: float = 0.0
  norm: str = "dsbn"
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  fast_ops: bool = True
  num_domains: int = 1

  @nn.compact
  def __call__(self, x, *, train: bool = False, domain=None):
    if x.shape[1] % 2 ** self.depth or x.shape[2] % 2 ** self.depth:
      raise ValueError(f"input {x.shape[1]}x{x.shape[2]} must be divisible by 2^depth = "
                       f"{2 ** self.depth} (config data.in_plane_shape / model.depth)")
    block = lambda f, name: ConvBlock(f, self.norm, self.bn_axis_name, self.dtype, self.fast_ops,
                                      self.num_domains, name=name)
    x = x.astype(self.dtype)
    skips = []
    for level in range(self.depth):
      x = block(self.base_features * 2 ** level, f"down{level}")(x, train=train, domain=domain)
      skips.append(x)
      x = max_pool_2x2(x) if self.fast_ops else nn.max_pool(x, (2, 2), strides=(2, 2))
    x = block(self.base_features * 2 ** self.depth, "bottleneck")(x, train=train, domain=domain)
    if self.dropout > 0:
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return tuple(skips), x


class Decoder(nn.Module):
  """The U-Net's decoder on an `Encoder`'s (skips, bottom): logits [B, H, W, classes] (float32)."""

  num_classes: int
  base_features: int = 16
  depth: int = 4
  norm: str = "batch"
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  fast_ops: bool = True
  num_domains: int = 1

  @nn.compact
  def __call__(self, features, *, train: bool = False, domain=None):
    skips, x = features
    for level in reversed(range(self.depth)):
      f = self.base_features * 2 ** level
      if self.fast_ops:
        x = UpConv2x2(f, self.dtype, name=f"upconv{level}")(x)
      else:
        x = nn.ConvTranspose(f, (2, 2), strides=(2, 2), dtype=self.dtype, param_dtype=jnp.float32,
                             name=f"upconv{level}")(x)
      x = ConvBlock(f, self.norm, self.bn_axis_name, self.dtype, self.fast_ops, self.num_domains,
                    name=f"up{level}")(jnp.concatenate([x, skips[level]], axis=-1), train=train,
                                       domain=domain)
    if self.fast_ops:
      logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name="head")(x)
    else:
      logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, param_dtype=jnp.float32, name="head")(x)
    return logits.astype(jnp.float32)


def _part_args(model):
  common = dict(base_features=model.base_features, depth=model.depth, bn_axis_name=model.bn_axis_name,
                dtype=model.dtype, fast_ops=model.fast_ops)
  encoder = dict(common, dropout=model.dropout, norm="dsbn", num_domains=model.num_domains)
  student = dict(common, num_classes=model.num_classes, norm="dsbn", num_domains=model.num_domains)
  teacher = dict(common, num_classes=model.num_classes, norm="batch", num_domains=1)
  return encoder, teacher, student


def teacher_name(k: int) -> str:
  """The parameter / statistics key of site k's auxiliary decoder in MSNet's variables."""
  return f"teachers_{k}"


class MSNet(nn.Module):
  """Shared DSBN encoder + K auxiliary decoders + the universal DSBN decoder (module docstring).
  `branch` picks what `__call__` returns; `init` creates every part's variables."""

  num_classes: int
  num_domains: int
  base_features: int = 16
  depth: int = 4
  dropout: float = 0.0
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  fast_ops: bool = True
  branch: str = "universal"

  def setup(self):
    if self.branch not in BRANCHES:
      raise ValueError(f"unknown MS-Net branch {self.branch!r} (config msnet.eval_branch); "
                       f"use one of {', '.join(BRANCHES)}")
    encoder, teacher, student = _part_args(self)
    self.encoder = Encoder(**encoder)
    self.student = Decoder(**student)
    self.teachers = [Decoder(**teacher) for _ in range(self.num_domains)]   # named teachers_k

  def __call__(self, x, *, train: bool = False, domain=None):
    if domain is None and self.is_initializing():
      domain = 0
    domain = check_domain(domain, x.shape[0], self.num_domains, "MSNet")
    features = self.encoder(x, train=train, domain=domain)
    if self.is_initializing():   # create every part's variables
      for teacher in self.teachers:
        teacher(features, train=train)
      return self.student(features, train=train, domain=domain)
    if self.branch == "universal":
      return self.student(features, train=train, domain=domain)
    if train:
      raise ValueError("MSNet's auxiliary branch runs each site's decoder on that site's samples only: "
                       "train through models.msnet.parts (methods/multisite/msnet.py), not in one apply")
    return self._auxiliary(features, domain)

  def _auxiliary(self, features, domain):
    logits = jnp.stack([t(features, train=False) for t in self.teachers])     # [K, B, H, W, C]
    own = jnp.take_along_axis(
        logits, jnp.clip(domain, 0, self.num_domains - 1)[None, :, None, None, None], axis=0)[0]
    ensemble = jnp.log(jnp.mean(jax.nn.softmax(logits, axis=-1), axis=0))
    unseen = (domain < 0)[:, None, None, None]
    return jnp.where(unseen, ensemble, own)


def parts(model: MSNet):
  """(encoder, teacher, student) as standalone modules with MSNet's settings: applied to the
  sub-trees variables['encoder'], variables[teacher_name(k)], variables['student'] of an MSNet
  (the same parameter structure), one part at a time, as the training step does."""
  encoder, teacher, student = _part_args(model)
  return Encoder(**encoder, parent=None), Decoder(**teacher, parent=None), Decoder(**student, parent=None)
