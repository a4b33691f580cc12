"""3-D patch training end to end (issue 12 §3): `data.patch_size` + `model.name='unet3d'` train on
PatchSampler batches, resume bit-identically after a kill, and evaluate (and `predict`) every
volume by sliding-window inference; the scores are checked against a forward pass and Dice
written here from scratch, and the 3-D config errors are one line each."""

import json
import runpy
import shutil
from pathlib import Path

import jax
import nibabel as nib
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import make_sites_dataset, tiny_config
from medgen_jax import config as config_lib
from medgen_jax import predict, train_lib
from medgen_jax.data.patches import PatchSampler
from medgen_jax.models import UNet3D
from medgen_jax.writers import read_records

PATCH = (8, 16, 16)   # (D, H, W): D is the volumes' Z axis
NUM_CLASSES = 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """Sources A and B: volumes [X, Y, Z] = [20, 18, 14], i.e. [D, H, W] = [14, 20, 18], larger
  than a patch on every axis (3 x 2 x 2 sliding windows); held-out C: [16, 16, 8] = one patch."""
  root = tmp_path_factory.mktemp("data3d") / "toy"
  make_sites_dataset(root, sites=("A", "B"), cases=4, shape=(20, 18, 14), seed=0)
  make_sites_dataset(root, sites=("C",), cases=2, shape=(16, 16, 8), seed=1)
  return root


def config3d(root, **overrides):
  return tiny_config(root, **{"data.patch_size": PATCH, "data.in_plane_shape": (), "model.name": "unet3d",
                              "num_steps": 4, "log_every": 1, "eval_every": 4, "checkpoint.every": 2,
                              "eval.batch_size": 4, **overrides})


@pytest.fixture(scope="module")
def straight(dataset, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run3d")
  return workdir, train_lib.train_and_evaluate(config3d(dataset), workdir)


def saved_state(workdir, step):
  return ocp.StandardCheckpointer().restore(Path(workdir).absolute() / "deepall" / "checkpoints" / str(step) / "state")


def test_trains_on_patches_and_resumes_bit_identically_after_a_kill(dataset, straight, tmp_path, monkeypatch):
  workdir, result = straight
  assert "(8, 16, 16) patches (sliding-window inference, overlap 0.5)" in result["markdown"]
  assert [r["step"] for r in read_records(workdir / "metrics.jsonl") if r["kind"] == "eval"] == [4]
  original = PatchSampler.batch_at
  drawn = []

  def crash_at_step_3(self, step, **kw):   # step 2 was saved; steps 3 and 4 are redone after the restart
    if step == 3:
      raise KeyboardInterrupt("simulated kill")
    batch = original(self, step, **kw)
    drawn.append(batch["image"].shape)
    return batch

  monkeypatch.setattr(PatchSampler, "batch_at", crash_at_step_3)
  with pytest.raises(KeyboardInterrupt):
    train_lib.train_and_evaluate(config3d(dataset), tmp_path / "run")
  assert drawn[0] == (4, *PATCH, 1)   # 3-D patch batches, channels last
  assert sorted(int(p.name) for p in (tmp_path / "run" / "deepall" / "checkpoints").iterdir()
                if p.name.isdigit()) == [2]
  monkeypatch.setattr(PatchSampler, "batch_at", original)
  again = train_lib.train_and_evaluate(config3d(dataset), tmp_path / "run")
  a, b = saved_state(workdir, 4), saved_state(tmp_path / "run", 4)
  assert len(jax.tree.leaves(a)) == len(jax.tree.leaves(b)) > 0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert again["records"] == result["records"]


def gaussian(patch):
  """nnU-Net's importance map from its formula: exp(-d²/2σ²) per axis about the patch centre,
  σ = patch / 8, the product over axes."""
  axes = [np.exp(-0.5 * ((np.arange(p) - (p - 1) / 2) / (p / 8)) ** 2) for p in patch]
  return axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]


def dice(pred, ref, c):
  p, r = pred == c, ref == c
  return 1.0 if p.sum() + r.sum() == 0 else 2.0 * (p & r).sum() / (p.sum() + r.sum())


