"""Checkpoints: one orbax CheckpointManager behind a small interface.

Each checkpoint `<dir>/<step>/` holds the train state (`state`, orbax StandardSave) and a JSON
`meta` item (data sampler state, anything else needed to continue exactly). Kept: the latest
`keep` checkpoints plus the best one by the selection metric (`metrics[selection_key]`, higher is
better; checkpoints saved without metrics count only for "latest").

`restore_latest` walks back from the newest checkpoint: a checkpoint that cannot be read (a
crash during the write, a corrupt file) is skipped with a warning naming it, and the previous
one is used. Nothing is ever deleted by a failed restore.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp


class CheckpointWarning(UserWarning):
  pass


class Checkpoints:
  def __init__(self, directory: str | Path, *, keep: int = 3, selection_key: str = "val_dice",
               save_async: bool = False):
    self.directory = Path(directory).absolute()
    self.selection_key = selection_key
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(n=max(keep, 1)),
        ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m[selection_key], reverse=False, n=1,
                                      keep_checkpoints_without_metrics=False),
    ])
    # best_fn makes orbax write the metrics next to each checkpoint (so "best" survives a
    # restart); the preservation policy decides what is deleted.
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                           best_fn=lambda m: m[selection_key], best_mode="max",
                                           keep_checkpoints_without_metrics=True,
                                           enable_async_checkpointing=save_async)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

  def save(self, step: int, state, *, meta: dict, metrics: dict | None = None) -> None:
    """Saves host (unreplicated) `state` and JSON-able `meta` at `step`; `metrics` rank it."""
    if metrics is not None and self.selection_key not in metrics:
      raise KeyError(f"metrics for checkpoint {step} lack the selection key {self.selection_key!r}")
    self._manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        metrics=metrics, force=True)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def steps(self) -> list[int]:
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def best_step(self) -> int | None:
    """Step with the highest selection metric among checkpoints saved with metrics."""
    self._manager.reload()
    return self._manager.best_step()

  def restore(self, step: int, abstract_state):
    """(state, meta) at `step`, as host arrays shaped like `abstract_state`."""
    restored = self._manager.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def restore_latest(self, abstract_state):
    """(state, meta, step) of the newest readable checkpoint, or None if there is none."""
    for step in reversed(self.steps()):
      try:
        state, meta = self.restore(step, abstract_state)
        return state, meta, step
      except Exception as e:  # orbax/tensorstore raise many types for damaged files
        message = (f"checkpoint {self.directory / str(step)} cannot be read "
                   f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); falling back to the previous one")
        logging.warning(message)
        warnings.warn(message, CheckpointWarning, stacklevel=2)
    return None

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(state):
  """A ShapeDtypeStruct tree for restoring into the structure of `state`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(getattr(x, "shape", ()), getattr(x, "dtype", None)), state)
