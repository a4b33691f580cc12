"""Checkpoints: one orbax CheckpointManager behind a small interface.

Each checkpoint `<dir>/<step>/` holds the train state (`state`, orbax StandardSave) and a JSON
`meta` item (data sampler state, anything else needed to continue exactly). Kept: the latest
`keep` checkpoints plus the best one by the selection metric (`metrics[selection_key]`, higher is
better; checkpoints saved without that metric count only for "latest", never for "best").

A checkpoint that cannot be read (a crash during the write, a corrupt file) is moved aside to
`<dir>/<step>.corrupt` with a warning naming it — never deleted, never selected again, and its
step can be saved anew when training reaches it again. `restore_latest` then walks back to the
previous readable checkpoint; `restore_selected` to the next best one.
"""

from __future__ import annotations

import logging
import math
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
    score = self._score
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(n=max(keep, 1)),
        ocp.checkpoint_managers.BestN(get_metric_fn=score, reverse=False, n=1,
                                      keep_checkpoints_without_metrics=False),
    ])
    # best_fn makes orbax write the metrics next to each checkpoint (so "best" survives a
    # restart); the preservation policy decides what is deleted.
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                           best_fn=score, best_mode="max",
                                           keep_checkpoints_without_metrics=True,
                                           enable_async_checkpointing=save_async)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

  def _score(self, metrics) -> float:
    """The selection metric; -inf for a checkpoint saved without it (e.g. after the run's
    eval.selection was changed), so such a checkpoint is never preferred to a scored one."""
    value = (metrics or {}).get(self.selection_key)
    return float("-inf") if value is None or not math.isfinite(value) else float(value)

  def save(self, step: int, state, *, meta: dict, metrics: dict | None = None) -> None:
    """Saves host (unreplicated) `state` and JSON-able `meta` at `step`; `metrics` rank it."""
    self._manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        metrics=metrics, force=True)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def steps(self) -> list[int]:
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def scored_steps(self) -> dict[int, float]:
    """{step: selection metric} of the checkpoints saved with the selection metric."""
    out = {}
    for step in self.steps():
      try:
        value = self._score(self._manager.metrics(step))
      except Exception:  # unreadable metrics file: the step is not scored
        continue
      if value > float("-inf"):
        out[step] = value
    return out

  def best_step(self) -> int | None:
    """Step with the highest selection metric, or None if no checkpoint has that metric."""
    scored = self.scored_steps()
    return max(scored, key=lambda s: (scored[s], s)) if scored else None

  def restore(self, step: int, abstract_state):
    """(state, meta) at `step`, as host arrays shaped like `abstract_state`."""
    restored = self._manager.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def _try_restore(self, step: int, abstract_state, *, then: str):
    try:
      return self.restore(step, abstract_state)
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
      aside = self.move_aside(step)
      message = (f"checkpoint {self.directory / str(step)} cannot be read "
                 f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                 f"moved to {aside}; {then}")
      logging.warning(message)
      warnings.warn(message, CheckpointWarning, stacklevel=3)
      return None

  def restore_latest(self, abstract_state):
    """(state, meta, step) of the newest readable checkpoint, or None if there is none."""
    for step in reversed(self.steps()):
      restored = self._try_restore(step, abstract_state, then="falling back to the previous one")
      if restored is not None:
        return restored[0], restored[1], step
    return None

  def restore_selected(self, abstract_state, *, rule: str):
    """(state, meta, step, rule used) of the checkpoint chosen by `rule`: 'best' (the highest
    selection metric; falls back to the next best if unreadable) or 'last'. Returns None
    when no readable checkpoint fits the rule (for 'best': none was scored)."""
    while True:
      step = self.best_step() if rule == "best" else (self.steps() or [None])[-1]
      if step is None:
        return None
      restored = self._try_restore(step, abstract_state, then=f"choosing the {rule} of the others")
      if restored is not None:
        return restored[0], restored[1], step

  def move_aside(self, step: int) -> Path:
    """Renames `<dir>/<step>` to `<dir>/<step>.corrupt` (or `.corrupt-2`, ...): orbax no longer
    sees it, so it is never selected and the step can be written again."""
    source = self.directory / str(step)
    target = self.directory / f"{step}.corrupt"
    k = 1
    while target.exists():
      k += 1
      target = self.directory / f"{step}.corrupt-{k}"
    if source.exists():
      source.rename(target)
    self._manager.reload()
    return target

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(state):
  """A ShapeDtypeStruct tree for restoring into the structure of `state`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(getattr(x, "shape", ()), getattr(x, "dtype", None)), state)