def test_evaluation_and_predict_equal_a_forward_pass_written_here(dataset, straight, tmp_path):
  """The run's last checkpoint (selected: the only evaluated one), read with orbax directly, in a
  UNet3D built here: each C volume is one patch (a plain forward pass), A's test volume
  [D, H, W] = [14, 20, 18] is blended by hand from its 12 windows (corners (0|4|6, 0|4, 0|2):
  stride round(patch / 2), the last one flush with the end). Dice by numpy equals results.json,
  and `python -m medgen_jax.predict` writes the same label maps for the A and a C volume."""
  workdir, result = straight
  state = saved_state(workdir, 4)
  model = UNet3D(NUM_CLASSES, base_features=4, depth=2)
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  splits = json.loads((workdir / "splits.json").read_text())

  def load(site, case):
    image = np.asarray(nib.load(str(dataset / site / f"{case}_image.nii.gz")).dataobj, np.float32)
    label = np.asarray(nib.load(str(dataset / site / f"{case}_label.nii.gz")).dataobj).astype(np.uint8)
    x = image.astype(np.float64)
    z = ((image - x.mean()) / x.std()).astype(np.float32)   # data.normalization 'whitening'
    return np.moveaxis(z, 2, 0)[..., None], label            # [D = Z, H = X, W = Y, 1]

  a_case = splits["sites"]["A"]["test"][0]
  a_image, a_label = load("A", a_case)
  corners = [(d, h, w) for d in (0, 4, 6) for h in (0, 4) for w in (0, 2)]
  c_cases = sorted(r["case"] for r in result["records"] if r["site"] == "C")
  c_volumes = [load("C", case) for case in c_cases]
  patches = [a_image[d:d + 8, h:h + 16, w:w + 16] for d, h, w in corners] + [v[0] for v in c_volumes]
  logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, np.stack(patches)))
  total, norm = np.zeros(a_image.shape[:3] + (NUM_CLASSES,)), np.zeros(a_image.shape[:3])
  weight = gaussian(PATCH)
  for (d, h, w), out in zip(corners, logits):
    total[d:d + 8, h:h + 16, w:w + 16] += out * weight[..., None]
    norm[d:d + 8, h:h + 16, w:w + 16] += weight
  predictions = {("A", a_case): (np.moveaxis(np.argmax(total / norm[..., None], -1), 0, 2), a_label)}
  for case, (_, label), out in zip(c_cases, c_volumes, logits[len(corners):]):
    predictions[("C", case)] = (np.moveaxis(np.argmax(out, -1), 0, 2), label)

  records = {(r["site"], r["case"]): r for r in json.loads((workdir / "results.json").read_text())["records"]}
  for key, (pred, label) in predictions.items():
    expected = [dice(pred, label, c) for c in range(1, NUM_CLASSES)]
    np.testing.assert_allclose(records[key]["dice"], expected, rtol=0, atol=1e-12, err_msg=str(key))
  assert any(d > 0 for p, label in predictions.values() for d in [dice(p, label, c) for c in (1, 2, 3)])

  inputs, out = tmp_path / "inputs", tmp_path / "pred"
  inputs.mkdir()
  for site, case in (("A", a_case), ("C", c_cases[0])):
    shutil.copy(dataset / site / f"{case}_image.nii.gz", inputs / f"{site}_{case}_image.nii.gz")
  assert predict.main(["--workdir", str(workdir), "--input", str(inputs), "--out", str(out)]) == 0
  for site, case in (("A", a_case), ("C", c_cases[0])):
    written = np.asarray(nib.load(str(out / f"{site}_{case}_image_seg.nii.gz")).dataobj)
    np.testing.assert_array_equal(written, predictions[(site, case)][0], err_msg=f"{site}/{case}")


