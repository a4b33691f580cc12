"""Every shipped config loads and validates; the prostate6 config runs on a synthetic folder."""

import runpy
from pathlib import Path

import numpy as np
import pytest

from helpers import write_nii
from medgen_jax import config as config_lib
from medgen_jax import train_lib

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


def load(path):
  return runpy.run_path(str(path))["get_config"]()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_validates_and_documents_its_command(path):
  config = load(path)
  doc = runpy.run_path(str(path)).get("__doc__") or ""
  assert "python " in doc, f"{path.name}: docstring must give its command"
  if "method" in config:  # experiment configs (data_brain_sites.py is the data block only)
    config_lib.validate(config)
    config.lock()
    with pytest.raises(AttributeError, match="Did you mean"):
      config.num_step = 3


def test_prostate_config_trains_on_a_synthetic_prostate6_folder(tmp_path):
  rng = np.random.default_rng(0)
  for site in ("BIDMC", "HK", "UCL"):
    for j in range(3):
      label = np.zeros((20, 20, 5), np.uint8)
      label[6:14, 6:14, 1:4] = 1
      label[8:11, 8:11, 2] = 2  # NCI-ISBI style zone label, merged into 1
      image = (label * 50 + rng.normal(100, 10, label.shape)).astype(np.float32)
      write_nii(tmp_path / "p6" / site / f"Case{j:02d}.nii.gz", image)
      write_nii(tmp_path / "p6" / site / f"Case{j:02d}_Segmentation.nii.gz", label)
  config = load(Path(__file__).resolve().parents[1] / "configs" / "deepall_prostate.py")
  config.data.root = str(tmp_path / "p6")
  config.data.in_plane_shape = (16, 16)
  config.model.base_features = 4
  config.model.depth = 2
  config.batch_size = 4
  config.num_steps = 2
  config.eval_every = 2
  config.checkpoint.every = 2
  config.progress_bar = False
  config.lock()
  result = train_lib.train_and_evaluate(config, tmp_path / "run")
  assert {r["site"] for r in result["records"]} == {"BIDMC", "HK", "UCL"}
  assert all(r["role"] == "unseen" for r in result["records"] if r["site"] == "BIDMC")
