"""Shared-stream U-Nets for unpaired multi-modal segmentation: which blocks every modality shares
and which each modality has for itself (the baselines of UMMKD, Dou, Liu et al., IEEE TMI 2020,
after Valindria et al., WACV 2018, "Multi-modal learning from unpaired images: application to
multi-organ segmentation in CT and MRI").

`MultiModalUNet(shared=...)` is the project U-Net (models/unet.py: same blocks, same names) in
which the blocks named by `modality_specific_blocks(shared, depth)` exist once per modality, as
`<block>_m<k>` (k = the modality's domain id, RunInfo.domains order), and the others once:

  shared     per-modality blocks                          the network
  'all'      none                                         Chilopod (UMMKD): all kernels shared;
                                                          with model.norm='dsbn' the BN per modality
  'encoder'  upconv*, up*, head                           inverse-Y: shared encoder + bottleneck,
                                                          a decoder per modality
  'decoder'  down*                                        Y-shaped: an encoder per modality, shared
                                                          bottleneck + decoder
  'middle'   down*, upconv*, up*, head                    X-shaped: encoder and decoder per
                                                          modality, only the bottleneck shared

(down0..down{depth-1} = encoder blocks, bottleneck, upconv{l} + up{l} = decoder levels, head =
the 1x1 classifier; the skip from down{l} feeds up{l}.) [paper*: the Y/X/inverse-Y naming is
Valindria et al.'s, not re-read here; their streams are their own backbone, ours is this U-Net.]

Per-modality blocks see their own modality only. In training (a domain-balanced pooled batch,
data/sampler.SliceSampler; every device's shard too) the batch is split into its modality groups
(models/domains.group_by_domain), block k runs on group k alone — so its BatchNorm statistics are
modality k's — and the rows are put back in batch order. At inference (BatchNorm on running
statistics: samples are independent) every modality's block runs on the whole batch and each
sample takes its own modality's output; an unseen modality (domain id UNSEEN = -1) takes the mean
of the per-modality blocks' outputs (the 'average' policy of model.unseen_domain).

Norms: shared blocks use `norm` with `num_modalities` domains ('dsbn': a BN per modality inside
the shared block; 'batch': one BN shared by all modalities, statistics over the pooled batch);
per-modality blocks have their own plain norm ('dsbn' becomes 'batch': the block only ever sees
one modality). 2-D only; a 3-D variant waits for 3-D training (issue 12).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from medgen_jax.models.domains import check_domain, group_by_domain, ungroup_by_domain
from medgen_jax.models.unet import ConvBlock, UpConv2x2, max_pool_2x2

SHARED = ("all", "encoder", "decoder", "middle")


def modality_specific_blocks(shared: str, depth: int) -> frozenset:
  """The U-Net blocks (names as in models/unet.UNet) that exist once per modality."""
  if shared not in SHARED:
    raise ValueError(f"unknown sharing {shared!r} (config ummkd.shared); use one of {', '.join(SHARED)}")
  encoder = {f"down{level}" for level in range(depth)}
  decoder = {f"upconv{level}" for level in range(depth)} | {f"up{level}" for level in range(depth)} | {"head"}
  return frozenset({"all": set(), "encoder": decoder, "decoder": encoder, "middle": encoder | decoder}[shared])


def per_modality(blocks, x, domain, *, train: bool):
  """`blocks[k](x_k)` for the samples x_k of modality k, in batch order (see the module
  docstring: groups in training, every block on the batch + a per-sample pick at inference)."""
  k = len(blocks)
  if train:
    groups = group_by_domain(x, domain, k)
    return ungroup_by_domain(jnp.stack([block(groups[i]) for i, block in enumerate(blocks)]), domain)
  outs = [block(x) for block in blocks]
  pick = lambda i: (domain == i).reshape((-1,) + (1,) * (x.ndim - 1))
  out = jnp.mean(jnp.stack(outs), axis=0)                # UNSEEN: the mean of the modalities' outputs
  for i, o in enumerate(outs):
    out = jnp.where(pick(i), o, out)
  return out


class MultiModalUNet(nn.Module):
  """The U-Net of models/unet.UNet with the blocks of `modality_specific_blocks(shared, depth)`
  once per modality (module docstring). Called as `apply(variables, x, train=..., domain=ids)`."""

  num_classes: int
  num_modalities: int
  shared: str = "all"
  base_features: int = 16
  depth: int = 4
  dropout: float = 0.0
  norm: str = "dsbn"
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  fast_ops: bool = True

  @nn.compact
  def __call__(self, x, *, train: bool = False, domain=None):
    if x.shape[1] % 2 ** self.depth or x.shape[2] % 2 ** self.depth:
      raise ValueError(f"input {x.shape[1]}x{x.shape[2]} must be divisible by 2^depth = "
                       f"{2 ** self.depth} (config data.in_plane_shape / model.depth)")
    if not self.fast_ops:
      raise ValueError("MultiModalUNet is written with the fast layers only (config model.fast_ops=True)")
    k = self.num_modalities
    if domain is None and self.is_initializing():
      domain = 0
    domain = check_domain(domain, x.shape[0], k, "MultiModalUNet")
    specific = modality_specific_blocks(self.shared, self.depth)
    own_norm = "batch" if self.norm == "dsbn" else self.norm

    def run(name, make, x):
      """Block `name` on x: shared (one module, its norm per modality) or one per modality."""
      if name not in specific:
        return make(name, self.norm, k)(x)
      return per_modality([make(f"{name}_m{i}", own_norm, 1) for i in range(k)], x, domain, train=train)

    def conv_block(features):
      def make(name, norm, domains):
        block = ConvBlock(features, norm, self.bn_axis_name, self.dtype, True, domains, name=name)
        return lambda x: block(x, train=train, domain=domain if domains > 1 else None)
      return make

    upconv = lambda features: lambda name, norm, domains: UpConv2x2(features, self.dtype, name=name)
    head = lambda name, norm, domains: nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                                                name=name)
    x = x.astype(self.dtype)
    skips = []
    for level in range(self.depth):
      x = run(f"down{level}", conv_block(self.base_features * 2 ** level), x)
      skips.append(x)
      x = max_pool_2x2(x)
    x = run("bottleneck", conv_block(self.base_features * 2 ** self.depth), x)
    if self.dropout > 0:
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    for level in reversed(range(self.depth)):
      features = self.base_features * 2 ** level
      x = run(f"upconv{level}", upconv(features), x)
      x = run(f"up{level}", conv_block(features), jnp.concatenate([x, skips[level]], axis=-1))
    return run("head", head, x).astype(jnp.float32)