@pytest.mark.parametrize("overrides,message", [
    ({"data.patch_size": PATCH}, r"config\.data\.patch_size: \(8, 16, 16\) asks for 3-D patches.*model\.name='unet3d'"),
    ({"model.name": "unet3d"}, r"config\.model\.name: 'unet3d' trains on 3-D patches: set data\.patch_size"),
    ({"model.name": "unet3d", "data.patch_size": (16, 16)}, r"config\.data\.patch_size: \(16, 16\): needs 3"),
    ({"model.name": "unet3d", "data.patch_size": PATCH, "method": "mldg"}, r"config\.method: 'mldg' .* deepall"),
    ({"model.name": "unet3d", "data.patch_size": PATCH, "method": "ummkd", "ummkd.shared": "decoder"},
     r"config\.ummkd\.shared: 'decoder'.*shared='all'"),
    ({"model.name": "unet3d", "data.patch_size": PATCH, "data.context_slices": 3}, r"config\.data\.context_slices: 3"),
    ({"model.name": "unet3d", "data.patch_size": PATCH, "model.se": "shared"}, r"config\.model\.se: the 3-D U-Net"),
    ({"model.name": "unet3d", "data.patch_size": (8, 16, 18)}, r"config\.data\.patch_size: patch \(8, 16, 18\) must "
     r"be divisible by \(4, 4, 4\)"),
    ({"model.name": "unet3d", "data.patch_size": PATCH, "model.pool_sizes": ((1, 2, 2),)},
     r"config\.model\.pool_sizes=\(\(1, 2, 2\),\): needs 2 entries"),
    ({"model.name": "unet3d", "data.patch_size": PATCH, "data.oversample_foreground": 1.5},
     r"config\.data\.oversample_foreground: 1\.5 is not a fraction"),
    ({"model.name": "unet3d", "data.patch_size": PATCH, "eval.overlap": 1.0}, r"config\.eval\.overlap: 1\.0"),
])
def test_3d_config_errors_are_one_line(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message) as error:
    config_lib.validate(tiny_config(tmp_path, **overrides))
  assert "\n" not in str(error.value)


def test_anisotropic_pooling_passes_validation(tmp_path):
  config_lib.validate(tiny_config(tmp_path, **{"model.name": "unet3d", "data.patch_size": (2, 16, 16),
                                               "model.pool_sizes": ((1, 2, 2), (2, 2, 2))}))


@pytest.mark.parametrize("name", ["deepall3d_brain", "ummkd3d_abdomen"])
def test_shipped_3d_configs_validate_at_both_sizes(name):
  path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.py"
  for arg in (None, "quick"):
    config = runpy.run_path(str(path))["get_config"](arg)
    config_lib.validate(config)
    assert config.model.name == "unet3d" and len(config.data.patch_size) == 3


def test_ummkd_takes_the_3d_unet_and_its_loss_reduces_over_every_spatial_axis():
  """UMMKD 3-D (configs/ummkd3d_abdomen.py): its Chilopod network is the UNet3D with one BN row
  per modality (shapes by eval_shape, nothing compiled), and its loss (per-modality CE + Dice,
  class-wise KD on) on [B, D, H, W, K] logits equals the 2-D loss (tests/test_ummkd.py checks
  that one against numpy) on the same voxels laid out as [B, D·H, W, K] slices."""
  from medgen_jax.evaluation import run_info
  from medgen_jax.methods.multisite import ummkd
  config = runpy.run_path(str(Path(__file__).resolve().parents[1] / "configs" / "ummkd3d_abdomen.py"))["get_config"]("quick")
  info = run_info(config, NUM_CLASSES, ("MR", "CT"))
  model = ummkd.segmenter(config, info, train=False)
  assert isinstance(model, UNet3D) and info.input_shape == (16, 32, 32, 1)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, *info.input_shape), np.float32)))
  assert shapes["params"]["down0"]["norm0"]["dsbn"]["scale"].shape == (2, config.model.base_features)
  assert shapes["batch_stats"]["down0"]["norm0"]["dsbn"]["mean"].shape == (2, config.model.base_features)
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 2, 3, 5, NUM_CLASSES)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, size=(4, 2, 3, 5)).astype(np.int32)
  labels[:2][labels[:2] == 3] = 0   # a class absent from one modality's patches
  domain, params = np.array([0, 1, 0, 1], np.int32), {"k": {"kernel": np.ones((2, 2), np.float32)}}
  run = jax.jit(lambda z, y: ummkd.objective(z, y, domain, params, config, num_classes=NUM_CLASSES, num_modalities=2))
  loss3d, metrics3d = run(logits, labels)
  loss2d, metrics2d = run(logits.reshape(4, 6, 5, NUM_CLASSES), labels.reshape(4, 6, 5))
  assert float(metrics3d["loss_kd"]) > 0 and config.ummkd.kd_weight == 0.5
  np.testing.assert_allclose(loss3d, loss2d, rtol=1e-6)
  for key in ("loss_kd", "loss_seg", "loss_seg_m0", "loss_seg_m1"):
    np.testing.assert_allclose(metrics3d[key], metrics2d[key], rtol=1e-6, err_msg=key)
