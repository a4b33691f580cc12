"""Run outputs on local disks or cloud buckets: one path type, `etils.epath.Path`.

`--workdir gs://bucket/run` (or s3://...) works wherever orbax's checkpoints work, because every
output (config, splits, normalizer, metrics.jsonl, results, sweep tables, checkpoints) goes through
`epath.Path`, the path type orbax takes; epath reaches buckets through fsspec (gcsfs, s3fs) or
TensorFlow's gfile when either is installed. Local paths behave exactly as before.

`write_bytes_atomic`: readers never see a half-written file. Locally, a temporary file in the
same folder is renamed over the target (`os.replace`, atomic on POSIX); on an object store a
single upload already is atomic (the object appears whole or not at all), so it is written directly.
"""

from __future__ import annotations

import os

from etils import epath


def as_path(path) -> epath.Path:
  """`path` (str, os.PathLike or epath.Path) as an epath.Path; 'gs://b/x' keeps its scheme
  (pathlib.Path would turn it into 'gs:/b/x')."""
  return path if isinstance(path, epath.Path) else epath.Path(path)


def is_local(path) -> bool:
  return "://" not in str(path)


def write_bytes_atomic(path, payload: bytes) -> None:
  path = as_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if not is_local(path):
    path.write_bytes(payload)
    return
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  try:
    with open(tmp, "wb") as f:
      f.write(payload)
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()
