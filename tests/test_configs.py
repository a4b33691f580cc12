"""Every shipped config loads and validates; the prostate6 config runs on a synthetic folder."""

import runpy
from pathlib import Path

import numpy as np
import pytest

from helpers import write_nii
from medgen_jax import config as config_lib
from medgen_jax import train_lib
from medgen_jax.methods import episodic

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.py"))
UDA_ARGS = (None, "quick", "brain", "brain_quick")


def load(path):
  return runpy.run_path(str(path))["get_config"]()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.parent.name + "/" + p.stem for p in CONFIGS])
def test_config_loads_validates_and_documents_its_command(path):
  config = load(path)
  doc = runpy.run_path(str(path)).get("__doc__") or ""
  assert "python " in doc, f"{path.name}: docstring must give its command"
  if "method" in config:  # experiment configs (data_brain_sites.py is the data block only)
    config_lib.validate(config)
    if config.meta.optimizers == "released":  # the docstring says which optimizers run
      assert "meta.optimizers='released'" in doc and "outer_clip" in doc, path.name
    config.lock()
    with pytest.raises(AttributeError, match="Did you mean"):
      config.num_step = 3
  if path.parent.name == "uda":  # every benchmark and size of the cross-modality configs
    for arg in UDA_ARGS:
      config_lib.validate(runpy.run_path(str(path))["get_config"](arg))


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


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name,task_lr,lr,outer_clip,inner_clip", [
    ("saml_prostate", 1e-4, 1e-3, 10.0, 10.0),   # SAML code: Adam 1e-4 (task) + Adam 1e-3 (meta), clip 10
    ("masf_prostate", 1e-3, 1e-3, 2.0, 2.0),     # MASF code: Adam(outer_lr) twice, clip 2
    ("masf_brain", 1e-3, 1e-3, 2.0, 2.0)])
def test_masf_and_saml_configs_use_the_released_optimizers(name, task_lr, lr, outer_clip, inner_clip):
  config = load(CONFIG_DIR / f"{name}.py")
  assert config.meta.optimizers == "released" and config.optimizer.name == "adam"
  assert episodic.task_learning_rate(config) == task_lr and config.optimizer.learning_rate == lr
  assert (config.meta.outer_clip, config.meta.clip) == (outer_clip, inner_clip)
  assert episodic.make_task_optimizer(config) is not None


def test_released_optimizers_are_rejected_where_no_code_had_them():
  config = load(CONFIG_DIR / "mldg_prostate.py")
  assert config.meta.optimizers == "summed"
  config.meta.optimizers = "released"
  with pytest.raises(ValueError, match="meta.optimizers.*'released'.*'mldg'.*summed"):
    config_lib.validate(config)
  config.meta.optimizers = "both"
  with pytest.raises(ValueError, match="unknown mode 'both'"):
    config_lib.validate(config)


def test_settings_that_would_be_ignored_are_refused():
  config = load(CONFIG_DIR / "mldg_prostate.py")
  config.meta.outer_clip = 2.0
  with pytest.raises(ValueError, match="meta.outer_clip: MLDG has no separate meta gradient"):
    config_lib.validate(config)
  config = load(CONFIG_DIR / "saml_prostate.py")
  config.meta.optimizers = "summed"
  with pytest.raises(ValueError, match="meta.task_learning_rate: is used only with meta.optimizers='released'"):
    config_lib.validate(config)
  config.meta.task_learning_rate = 0.0
  config_lib.validate(config)


def test_multisite_configs_validate_at_every_size():
  for path in sorted((CONFIG_DIR / "multisite").glob("*.py")):
    get_config = runpy.run_path(str(path))["get_config"]
    args = (["quick,none", "quick,histogram,n4", "full,scaled", "prostate6,whitening"]
            if path.stem == "normalization" else [None, "quick", "prostate6"])
    for arg in args:
      config = get_config(arg)
      config_lib.validate(config)
      assert config.data.held_out == (), (path.name, arg)
      assert config.batch_size % 6 == 0, (path.name, arg)   # domain-balanced over six sites
  bad = runpy.run_path(str(CONFIG_DIR / "multisite" / "normalization.py"))["get_config"]
  with pytest.raises(ValueError, match="SIZE,INTENSITIES"):
    bad("quick,zscore")


def test_saml_ablation_rows_differ_only_in_the_two_weights_and_are_named():
  from medgen_jax import methods
  get_config = runpy.run_path(str(CONFIG_DIR / "saml_ablation.py"))["get_config"]
  for size in ("quick", "full", "prostate6"):
    rows = {row: get_config(f"{size},{row}") for row in ("meta", "compact", "full")}
    flat = {row: dict(c.to_dict()) for row, c in rows.items()}
    for row, c in rows.items():
      config_lib.validate(c)
      others = {k: v for k, v in flat[row].items() if k != "saml"}
      assert others == {k: v for k, v in flat["full"].items() if k != "saml"}, (size, row)
    assert [(c.saml.compactness_weight, c.saml.smoothness_weight) for c in rows.values()] == \
        [(0.0, 0.0), (1.0, 0.0), (1.0, 0.005)]
    assert [methods.label(c, ["A"]) for c in rows.values()] == \
        ["Meta-learning (SAML's loss, no shape terms)", "Meta-learning + L_compact", "SAML"]
  prostate = runpy.run_path(str(CONFIG_DIR / "saml_prostate.py"))["get_config"]()
  assert get_config("prostate6,full").to_dict() == prostate.to_dict()
  with pytest.raises(ValueError, match="SIZE,ROW"):
    get_config("quick,smooth")
