"""The run folder's config: config.json written once, compared on resume, read back by evaluate,
predict and the sweep (which reuse a run only when its config is the same)."""

from __future__ import annotations

import json

import ml_collections
from etils import epath

from medgen_jax import config as config_lib
from medgen_jax import parallel
from medgen_jax.paths import as_path, write_bytes_atomic

# Keys that may change between a run and its resumption (they do not change what is computed).
RESUMABLE_KEYS = ("progress_bar", "log_every", "eval.batch_size", "eval.selection", "eval.distances",
                  "checkpoint.async_save")


def config_from_json(payload: dict) -> ml_collections.ConfigDict:
  """A saved config.json back to a locked ConfigDict with the base config's types."""
  config = config_lib.base_config()

  def merge(target, values, prefix=""):
    for key, value in values.items():
      if key not in target:
        raise KeyError(f"config.json key {prefix}{key} is unknown to this medgen_jax version")
      if isinstance(target[key], ml_collections.ConfigDict):
        merge(target[key], value, f"{prefix}{key}.")
      else:
        target[key] = tuple(value) if isinstance(value, list) else value

  merge(config, payload)
  config.lock()
  return config


def load_run_config(workdir) -> ml_collections.ConfigDict:
  """The config a run was started with; a ValueError naming the fix when there is none."""
  path = as_path(workdir) / "config.json"
  if not path.is_file():
    raise ValueError(f"{path}: no run was started here (no config.json). Fix: give the --workdir of a "
                     "run made by python -m medgen_jax.train")
  try:
    return config_from_json(json.loads(path.read_text()))
  except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{path}: unreadable run config ({e}). Fix: use a run made by this medgen_jax "
                     "version, or train again in a new --workdir") from None


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_differences(saved: dict, current: dict) -> list[str]:
  """Dotted keys whose values differ between two config payloads (JSON dicts), ignoring the
  keys a run may change when it resumes (RESUMABLE_KEYS) and the keys added to the base config
  after the run was saved (absent from `saved`) that still hold their default value: a new
  option at its default is what the older code did, so the run stays the same run."""
  saved, current = _flatten(saved), _flatten(current)
  defaults = _flatten(json.loads(config_lib.base_config().to_json()))
  missing = object()

  def differs(k):
    if k not in saved and k in defaults and current.get(k, missing) == defaults[k]:
      return False
    return saved.get(k) != current.get(k)

  return sorted(k for k in set(saved) | set(current) if differs(k) and k not in RESUMABLE_KEYS)


def check_config(config, workdir: epath.Path) -> None:
  """Refuses a workdir whose saved run had a different config."""
  path = workdir / "config.json"
  if path.is_file():
    differ = config_differences(json.loads(path.read_text()), json.loads(config.to_json()))
    if differ:
      raise ValueError(f"{path}: this workdir holds a run with a different config ({', '.join(differ)}). "
                       "Fix: use a new --workdir, or the same config to resume")


def save_config(config, workdir: epath.Path) -> None:
  """Writes config.json (after `check_config`; process 0 only)."""
  check_config(config, workdir)
  if parallel.is_main_process():
    payload = json.loads(config.to_json())
    write_bytes_atomic(workdir / "config.json", (json.dumps(payload, indent=1, sort_keys=True) + "\n").encode())


def prepare_workdir(workdir) -> epath.Path:
  """The run folder (created), local or in a bucket (medgen_jax/paths.py)."""
  workdir = as_path(workdir)
  try:
    if workdir.exists() and not workdir.is_dir():
      raise ValueError(f"--workdir {workdir} is a file, not a folder. Fix: give a folder path")
    workdir.mkdir(parents=True, exist_ok=True)
  except ImportError as e:  # epath reaches buckets through optional packages
    raise ValueError(f"--workdir {workdir}: {e}. Fix: pip install 'medgen_jax[gcs]' for gs:// "
                     "(gcsfs, google-cloud-storage), or s3fs for s3://") from None
  return workdir
