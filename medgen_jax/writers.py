"""Run outputs: metrics.jsonl (one record per log step and per evaluation, each naming its
model) and TensorBoard event files (`tensorboard/<model>/`). Only process 0 writes; on other
processes every call is a no-op.

Each step is recorded once, however often a run was killed and resumed: a writer opened for a
model that resumes from step S first drops that model's records after S from metrics.jsonl
(rewritten atomically) and rebuilds the model's TensorBoard folder from the records kept, so
neither file ever holds a step twice.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np

from medgen_jax import parallel
from medgen_jax.data.nifti import write_bytes_atomic


def _plain(value):
  """A JSON value: a float, or a list; non-finite numbers become null (strict JSON: jq and other
  tools refuse NaN; a phase of a method that does not compute a metric logs it as NaN)."""
  value = np.asarray(value, np.float64)
  if value.ndim == 0:
    return float(value) if np.isfinite(value) else None
  return value.tolist() if np.all(np.isfinite(value)) else [_plain(v) for v in value]


def read_records(path: str | Path) -> list[dict]:
  """The records of a metrics.jsonl; a torn last line (a kill mid-write) is ignored."""
  path = Path(path)
  if not path.is_file():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return records


class MetricWriter:
  def __init__(self, workdir: str | Path, *, model: str, resume_step: int = 0):
    self.enabled = parallel.is_main_process()
    self.model = model
    self._jsonl = None
    self._tb = None
    if not self.enabled:
      return
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "metrics.jsonl"
    records = read_records(path)
    kept = [r for r in records if r.get("model") != model or r.get("step", 0) <= resume_step]
    if len(kept) != len(records) or (path.is_file() and not path.read_text().endswith("\n")
                                     and path.stat().st_size):
      write_bytes_atomic(path, "".join(json.dumps(r) + "\n" for r in kept).encode())
    self._jsonl = open(path, "a")
    from tensorboardX import SummaryWriter  # light, TensorFlow-free event writer
    tb_dir = workdir / "tensorboard" / model
    shutil.rmtree(tb_dir, ignore_errors=True)
    self._tb = SummaryWriter(str(tb_dir))
    for record in kept:
      if record.get("model") == model:
        self._add_scalars(record)

  def _add_scalars(self, record: dict) -> None:
    for key, value in record.items():
      if key not in ("step", "kind", "model") and isinstance(value, float) and math.isfinite(value):
        self._tb.add_scalar(f"{record['kind']}/{key}", value, int(record["step"]))

  def write(self, step: int, kind: str, scalars: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "kind": kind, "model": self.model}
    record.update({k: _plain(v) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
    self._jsonl.flush()
    self._add_scalars(record)
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
