"""The normalization-layer factory: one name -> one flax module, for every model.

* `batch`: BatchNorm (TF1 conventions of the original code: momentum 0.9, epsilon 1e-3).
  `axis_name` makes the batch statistics global over the data-parallel axis (config `bn_sync`).
* `instance`: per-sample, per-channel normalization over H, W with learned scale and bias
  (tf.contrib instance_norm, epsilon 1e-6) = GroupNorm with group size 1.
* `group`: GroupNorm with `num_groups` groups (fewer when channels are not divisible).
* `dsbn`: domain-specific BatchNorm (models/domains.DomainBatchNorm): statistics, scale and bias
  per domain, chosen by the batch's domain ids (`norm(x, train=..., domain=ids)`); `num_domains`
  sets of them.
* `none`: identity.

Every norm is called as `norm(x, train=..., domain=None)`; only `dsbn` reads `domain`.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from medgen_jax.models.domains import DomainBatchNorm

NORMS = ("batch", "instance", "group", "dsbn", "none")


class Identity(nn.Module):
  @nn.compact
  def __call__(self, x, *, train: bool = False, domain=None):
    return x


class _Norm(nn.Module):
  """Wraps a flax norm so that every kind is called as `norm(x, train=...)`."""

  kind: str
  axis_name: str | None = None
  num_groups: int = 8
  momentum: float = 0.9
  epsilon: float = 1e-3
  dtype: jnp.dtype = jnp.float32

  num_domains: int = 1

  @nn.compact
  def __call__(self, x, *, train: bool = False, domain=None):
    if self.kind == "dsbn":
      return DomainBatchNorm(self.num_domains, momentum=self.momentum, epsilon=self.epsilon,
                             axis_name=self.axis_name if train else None, dtype=self.dtype,
                             name="dsbn")(x, train=train, domain=domain)
    if self.kind == "batch":
      return nn.BatchNorm(use_running_average=not train, momentum=self.momentum,
                          epsilon=self.epsilon, axis_name=self.axis_name if train else None,
                          dtype=self.dtype, param_dtype=jnp.float32, name="bn")(x)
    if self.kind == "instance":
      return nn.GroupNorm(num_groups=None, group_size=1, epsilon=1e-6, dtype=self.dtype,
                          param_dtype=jnp.float32, name="in")(x)
    channels = x.shape[-1]
    groups = max(g for g in range(1, min(self.num_groups, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=self.dtype, param_dtype=jnp.float32,
                        name="gn")(x)


def make_norm(name: str, *, axis_name: str | None = None, num_groups: int = 8,
              momentum: float = 0.9, epsilon: float = 1e-3, num_domains: int = 1, dtype=jnp.float32):
  """Returns a constructor `norm(name=...) -> module` called as `module(x, train=..., domain=...)`."""
  if name not in NORMS:
    raise ValueError(f"unknown norm {name!r} (config model.norm); use one of {', '.join(NORMS)}")
  if name == "none":
    return Identity
  return functools.partial(_Norm, kind=name, axis_name=axis_name, num_groups=num_groups,
                           momentum=momentum, epsilon=epsilon, num_domains=num_domains, dtype=dtype)
