"""The metric embedding network M_φ of MASF and SAML: a small MLP with leaky-ReLU (slope 0.2)
after every layer (MASF: 4096→1024→256 on AlexNet fc7; SAML: 48→24→16 on pixel embeddings)."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class MetricNet(nn.Module):
  features: Sequence[int] = (32, 16)

  @nn.compact
  def __call__(self, x):
    x = x.astype(jnp.float32)
    for i, width in enumerate(self.features):
      x = nn.leaky_relu(nn.Dense(width, kernel_init=nn.initializers.glorot_uniform(), name=f"fc{i}")(x),
                        negative_slope=0.2)
    return x
