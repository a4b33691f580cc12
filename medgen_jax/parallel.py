"""Data parallelism: the only module that knows about devices.

`jax.pmap` over the named axis `batch` (in JAX >= 0.10 pmap is itself jit(shard_map)). A train
step is written once as `step(state, batch, key)`, with collectives on `AXIS_NAME` when it is
built with `axis_name=AXIS_NAME`; `DataParallel` replicates the state, splits host batches over
the local devices, runs the pmapped step and brings results back. With one device it is the same
code path.

Multi-host (TPU pods, multi-node GPU): set MEDGEN_JAX_DISTRIBUTED=1 so that
`initialize_distributed()` calls `jax.distributed.initialize()` before any device is touched.
Each process feeds its local devices; only process 0 writes files (`is_main_process`).
"""

from __future__ import annotations

import os

import jax
import numpy as np

AXIS_NAME = "batch"


def initialize_distributed() -> None:
  if os.environ.get("MEDGEN_JAX_DISTRIBUTED") == "1":
    jax.distributed.initialize()


def is_main_process() -> bool:
  return jax.process_index() == 0


def local_device_count() -> int:
  return jax.local_device_count()


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


def gather_global(x, axis_name: str | None):
  """Inside a pmapped step: concatenate every device's `x` along axis 0 (identity without an
  axis). Losses over all samples (metric learning) then see the global batch; the gradient of
  a device's own rows flows back through the gather."""
  if axis_name is None:
    return x
  return jax.lax.all_gather(x, axis_name, tiled=True)


class DataParallel:
  """Runs `step(state, batch, key)` pmapped over `num_devices` local devices.

  `replicate`/`unreplicate` move a state between host and devices; the replication itself is
  a pmap over the same axis name, which keeps the step from recompiling on its second call.
  """

  def __init__(self, step_fn, *, num_devices: int | None = None, donate: bool = True):
    self.num_devices = num_devices or jax.local_device_count()
    self.devices = jax.local_devices()[: self.num_devices]
    self._step = jax.pmap(step_fn, axis_name=AXIS_NAME, in_axes=(0, 0, None),
                          donate_argnums=(0,) if donate else (), devices=self.devices)
    self._replicate = jax.pmap(lambda x: x, axis_name=AXIS_NAME, devices=self.devices)

  def replicate(self, tree):
    stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (self.num_devices,) + np.shape(x)),
                           tree)
    return self._replicate(stacked)

  @staticmethod
  def unreplicate(tree):
    """The first device's copy, as host numpy arrays."""
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x[0])), tree)

  def step(self, replicated_state, host_batch, key):
    """One step on a host batch [B, ...]; returns (replicated state, metrics from device 0)."""
    state, metrics = self._step(replicated_state, shard_batch(host_batch, self.num_devices), key)
    return state, jax.tree.map(lambda x: x[0], metrics)
