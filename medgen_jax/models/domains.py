"""Domain-specific layers: one set of parameters per domain (site, scanner, modality), picked per
sample by the batch's domain ids, inside one network whose other weights are shared.

* `DomainBatchNorm` — domain-specific batch normalization (DSBN; Chang et al., CVPR 2019; the
  per-site `bn_scope` of MS-Net, Liu et al., IEEE TMI 2020, and the per-modality BN of UMMKD,
  Dou et al., IEEE TMI 2020). For every domain k and channel c, in training:

      mu_k = Σ_{b: d_b = k} Σ_{h,w} x[b,h,w,c] / n_k,   var_k = Σ ... x² / n_k − mu_k²
      y[b] = γ_{d_b} · (x[b] − mu_{d_b}) / sqrt(var_{d_b} + ε) + β_{d_b}

  i.e. BatchNorm over the samples of each domain only — the statistics the released TF code gets
  by calling the network once per domain batch (`../shared/reference/methods.md` §1.8) — with
  running averages (momentum m) kept per domain: r_k ← m·r_k + (1 − m)·stat_k, updated only for
  domains present in the batch. With `axis_name` the sums and counts are summed over devices
  first, so the statistics are those of the global batch whatever the shards hold.
* `select_domain(table, domain)` — row `domain[b]` of a per-domain parameter table for every
  sample: the one way every domain-specific layer picks its parameters.

An unseen domain at test time (a held-out site, a new scanner) has id `UNSEEN` (−1). Its
parameters are the mean over the trained domains (for DSBN: the mean of the domains' γ, β and
running means and variances) — the documented 'average' policy; the alternative policy
('refuse', config `model.unseen_domain`) is enforced where sites are mapped to ids
(`methods/base.domain_index`), before any network runs.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

UNSEEN = -1


def select_domain(table, domain):
  """table [K, ...], domain int [B] -> [B, ...]; a negative id (UNSEEN) selects the mean over
  the K domains."""
  picked = jnp.take(table, jnp.clip(domain, 0, table.shape[0] - 1), axis=0)
  mean = jnp.broadcast_to(jnp.mean(table, axis=0), picked.shape)
  unseen = (domain < 0).reshape((-1,) + (1,) * (picked.ndim - 1))
  return jnp.where(unseen, mean, picked)


def check_domain(domain, batch_size: int, num_domains: int, where: str):
  """The domain ids of a batch as int32 [B]: a domain-specific layer without them is an error
  (one domain: every sample is domain 0)."""
  if domain is None:
    if num_domains == 1:
      return jnp.zeros((batch_size,), jnp.int32)
    raise ValueError(f"{where}: {num_domains} domain-specific parameter sets need the batch's domain "
                     "ids (apply(..., domain=ids)); a pooled batch carries them as batch['domain']")
  domain = jnp.asarray(domain, jnp.int32)
  if domain.ndim == 0:
    domain = jnp.full((batch_size,), domain)
  if domain.shape != (batch_size,):
    raise ValueError(f"{where}: domain ids of shape {domain.shape} for a batch of {batch_size}")
  return domain


class DomainBatchNorm(nn.Module):
  """BatchNorm with statistics, scale and bias per domain (see the module docstring).

  Parameters `scale`, `bias` [K, C]; statistics `batch_stats/mean`, `var` [K, C]. TF1 conventions
  as the rest of the project (momentum 0.9, epsilon 1e-3); variance E[x²] − E[x]², clipped at 0,
  as flax's BatchNorm."""

  num_domains: int
  momentum: float = 0.9
  epsilon: float = 1e-3
  axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False, domain=None):
    k, channels = self.num_domains, x.shape[-1]
    if domain is None and self.is_initializing():   # init only makes the parameters
      domain = 0
    domain = check_domain(domain, x.shape[0], k, "DomainBatchNorm")
    scale = self.param("scale", nn.initializers.ones, (k, channels), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (k, channels), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((k, channels), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((k, channels), jnp.float32))
    if train:
      xf = x.astype(jnp.float32)
      onehot = jax.nn.one_hot(domain, k, dtype=jnp.float32)                  # [B, K]
      per_sample = x.size // (x.shape[0] * channels)                          # H·W
      sums = jnp.einsum("bk,bc->kc", onehot, jnp.sum(xf, axis=tuple(range(1, x.ndim - 1))))
      squares = jnp.einsum("bk,bc->kc", onehot, jnp.sum(xf * xf, axis=tuple(range(1, x.ndim - 1))))
      counts = jnp.sum(onehot, axis=0) * per_sample                           # [K]
      if self.axis_name is not None and not self.is_initializing():
        sums, squares, counts = jax.lax.psum((sums, squares, counts), self.axis_name)
      present = counts > 0
      safe = jnp.maximum(counts, 1.0)[:, None]
      mean = sums / safe
      var = jnp.maximum(squares / safe - mean * mean, 0.0)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = jnp.where(present[:, None], m * ra_mean.value + (1 - m) * mean, ra_mean.value)
        ra_var.value = jnp.where(present[:, None], m * ra_var.value + (1 - m) * var, ra_var.value)
    else:
      mean, var = ra_mean.value, ra_var.value
    shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (channels,)
    mul = (select_domain(scale, domain) * jax.lax.rsqrt(select_domain(var, domain) + self.epsilon))
    add = select_domain(bias, domain) - select_domain(mean, domain) * mul
    y = x.astype(jnp.float32) * mul.reshape(shape) + add.reshape(shape)
    return y.astype(self.dtype)


def group_by_domain(tree, domain, num_domains: int):
  """Each leaf [B, ...] of a domain-balanced batch (B/K samples of each of the K domains, in
  any order: the pooled sampler interleaves them) as [K, B/K, ...], row k = domain k's samples in
  batch order. For per-domain branches (MS-Net's auxiliary decoders, UMMKD's per-modality
  losses) that must see one domain's samples only; `ungroup_by_domain` puts rows back.
  A batch that is not balanced is a caller error the shapes cannot show: the samplers guarantee
  balance (data/sampler.py) and so does every device's shard (parallel.shard_batch)."""
  order = jnp.argsort(domain, stable=True)
  def group(x):
    if x.shape[0] % num_domains:
      raise ValueError(f"a batch of {x.shape[0]} cannot hold {num_domains} domains equally")
    return jnp.take(x, order, axis=0).reshape((num_domains, x.shape[0] // num_domains) + x.shape[1:])
  return jax.tree.map(group, tree)


def ungroup_by_domain(tree, domain):
  """The inverse of `group_by_domain`: [K, B/K, ...] -> [B, ...] in the batch's order."""
  inverse = jnp.argsort(jnp.argsort(domain, stable=True))
  return jax.tree.map(lambda x: jnp.take(x.reshape((-1,) + x.shape[2:]), inverse, axis=0), tree)
