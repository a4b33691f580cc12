"""Run outputs: metrics.jsonl (one record per log step and per evaluation) and TensorBoard
event files. Only process 0 writes; on other processes every call is a no-op."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from medgen_jax import parallel


def _plain(value):
  value = np.asarray(value)
  return float(value) if value.ndim == 0 else value.tolist()


class MetricWriter:
  def __init__(self, workdir: str | Path, *, prefix: str = ""):
    self.enabled = parallel.is_main_process()
    self.prefix = prefix
    self._jsonl = None
    self._tb = None
    if self.enabled:
      workdir = Path(workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      self._jsonl = open(workdir / "metrics.jsonl", "a")
      from tensorboardX import SummaryWriter  # light, TensorFlow-free event writer
      self._tb = SummaryWriter(str(workdir / "tensorboard"))

  def write(self, step: int, kind: str, scalars: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "kind": kind}
    if self.prefix:
      record["model"] = self.prefix
    record.update({k: _plain(v) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for key, value in record.items():
      if isinstance(value, float) and math.isfinite(value):
        self._tb.add_scalar(f"{self.prefix}{'/' if self.prefix else ''}{kind}/{key}", value, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
