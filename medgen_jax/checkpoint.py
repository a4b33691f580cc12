"""Checkpoints: one orbax CheckpointManager behind a small interface.

Each checkpoint `<dir>/<step>/` holds the train state (`state`, orbax StandardSave) and a JSON
`meta` item (data sampler state, anything else needed to continue exactly). Kept: the latest
`keep` checkpoints plus the best one by the selection metric (`metrics[selection_key]`, higher is
better; checkpoints saved without that metric count only for "latest", never for "best").

A checkpoint that cannot be read (a crash during the write, a corrupt file, an unreadable
metrics file) is moved aside to `<dir>/<step>.corrupt` with a warning naming it — never deleted,
never selected again, and its step can be saved anew when training reaches it again.
`restore_latest` then walks back to the previous readable checkpoint; `restore_selected` to the
next best one. With `read_only=True` (evaluation, prediction) nothing is moved: an unreadable
checkpoint is skipped with a warning. A checkpoint whose state has another structure than the
one asked for (written by another medgen_jax version or method) is not damage: that is a
ValueError naming the fix, and nothing is moved.

Besides the latest `keep`, the best checkpoint by *each* selection metric a run recorded
(`val_dice`, `oracle_dice`) is kept, so a run can be re-evaluated under either rule it scored.
"""

from __future__ import annotations

import json
import math
import os
import warnings

import jax
import orbax.checkpoint as ocp

from medgen_jax import parallel
from medgen_jax.paths import as_path, is_local

SELECTION_KEYS = ("val_dice", "oracle_dice")


class CheckpointWarning(UserWarning):
  pass


def _score(metrics, key: str) -> float:
  """metrics[key]; -inf for a checkpoint saved without it, so it is never "best"."""
  value = (metrics or {}).get(key)
  return float("-inf") if value is None or not math.isfinite(value) else float(value)


