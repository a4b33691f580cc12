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
import queue
import threading

import jax
import numpy as np

AXIS_NAME = "batch"


def initialize_distributed() -> None:
  if os.environ.get("MEDGEN_JAX_DISTRIBUTED") == "1":
    jax.distributed.initialize()


def is_main_process() -> bool:
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (a no-op with one process): e.g. the
  other processes wait here while process 0 writes a dataset or a split file they will read."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


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
    mesh = jax.sharding.Mesh(np.asarray(self.devices), (AXIS_NAME,))
    self._sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS_NAME))

  def replicate(self, tree):
    stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (self.num_devices,) + np.shape(x)),
                           tree)
    return self._replicate(stacked)

  @staticmethod
  def unreplicate(tree):
    """The first device's copy, as host numpy arrays."""
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x[0])), tree)

  def put(self, host_batch):
    """Splits a host batch [B, ...] over the devices and starts copying it to them (the layout
    the pmapped step takes, so the step does not copy it again)."""
    return jax.device_put(shard_batch(host_batch, self.num_devices), self._sharding)

  def step(self, replicated_state, host_batch, key):
    """One step on a host batch [B, ...]; returns (replicated state, metrics from device 0)."""
    state, metrics = self._step(replicated_state, shard_batch(host_batch, self.num_devices), key)
    return state, jax.tree.map(lambda x: x[0], metrics)

  def step_on_devices(self, replicated_state, device_batch, key):
    """One step on a batch from `put`; returns (replicated state, replicated metrics). Nothing
    is brought back to the host, so the host never waits for the device here."""
    return self._step(replicated_state, device_batch, key)


class Prefetcher:
  """Builds the next `size` items in a background thread while the devices run the current
  step: `make(i)` for i in `indices`, e.g. a host batch put on the devices. Iterating yields
  them in order; an exception raised by `make` is re-raised by the iteration that would have
  returned its item. `close()` stops the thread (also at the end of a `with` block)."""

  def __init__(self, make, indices, *, size: int = 2):
    self._make = make
    self._indices = list(indices)
    self._remaining = len(self._indices)
    self._queue: queue.Queue = queue.Queue(maxsize=max(size, 1))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="medgen-prefetch", daemon=True)
    self._thread.start()

  def _run(self):
    for i in self._indices:
      if self._stop.is_set():
        return
      try:
        item = (True, self._make(i))
      except StopIteration as e:  # re-raised by __next__ it would end the consumer's loop early
        item = (False, RuntimeError(f"making item {i} raised StopIteration: {e}"))
      except BaseException as e:  # handed to the consumer, which re-raises it
        item = (False, e)
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if not item[0]:
        return

  def __iter__(self):
    return self

  def __next__(self):
    if not self._remaining:
      raise StopIteration
    ok, value = self._queue.get()
    self._remaining -= 1
    if not ok:
      self.close()
      raise value
    return value

  def close(self):
    self._stop.set()
    self._thread.join(timeout=10)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
