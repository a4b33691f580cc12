"""Data parallelism: the only module that knows about devices and processes.

`jax.pmap` over the named axis `batch` (in JAX >= 0.10 pmap is itself jit(shard_map)). A train
step is written once as `step(state, batch, key)`, with collectives on `AXIS_NAME` when it is
built with `axis_name=AXIS_NAME`; `DataParallel` replicates the state, splits host batches over
the devices, runs the pmapped step and brings results back. With one device it is the same code
path.

Multi-host (TPU pods, multi-node GPU, or several local CPU processes): `initialize_distributed`
calls `jax.distributed.initialize` before any device is touched (from the train CLI's
--coordinator_address/--num_processes/--process_id, or from the environment on TPU VMs and under
Slurm with MEDGEN_JAX_DISTRIBUTED=1); CPU processes talk through gloo. Then the pmap spans every
device of every process, ordered by process (`global_devices`). Every process draws the SAME
global batch from the same sampler seed and feeds its devices its rows of it (`process_rows`, or a
sampler's `batch_at(step, block=process_block())` that assembles only those rows), so N
processes × M devices compute exactly what one process with N·M devices computes. Only process 0
writes files (`is_main_process`); checkpoints are saved and restored by every process together
(orbax's multi-host protocol).
"""

from __future__ import annotations

import os
import queue
import threading

import jax
import numpy as np

AXIS_NAME = "batch"


def initialize_distributed(*, coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Starts JAX's multi-process runtime; True if it did. Explicit arguments (all three, e.g. from
  the CLI flags) or MEDGEN_JAX_DISTRIBUTED=1 with none of them (JAX then reads the TPU VM or Slurm
  environment); otherwise a single-process run and nothing happens."""
  given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
           "--process_id": process_id}
  if all(v is None for v in given.values()):
    if os.environ.get("MEDGEN_JAX_DISTRIBUTED") != "1":
      return False
  elif any(v is None for v in given.values()):
    missing = " ".join(k for k, v in given.items() if v is None)
    raise ValueError(f"multi-process flags: {missing} missing. Fix: give --coordinator_address, "
                     "--num_processes and --process_id together (or none of them on TPU VMs / under Slurm "
                     "with MEDGEN_JAX_DISTRIBUTED=1)")
  elif not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} is not in 0 .. --num_processes-1 = {num_processes - 1}")
  # The only CPU collectives JAX has across processes; GPU (NCCL) and TPU ignore this setting.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)
  return True


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


def device_count() -> int:
  """Devices of all processes: what a global batch is split over."""
  return jax.device_count()


def global_devices() -> list:
  """Every process's devices, process 0's first: process p's devices hold the p-th contiguous
  block of the pmapped axis, the rows `process_rows` gives it."""
  return sorted(jax.devices(), key=lambda d: (d.process_index, d.id))


def process_block() -> tuple[int, int]:
  """(this process's index, number of processes): the block of a global batch this process keeps,
  for a sampler's `batch_at(step, block=...)` that assembles only those rows."""
  return jax.process_index(), jax.process_count()


def block_rows(size: int, block: tuple[int, int]) -> tuple[int, int]:
  """Rows [start, stop) of block p of P contiguous blocks of a batch of `size`: the rows process
  p of P keeps (`process_rows`, and the samplers' `batch_at(step, block=...)`)."""
  p, count = block
  if size % count:
    raise ValueError(f"a batch of {size} cannot be split over {count} processes; use a batch size that is "
                     f"a multiple of the number of devices")
  return p * (size // count), (p + 1) * (size // count)


def process_rows(batch, *, process_index: int | None = None, process_count: int | None = None):
  """This process's rows of a global batch: each leaf [B, ...] -> its p-th of P contiguous blocks
  [B / P, ...] (the identity with one process)."""
  p = jax.process_index() if process_index is None else process_index
  n = jax.process_count() if process_count is None else process_count
  if n == 1:
    return batch

  def rows(x):
    x = np.asarray(x)
    start, stop = block_rows(x.shape[0], (p, n))
    return x[start:stop]

  return jax.tree.map(rows, batch)


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
  """Runs `step(state, batch, key)` pmapped over `num_devices` local devices, or over every
  device of every process in a multi-process run (`num_devices` must then be None or all of them).
  Batches given to `put`/`step` are global; each process keeps its own rows (`process_rows`).

  `replicate`/`unreplicate` move a state between host and devices; the replication itself is
  a pmap over the same axis name, which keeps the step from recompiling on its second call.
  """

  def __init__(self, step_fn, *, num_devices: int | None = None, donate: bool = True):
    if jax.process_count() > 1:
      if num_devices not in (None, jax.device_count()):
        raise ValueError(f"num_devices={num_devices}: a multi-process run uses all {jax.device_count()} "
                         "devices of its processes")
      self.num_devices = jax.device_count()
      self.devices = global_devices()
    else:
      self.num_devices = num_devices or jax.local_device_count()
      self.devices = jax.local_devices()[: self.num_devices]
    self.num_local = len([d for d in self.devices if d.process_index == jax.process_index()])
    self._step = jax.pmap(step_fn, axis_name=AXIS_NAME, in_axes=(0, 0, None),
                          donate_argnums=(0,) if donate else (), devices=self.devices)
    self._replicate = jax.pmap(lambda x: x, axis_name=AXIS_NAME, devices=self.devices)
    mesh = jax.sharding.Mesh(np.asarray(self.devices), (AXIS_NAME,))
    self._sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS_NAME))

  def replicate(self, tree):
    stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (self.num_local,) + np.shape(x)),
                           tree)
    return self._replicate(stacked)

  @staticmethod
  def unreplicate(tree):
    """The first local device's copy, as host numpy arrays (a pmap's outputs hold this
    process's devices only)."""
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x[0])), tree)

  def _local_shards(self, host_batch, *, rows_only: bool = False):
    return shard_batch(host_batch if rows_only else process_rows(host_batch), self.num_local)

  def put(self, host_batch, *, rows_only: bool = False):
    """Splits this process's rows of a global host batch [B, ...] over its devices and starts
    copying them (the layout the pmapped step takes, so the step does not copy it again).
    `rows_only`: `host_batch` already holds only this process's rows (a sampler's
    `batch_at(step, block=process_block())`)."""
    shards = self._local_shards(host_batch, rows_only=rows_only)
    if jax.process_count() == 1:
      return jax.device_put(shards, self._sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self._sharding, x), shards)

  def step(self, replicated_state, host_batch, key):
    """One step on a global host batch [B, ...]; returns (replicated state, metrics from the
    first local device)."""
    state, metrics = self._step(replicated_state, self._local_shards(host_batch), key)
    return state, jax.tree.map(lambda x: x[0], metrics)

  def lower(self, replicated_state, device_batch, key):
    """The pmapped step lowered for these arguments (a batch from `put`): `.compile()` it once
    ahead of time, or read XLA's cost and memory analyses (benchmarks/train_step.py)."""
    return self._step.lower(replicated_state, device_batch, key)

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