def _leaf_paths(tree) -> set[tuple[str, ...]]:
  def name(k):
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  return {tuple(name(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


class Checkpoints:
  def __init__(self, directory, *, keep: int = 3, selection_key: str = "val_dice",
               save_async: bool = False, read_only: bool = False):
    # orbax wants an absolute local path; a bucket path is absolute already
    self.directory = as_path(os.path.abspath(directory) if is_local(directory) else directory)
    self.selection_key = selection_key
    self.read_only = read_only
    self._set_aside_unreadable_metrics()
    keys = dict.fromkeys((selection_key,) + SELECTION_KEYS)
    policy = ocp.checkpoint_managers.AnyPreservationPolicy(
        [ocp.checkpoint_managers.LatestN(n=max(keep, 1))] +
        [ocp.checkpoint_managers.BestN(get_metric_fn=lambda m, k=k: _score(m, k), reverse=False, n=1,
                                       keep_checkpoints_without_metrics=False) for k in keys])
    # best_fn makes orbax write the metrics next to each checkpoint (so "best" survives a
    # restart); the preservation policy decides what is deleted.
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=not read_only,
                                           best_fn=self._score, best_mode="max",
                                           keep_checkpoints_without_metrics=True,
                                           enable_async_checkpointing=save_async,
                                           # a kill mid-save leaves an unfinished temporary folder
                                           cleanup_tmp_directories=not read_only)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

  def _score(self, metrics) -> float:
    return _score(metrics, self.selection_key)

  def _set_aside_unreadable_metrics(self) -> None:
    """orbax parses every step's metrics file when it opens the folder; one torn file would make
    the whole run unusable, so such a step is treated as a damaged checkpoint."""
    damaged = []
    if self.directory.is_dir():
      for step_dir in sorted(p for p in self.directory.iterdir() if p.name.isdigit()):
        path = step_dir / "metrics" / "metrics"
        if not path.is_file():
          continue
        try:
          json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
          damaged.append((int(step_dir.name), f"its metrics file {path} is unreadable ({e})"))
    # Every process lists before process 0 renames anything (move_aside), so all of them see the
    # same damaged steps and meet at the same barriers.
    parallel.barrier(f"medgen_jax.checkpoint:listed:{self.directory}")
    for step, reason in damaged:
      self._damaged(step, reason, then="it is not used")

  def _damaged(self, step: int, reason: str, *, then: str) -> None:
    where = self.directory / str(step)
    if self.read_only:
      if reason.startswith("its metrics file"):
        raise ValueError(f"{where}: {reason}. Fix: move that step folder out of {self.directory} "
                         "(or resume the training, which moves it aside), then retry")
      action = "skipped"
    else:
      action = f"moved to {self.move_aside(step)}"
    warnings.warn(f"checkpoint {where} cannot be read: {reason}; {action}; {then}",
                  CheckpointWarning, stacklevel=4)

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
      value = self._score(self._manager.metrics(step))
      if value > float("-inf"):
        out[step] = value
    return out

  def best_step(self, *, exclude=()) -> int | None:
    """Step with the highest selection metric, or None if no checkpoint has that metric."""
    scored = {s: v for s, v in self.scored_steps().items() if s not in exclude}
    return max(scored, key=lambda s: (scored[s], s)) if scored else None

  def check_structure(self, step: int, abstract_state) -> None:
    """Raises ValueError if the checkpoint's state has other leaves than `abstract_state` (a
    checkpoint of another medgen_jax version or method configuration: not damage)."""
    try:
      saved = self._manager.item_metadata(int(step))["state"]
      saved_paths = _leaf_paths(getattr(saved, "tree", saved))
    except Exception:  # unreadable metadata is damage: the restore below will say so
      return
    expected = _leaf_paths(abstract_state)
    if saved_paths and saved_paths != expected:
      missing = sorted("/".join(p) for p in expected - saved_paths)[:3]
      extra = sorted("/".join(p) for p in saved_paths - expected)[:3]
      raise ValueError(f"{self.directory / str(step)}: the saved train state has another structure than "
                       f"this medgen_jax version and config expect (missing {missing}, unexpected {extra}). "
                       "Fix: use the medgen_jax version and config that wrote it, or train again in a new "
                       "--workdir")

  def restore(self, step: int, abstract_state):
    """(state, meta) at `step`, as host arrays shaped like `abstract_state`."""
    restored = self._manager.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def _try_restore(self, step: int, abstract_state, *, then: str):
    self.check_structure(step, abstract_state)
    try:
      return self.restore(step, abstract_state)
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
      detail = str(e).splitlines()[0][:200] if str(e) else ""
      self._damaged(step, f"{type(e).__name__}: {detail}", then=then)
      return None

  def restore_latest(self, abstract_state):
    """(state, meta, step) of the newest readable checkpoint, or None if there is none."""
    for step in reversed(self.steps()):
      restored = self._try_restore(step, abstract_state, then="falling back to the previous one")
      if restored is not None:
        return restored[0], restored[1], step
    return None

  def restore_selected(self, abstract_state, *, rule: str):
    """(state, meta, step) of the checkpoint chosen by `rule`: 'best' (the highest selection
    metric; the next best if unreadable) or 'last' (the newest readable). None when no readable
    checkpoint fits the rule (for 'best': none was scored)."""
    if rule == "last":
      return self.restore_latest(abstract_state)
    skipped: set[int] = set()
    while True:
      step = self.best_step(exclude=skipped)
      if step is None:
        return None
      restored = self._try_restore(step, abstract_state, then="choosing the next best one")
      if restored is not None:
        return restored[0], restored[1], step
      skipped.add(step)

  def move_aside(self, step: int):
    """Renames `<dir>/<step>` to `<dir>/<step>.corrupt` (or `.corrupt-2`, ...): orbax no longer
    sees it, so it is never selected and the step can be written again. Process 0 renames; the
    others wait for it."""
    source = self.directory / str(step)
    target = self.directory / f"{step}.corrupt"
    k = 1
    while target.exists():
      k += 1
      target = self.directory / f"{step}.corrupt-{k}"
    if parallel.is_main_process() and source.exists():
      source.rename(target)
    parallel.barrier(f"medgen_jax.checkpoint:move_aside:{source}")
    if hasattr(self, "_manager"):
      self._manager.reload()
    return target

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(state):
  """A ShapeDtypeStruct tree for restoring into the structure of `state`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(getattr(x, "shape", ()), getattr(x, "dtype", None)), state)
