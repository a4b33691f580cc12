"""Run outputs on a bucket: every writer goes through etils.epath (medgen_jax/paths.py).

No network: `gs://` is served by an in-memory fsspec file system registered for the test (epath
reaches gs:// through fsspec when TensorFlow is absent). The same calls on a local folder must
give the same bytes. Checkpoints on gs:// go through orbax and tensorstore's own GCS driver,
which cannot be faked offline; they are not covered here.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from medgen_jax import runs, sweep
from medgen_jax.checkpoint import Checkpoints
from medgen_jax.config import base_config
from medgen_jax.data.splits import load_splits, save_splits
from medgen_jax.paths import as_path, is_local, write_bytes_atomic
from medgen_jax.writers import MetricWriter, read_records


class FakeGCS(MemoryFileSystem):
  protocol = ("gs", "gcs")
  store: dict = {}
  pseudo_dirs = [""]

  def __init__(self, *args, finalize_on_close=None, **kwargs):  # epath passes finalize_on_close
    super().__init__(*args, **kwargs)

  def _open(self, path, mode="rb", *args, **kwargs):
    # A GCS object cannot be appended to: gcsfs ignores mode 'a' and overwrites (it only warns,
    # fsspec/gcsfs#675), so a writer appending there would keep only its last line.
    if "a" in mode:
      raise NotImplementedError(f"mode {mode!r}: objects on gs:// cannot be appended to")
    return super()._open(path, mode, *args, **kwargs)


@pytest.fixture
def bucket():
  for name in ("gs", "gcs"):
    fsspec.register_implementation(name, FakeGCS, clobber=True)
  FakeGCS.store.clear()
  FakeGCS.pseudo_dirs[:] = [""]
  yield "gs://bucket"
  FakeGCS.store.clear()
  registered = sys.modules["fsspec.registry"]._registry  # back to fsspec's own (gcsfs) entries
  registered.pop("gs", None)
  registered.pop("gcs", None)


def _stored(path: str) -> bytes:
  return FakeGCS.store[path].getvalue()


def test_as_path_keeps_the_scheme_and_local_writes_leave_no_temporary_file(bucket, tmp_path):
  assert str(as_path(f"{bucket}/run") / "x.json") == "gs://bucket/run/x.json"
  assert is_local(tmp_path) and not is_local(f"{bucket}/run")
  write_bytes_atomic(tmp_path / "sub" / "a.json", b"{}\n")
  write_bytes_atomic(f"{bucket}/run/sub/a.json", b"{}\n")
  assert (tmp_path / "sub" / "a.json").read_bytes() == _stored("gs://bucket/run/sub/a.json") == b"{}\n"
  assert [p.name for p in (tmp_path / "sub").iterdir()] == ["a.json"]


def test_workdir_config_and_splits_on_a_bucket(bucket):
  workdir = runs.prepare_workdir(f"{bucket}/run")
  assert str(workdir) == "gs://bucket/run"
  config = base_config()
  runs.save_config(config, workdir)
  assert json.loads(_stored("gs://bucket/run/config.json"))["method"] == config.method
  assert runs.load_run_config(f"{bucket}/run").to_dict() == config.to_dict()  # a str, as the CLIs pass it
  other = base_config()
  other.num_steps = config.num_steps + 1
  with pytest.raises(ValueError, match="gs://bucket/run/config.json: this workdir holds a run with a "
                     "different config"):
    runs.check_config(other, workdir)
  splits = {"A": {"train": ["a0", "a1"], "val": [], "test": ["a2"]}}
  save_splits(workdir / "splits.json", splits, seed=3)
  assert load_splits(workdir / "splits.json") == splits


def test_metrics_on_a_bucket_are_rewritten_whole_and_resume_drops_later_steps(bucket, tmp_path):
  for root in (tmp_path, as_path(f"{bucket}/run")):
    writer = MetricWriter(root, model="deepall")
    for step in (1, 2, 3):
      writer.write(step, "train", {"loss": 1.0 / step})
    writer.close()
  local = (tmp_path / "metrics.jsonl").read_bytes()
  assert _stored("gs://bucket/run/metrics.jsonl") == local
  assert [r["step"] for r in read_records(f"{bucket}/run/metrics.jsonl")] == [1, 2, 3]
  with pytest.warns(RuntimeWarning, match="google-cloud-storage"):  # no TensorBoard on the fake bucket
    writer = MetricWriter(f"{bucket}/run", model="deepall", resume_step=2)
  writer.write(3, "train", {"loss": 0.25})
  writer.close()
  assert [r["loss"] for r in read_records(f"{bucket}/run/metrics.jsonl")] == [1.0, 0.5, 0.25]


def test_metrics_on_a_bucket_are_uploaded_at_most_every_interval_and_at_close(bucket, monkeypatch):
  import medgen_jax.writers as writers
  clock = [1000.0]
  monkeypatch.setattr(writers.time, "monotonic", lambda: clock[0])
  writer = MetricWriter(f"{bucket}/run", model="m")
  writer.write(1, "train", {"loss": 1.0})
  assert "gs://bucket/run/metrics.jsonl" not in FakeGCS.store  # within the interval: not uploaded
  clock[0] += writers.BUCKET_UPLOAD_SECONDS
  writer.write(2, "train", {"loss": 2.0})
  assert [r["step"] for r in read_records(f"{bucket}/run/metrics.jsonl")] == [1, 2]
  writer.write(3, "train", {"loss": 3.0})
  assert [r["step"] for r in read_records(f"{bucket}/run/metrics.jsonl")] == [1, 2]
  writer.close()
  assert [r["step"] for r in read_records(f"{bucket}/run/metrics.jsonl")] == [1, 2, 3]


def test_sweep_tables_on_a_bucket_equal_the_local_ones(bucket, tmp_path):
  rows = [{"method": "DeepAll", "site": "D", "seed": 0, "dice": 0.5}]
  for root in (tmp_path, as_path(f"{bucket}/sweep")):
    assert sweep.write_tables(root, "| a |\n", rows)
  for name in ("sweep.md", "sweep.csv"):
    assert _stored(f"gs://bucket/sweep/{name}") == (tmp_path / name).read_bytes()


def test_checkpoint_folder_on_a_bucket_keeps_its_scheme(bucket, tmp_path, monkeypatch):
  """Checkpoints makes a local folder absolute (orbax wants that) and leaves a bucket path as it is.
  (read_only: creating the manager on gs:// makes orbax ask google-cloud-storage about the bucket.)"""
  ckpts = Checkpoints(f"{bucket}/run/deepall/checkpoints", read_only=True)
  assert str(ckpts.directory) == "gs://bucket/run/deepall/checkpoints" and ckpts.steps() == []
  monkeypatch.chdir(tmp_path)
  assert str(Checkpoints("run/checkpoints", read_only=True).directory) == str(tmp_path / "run" / "checkpoints")


def test_a_bucket_without_its_file_system_package_is_one_error_naming_the_fix(bucket):
  # s3:// (never faked here) needs s3fs, which the test environment does not install
  if importlib.util.find_spec("s3fs") is not None:
    pytest.skip("s3fs is installed")
  with pytest.raises(ValueError, match=r"--workdir s3://bucket/run: .*s3fs.*Fix: pip install .*s3fs for s3://"):
    runs.prepare_workdir("s3://bucket/run")


def test_run_files_of_a_bucket_run_are_read_back_from_the_bucket(bucket, tmp_path):
  """prepare_data(run_dir=gs://...) must find the run's splits.json (pathlib turned gs://b/x into
  the local /gs/b/x, so a resume silently re-split): a saved split that names unknown cases is
  refused, naming the bucket file."""
  from helpers import make_sites_dataset
  from medgen_jax.data.errors import DataError
  from medgen_jax.data.pipeline import default_data_config, prepare_data
  config = default_data_config()
  config.root = str(make_sites_dataset(tmp_path / "toy", sites=("A", "B"), cases=3))
  config.held_out = ("B",)
  save_splits(f"{bucket}/run/splits.json", {"A": {"train": ["x0", "x1"], "val": [], "test": ["x2"]},
                                           "B": {"train": [], "val": [], "test": ["case0", "case1", "case2"]}})
  with pytest.raises(DataError, match="gs://bucket/run/splits.json"):
    prepare_data(config, run_dir=f"{bucket}/run", build_train=False, progress=lambda *a: None)

