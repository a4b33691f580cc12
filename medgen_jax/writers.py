"""Run outputs: metrics.jsonl (one record per log step and per evaluation, each naming its
model) and TensorBoard event files (`tensorboard/<model>/`). Only process 0 writes; on other
processes every call is a no-op.

Each step is recorded once, however often a run was killed and resumed: a writer opened for a
model that resumes from step S first drops that model's records after S from metrics.jsonl
(rewritten atomically) and rebuilds the model's TensorBoard folder from the records kept, so
neither file ever holds a step twice.

The workdir may be a bucket (medgen_jax/paths.py): an object cannot be appended to, so there
metrics.jsonl is rewritten whole, at most every `BUCKET_UPLOAD_SECONDS` and at `close` (GCS takes
about one write per second per object; a resume drops records after its checkpoint anyway).
TensorBoard event files go through tensorboardX, which writes to gs:// and s3:// only with its
cloud extras installed; where it cannot open the folder, a warning says so and metrics.jsonl
(which holds every scalar) is still written.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings

import numpy as np

from medgen_jax import parallel
from medgen_jax.paths import as_path, is_local, write_bytes_atomic


def _plain(value):
  """A JSON value: a float, or a list; non-finite numbers become null (strict JSON: jq and other
  tools refuse NaN; a phase of a method that does not compute a metric logs it as NaN)."""
  value = np.asarray(value, np.float64)
  if value.ndim == 0:
    return float(value) if np.isfinite(value) else None
  return value.tolist() if np.all(np.isfinite(value)) else [_plain(v) for v in value]


def read_records(path) -> list[dict]:
  """The records of a metrics.jsonl; a torn last line (a kill mid-write) is ignored."""
  path = as_path(path)
  if not path.is_file():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return records


def _missing_tensorboard_writer(folder) -> str | None:
  """The package tensorboardX's event writer needs for `folder`'s file system, if not installed."""
  import importlib.util
  scheme = str(folder).split("://", 1)[0] if not is_local(folder) else ""
  needs = {"gs": ("google.cloud.storage", "google-cloud-storage"), "s3": ("boto3", "boto3")}
  if scheme not in needs:
    return None if is_local(folder) else f"a writer for {scheme}:// (tensorboardX has gs:// and s3://)"
  module, package = needs[scheme]
  try:
    found = importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:
    found = False
  return None if found else package


BUCKET_UPLOAD_SECONDS = 30.0


class MetricWriter:
  def __init__(self, workdir, *, model: str, resume_step: int = 0):
    self.enabled = parallel.is_main_process()
    self.model = model
    self._jsonl = None
    self._tb = None
    if not self.enabled:
      return
    workdir = as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self._path = path = workdir / "metrics.jsonl"
    records = read_records(path)
    kept = [r for r in records if r.get("model") != model or r.get("step", 0) <= resume_step]
    if len(kept) != len(records) or (path.is_file() and not path.read_text().endswith("\n")
                                     and path.stat().st_size):
      write_bytes_atomic(path, "".join(json.dumps(r) + "\n" for r in kept).encode())
    if is_local(path):
      self._jsonl = open(path, "a")
    else:  # an object store: the lines are kept here and the object rewritten now and then
      self._lines = [json.dumps(r) + "\n" for r in kept]
      self._uploaded = time.monotonic()
    tb_dir = workdir / "tensorboard" / model
    if is_local(tb_dir):
      shutil.rmtree(tb_dir, ignore_errors=True)
    elif tb_dir.exists():
      tb_dir.rmtree()
    missing = _missing_tensorboard_writer(tb_dir)
    if missing:
      warnings.warn(f"no TensorBoard events in {tb_dir}: tensorboardX needs {missing} to write there; "
                    f"metrics.jsonl has every scalar. Fix: pip install {missing}", RuntimeWarning, stacklevel=2)
    else:
      from tensorboardX import SummaryWriter  # light, TensorFlow-free event writer
      self._tb = SummaryWriter(str(tb_dir))
    for record in kept:
      if record.get("model") == model:
        self._add_scalars(record)

  def _add_scalars(self, record: dict) -> None:
    if self._tb is None:
      return
    for key, value in record.items():
      if key not in ("step", "kind", "model") and isinstance(value, float) and math.isfinite(value):
        self._tb.add_scalar(f"{record['kind']}/{key}", value, int(record["step"]))

  def write(self, step: int, kind: str, scalars: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "kind": kind, "model": self.model}
    record.update({k: _plain(v) for k, v in scalars.items()})
    line = json.dumps(record, allow_nan=False) + "\n"
    if self._jsonl is not None:
      self._jsonl.write(line)
      self._jsonl.flush()
    else:
      self._lines.append(line)
      if time.monotonic() - self._uploaded >= BUCKET_UPLOAD_SECONDS:
        self._upload()
    self._add_scalars(record)
    if self._tb is not None:
      self._tb.flush()

  def _upload(self) -> None:
    write_bytes_atomic(self._path, "".join(self._lines).encode())
    self._uploaded = time.monotonic()

  def close(self) -> None:
    if self.enabled:
      if self._jsonl is not None:
        self._jsonl.close()
      else:
        self._upload()
      if self._tb is not None:
        self._tb.close()
