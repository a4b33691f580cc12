"""Domain-specific layers added to a shared U-Net: residual adapters (Rebuffi et al.) and
squeeze-and-excitation blocks (Hu et al.; USE-Net, Rundo et al.), one parameter set per domain
(site) picked per sample by the batch's domain ids (models/domains.select_domain), so a
mixed-domain batch runs in one pass and an unseen site (id −1) gets the mean of the domains'
parameters.

Notation: x' = conv3x3(x) the output of one of the U-Net's shared 3×3 convolutions (no bias),
W_k a per-domain 1×1 convolution (a [C_in, C_out] matrix applied at every pixel), BN_k a
per-domain BatchNorm (DomainBatchNorm), d_b the domain of sample b. Every adapter kernel starts
at W_k = 0, so at initialization the network is the shared one exactly.

* Series residual adapter (Rebuffi, Bilen, Vedaldi, NeurIPS 2017, "Learning multiple visual
  domains with residual adapters"; released code srebuffi/residual_adapters, models.py
  `conv_task`/`conv1x1`, mode 'series_adapters'), after each 3×3 conv, before its norm:

      y = x' + W_{d} · BN^a_{d}(x')            then the block's norm (DSBN: BN_{d}) and ReLU

  The released code puts the adapter's own BatchNorm *before* the 1×1 conv
  (`nn.Sequential(nn.BatchNorm2d(planes), conv1x1_fonc(planes))`, then `y += x`, then the
  per-task `nn.BatchNorm2d`); we follow the code. The note "y = x + BN_k(W_k x)" (BN after the
  1×1) is the same module up to where that BN sits; both are the identity for W_k = 0.
* Parallel residual adapter (Rebuffi, Bilen, Vedaldi, CVPR 2018, "Efficient parametrization of
  multi-domain deep neural networks"; same repository, mode 'parallel_adapters'), a 1×1 conv on
  the 3×3 conv's *input* x, in parallel with it:

      y = conv3x3(x) + W_{d} · x               then the block's norm and ReLU

  (released `conv_task.forward`: `y = self.conv(x); y = y + self.parallel_conv[task](x);
  y = self.bns[task](y)`).
  In Rebuffi et al. every BatchNorm is domain-specific too: use them with model.norm='dsbn'
  (configs/multisite/{series,parallel}_adapter.py do). The released ResNet's task-specific
  classifier has no counterpart here: the sites share their classes, so the U-Net head stays shared.
  The released code initializes the 1×1 kernels randomly (He normal) and trains them on top of a
  frozen pre-trained network; here the whole network trains from scratch jointly on all sites
  (the multi-site baselines of MS-Net, Liu et al., IEEE TMI 2020), and W_k = 0 makes the
  initial network the shared U-Net.
* Squeeze-and-excitation (Hu, Shen, Sun, CVPR 2018, Eqs. 2–4), on a block output x [B, H, W, C]:

      z_b = mean_{h,w} x_b,   s_b = σ(W2_{d} · ReLU(W1_{d} · z_b)),   y_b = s_b ⊙ x_b

  W1 [C, C/r], W2 [C/r, C] without biases (the paper's equations), C/r rounded down and at least
  1. 'shared': one (W1, W2) for all sites (USE-Net as Rundo et al. train it on pooled
  multi-institutional data); 'domain': one per site ([K, C, C/r], [K, C/r, C]) — the talk's
  multi-site USE-Net baseline. Per-site weights start equal (one draw, broadcast over K) and
  diverge only through their own site's gradients. USE-Net (Rundo et al., Neurocomputing 2019)
  adds SE after every encoder block (Enc USE-Net) or after every encoder and decoder block
  (Enc-Dec USE-Net, the variant that did best when trained on all institutions); the U-Net here
  follows model.se_blocks ('encoder_decoder' by default; its bottleneck counts as an encoder
  block).

Per-sample kernels: `select_domain(W, d)` gathers [B, C_in, C_out] and an einsum
'b...c,bco->b...o' applies them (cheap: one batched matmul; no second-order structure needed).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from medgen_jax.models.domains import DomainBatchNorm, check_domain, select_domain

ADAPTERS = ("none", "series", "parallel")
SE_MODES = ("none", "shared", "domain")
SE_BLOCKS = ("encoder", "encoder_decoder")


def check_options(*, adapter: str, se: str, se_reduction: int, se_blocks: str) -> None:
  """One clear error per unknown option (config model.adapter / model.se / ...)."""
  if adapter not in ADAPTERS:
    raise ValueError(f"unknown adapter {adapter!r} (config model.adapter); use one of {', '.join(ADAPTERS)}")
  if se not in SE_MODES:
    raise ValueError(f"unknown squeeze-and-excitation mode {se!r} (config model.se); "
                     f"use one of {', '.join(SE_MODES)}")
  if se_blocks not in SE_BLOCKS:
    raise ValueError(f"unknown SE placement {se_blocks!r} (config model.se_blocks); "
                     f"use one of {', '.join(SE_BLOCKS)}")
  if se_reduction < 1:
    raise ValueError(f"config model.se_reduction={se_reduction}: the SE reduction ratio r must be >= 1")


def se_hidden(channels: int, reduction: int) -> int:
  """C/r of the SE bottleneck, rounded down, at least 1."""
  return max(channels // reduction, 1)


def _same_for_every_domain(init):
  """An initializer for [K, ...] that draws one [...] and repeats it over the K domains."""
  def init_fn(key, shape, dtype=jnp.float32):
    return jnp.broadcast_to(init(key, shape[1:], dtype), shape)
  return init_fn


class DomainDense(nn.Module):
  """x [B, ..., C] -> x · W_{d_b} [B, ..., features] with W [K, C, features] (per_domain) or one
  shared W [C, features]: a 1×1 convolution without bias on an image, a dense layer on a vector.
  The parameter is named 'kernel' (so the explicit L2 term sees it, as every conv kernel)."""

  features: int
  num_domains: int = 1
  per_domain: bool = True
  zero_init: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, domain=None):
    base = nn.initializers.zeros if self.zero_init else nn.initializers.lecun_normal()
    if not self.per_domain:
      kernel = self.param("kernel", base, (x.shape[-1], self.features), jnp.float32)
      return jnp.einsum("...c,co->...o", x.astype(self.dtype), kernel.astype(self.dtype))
    if domain is None and self.is_initializing():   # init only makes the parameters
      domain = 0
    domain = check_domain(domain, x.shape[0], self.num_domains, "DomainDense")
    kernel = self.param("kernel", _same_for_every_domain(base),
                        (self.num_domains, x.shape[-1], self.features), jnp.float32)
    picked = select_domain(kernel, domain).astype(self.dtype)             # [B, C, features]
    return jnp.einsum("b...c,bco->b...o", x.astype(self.dtype), picked)


class SeriesAdapter(nn.Module):
  """x' -> x' + W_{d} · BN^a_{d}(x') (Rebuffi et al. 2017, released code; module docstring).
  W zero-initialized; BN^a keeps statistics, scale and bias per domain."""

  num_domains: int
  axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool, domain=None):
    h = DomainBatchNorm(self.num_domains, axis_name=self.axis_name if train else None,
                        dtype=self.dtype, name="bn")(x, train=train, domain=domain)
    return x + DomainDense(x.shape[-1], self.num_domains, zero_init=True, dtype=self.dtype,
                           name="conv1x1")(h, domain=domain).astype(x.dtype)


class ParallelAdapter(nn.Module):
  """x -> W_{d} · x, the branch added to conv3x3(x) (Rebuffi et al. 2018; module docstring).
  W [K, C_in, features] zero-initialized."""

  features: int
  num_domains: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, domain=None):
    return DomainDense(self.features, self.num_domains, zero_init=True, dtype=self.dtype,
                       name="conv1x1")(x, domain=domain)


class SqueezeExcite(nn.Module):
  """y_b = x_b ⊙ σ(W2 ReLU(W1 mean_{h,w} x_b)) (Hu et al. 2018), W1/W2 shared or per domain."""

  num_domains: int = 1
  reduction: int = 8
  per_domain: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, domain=None):
    channels = x.shape[-1]
    dense = lambda features, name: DomainDense(features, self.num_domains, per_domain=self.per_domain,
                                               dtype=jnp.float32, name=name)
    z = jnp.mean(x.astype(jnp.float32), axis=tuple(range(1, x.ndim - 1)))          # squeeze [B, C]
    h = nn.relu(dense(se_hidden(channels, self.reduction), "squeeze")(z, domain=domain))
    s = jax.nn.sigmoid(dense(channels, "excite")(h, domain=domain))                   # [B, C]
    shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (channels,)
    return (x * s.reshape(shape).astype(x.dtype)).astype(x.dtype)
