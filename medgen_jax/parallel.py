"""Data parallelism: the only module that knows about devices.

Batches from the samplers are host numpy arrays with a leading batch axis; `shard_batch`
reshapes every leaf to `[devices, B / devices, ...]` for `jax.pmap` over the `batch` axis.
"""

from __future__ import annotations

import jax
import numpy as np

AXIS_NAME = "batch"


def shard_batch(batch, num_devices: int | None = None):
  """Reshapes each array leaf [B, ...] -> [num_devices, B // num_devices, ...].

  The samplers interleave sites (A, B, C, A, B, C, ...), so each device's contiguous chunk is
  domain-balanced when B / num_devices is a multiple of the number of sites.
  """
  num_devices = num_devices or jax.local_device_count()

  def reshape(x):
    x = np.asarray(x)
    if x.shape[0] % num_devices:
      raise ValueError(f"batch of {x.shape[0]} cannot be split over {num_devices} devices; "
                       f"use a batch size that is a multiple of {num_devices}")
    return x.reshape((num_devices, x.shape[0] // num_devices) + x.shape[1:])

  return jax.tree.map(reshape, batch)
