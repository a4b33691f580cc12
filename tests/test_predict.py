"""`python -m medgen_jax.predict`: a tiny trained run segments a file, a folder and a site folder;
outputs lie on each input's stored grid (RAS, LPS, permuted axes, 4-D + channel) and equal the
run's own evaluation; nothing is overwritten; bad inputs are one line."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from helpers import AFFINE, make_sites_dataset, tiny_config, write_nii
from medgen_jax import evaluation, metrics, predict, train_lib
from medgen_jax.data.normalize import make_normalizer
from medgen_jax.inference import make_predict_fn, predict_volume

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A finished tiny DeepAll run on sites A, B; C held out (all its cases are test cases)."""
  base = tmp_path_factory.mktemp("predict")
  root = make_sites_dataset(base / "toy", sites=("A", "B", "C"), cases=3)
  workdir = base / "run"
  train_lib.train_and_evaluate(tiny_config(root), workdir)
  return root, workdir


@pytest.fixture(scope="module")
def loaded(run):
  """evaluation.load_trained_models(run): (config, normalizer, [model]), loaded once."""
  return evaluation.load_trained_models(run[1])


@pytest.fixture
def cached_loader(monkeypatch, loaded):
  """predict.main without reloading the run each time (restoring compiles a train state, tens of
  seconds on a busy CPU); the real loading path is tested by the file test."""
  monkeypatch.setattr(evaluation, "load_trained_models", lambda workdir, **kw: loaded)


@pytest.fixture(scope="module")
def file_prediction(run, tmp_path_factory):
  root, workdir = run
  out = tmp_path_factory.mktemp("file_prediction") / "out"
  argv = ["--workdir", str(workdir), "--input", str(root / "C" / "case0_image.nii.gz"), "--out", str(out)]
  assert predict.main(argv) == 0
  return argv, out


def seg_of(out_dir, image_path):
  return Path(out_dir) / (Path(image_path).name.split(".nii")[0] + "_seg.nii.gz")


def record_of(workdir, site, case):
  results = json.loads((workdir / "results.json").read_text())
  [record] = [r for r in results["records"] if r["site"] == site and r["case"] == case]
  return record


def assert_same_grid(out_path, in_path):
  out, ref = nib.load(str(out_path)), nib.load(str(in_path))
  assert out.shape == ref.shape[:3]
  np.testing.assert_array_equal(out.affine, ref.affine)
  assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(ref.affine)
  for key in ("sform_code", "qform_code"):
    assert out.header[key] == ref.header[key]
  np.testing.assert_array_equal(out.header.get_qform(), ref.header.get_qform())
  np.testing.assert_array_equal(out.header.get_zooms()[:3], ref.header.get_zooms()[:3])
  assert out.get_data_dtype() == np.uint8
  return np.asarray(out.dataobj)


def ras_prediction(loaded, data):
  """Independent path: the evaluation's predict_volume on the RAS+ array, same variables."""
  config, normalizer, [model] = loaded
  return predict_volume(make_predict_fn(model.model), model.variables, data, (1.5, 1.5, 3.0),
                        normalizer=normalizer, data_config=config.data, batch_size=config.eval.batch_size)


def test_file_prediction_is_the_runs_evaluation_on_the_inputs_grid(run, file_prediction, loaded):
  root, workdir = run
  _, out = file_prediction
  image = root / "C" / "case0_image.nii.gz"
  assert sorted(p.name for p in out.iterdir()) == ["case0_image_seg.nii.gz"]
  labels = assert_same_grid(seg_of(out, image), image)
  # The run's evaluation scored this held-out case with its selected checkpoint: same Dice.
  reference = np.asarray(nib.load(str(root / "C" / "case0_label.nii.gz")).dataobj)
  scores = metrics.score_volume(labels, reference, num_classes=4, spacing=(1.5, 1.5, 3.0))
  record = record_of(workdir, "C", "case0")
  assert scores["dice"] == record["dice"] and scores["flag"] == record["flag"]
  assert labels.max() > 0  # not trivially empty: the Dice comparison means something
  np.testing.assert_array_equal(labels, ras_prediction(loaded, np.asarray(nib.load(str(image)).dataobj)))
  steps = json.loads((workdir / "results.json").read_text())["steps"]
  assert loaded[2][0].step == steps["deepall"]


def test_folder_lps_permuted_and_4d_map_back_to_their_stored_grid(run, loaded, cached_loader, tmp_path, capsys):
  root, workdir = run
  ras = np.asarray(nib.load(str(root / "C" / "case1_image.nii.gz")).dataobj)
  x, y, _ = ras.shape
  folder = tmp_path / "in"
  # LPS: array axes 0 and 1 reversed, affine changed so every voxel keeps its world position.
  flip = np.array([[-1, 0, 0, x - 1], [0, -1, 0, y - 1], [0, 0, 1, 0], [0, 0, 0, 1]], float)
  lps = write_nii(folder / "lps.nii.gz", ras[::-1, ::-1, :], AFFINE @ flip)
  # A/R/S: array axes 0 and 1 swapped.
  swap = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
  ars = write_nii(folder / "ars.nii", ras.transpose(1, 0, 2), AFFINE @ swap)
  assert nib.aff2axcodes(nib.load(str(lps)).affine) == ("L", "P", "S")
  assert nib.aff2axcodes(nib.load(str(ars)).affine) == ("A", "R", "S")
  # 4-D: --channel 1 selects case2's image; channel 0 is a constant.
  other = np.asarray(nib.load(str(root / "C" / "case2_image.nii.gz")).dataobj)
  multi = write_nii(folder / "multi.nii.gz", np.stack([other * 0 + 7, other], axis=-1))
  (folder / "notes.txt").write_text("not an image")
  inputs = {p.name: p.read_bytes() for p in folder.iterdir()}
  # Written into the input folder itself: the inputs stay as they are.
  assert predict.main(["--workdir", str(workdir), "--input", str(folder), "--out", str(folder),
                       "--channel", "1"]) == 0
  assert sorted(p.name for p in folder.iterdir()) == sorted(
      list(inputs) + ["lps_seg.nii.gz", "ars_seg.nii.gz", "multi_seg.nii.gz"])
  assert {name: (folder / name).read_bytes() for name in inputs} == inputs
  expected = ras_prediction(loaded, ras)
  np.testing.assert_array_equal(assert_same_grid(seg_of(folder, lps), lps), expected[::-1, ::-1, :])
  np.testing.assert_array_equal(assert_same_grid(seg_of(folder, ars), ars), expected.transpose(1, 0, 2))
  np.testing.assert_array_equal(assert_same_grid(seg_of(folder, multi), multi), ras_prediction(loaded, other))
  assert "(step " in capsys.readouterr().out


def test_site_folder_predicts_only_images_and_matches_evaluation(run, cached_loader, tmp_path):
  root, workdir = run
  site = tmp_path / "C"
  shutil.copytree(root / "C", site)
  out = tmp_path / "out"
  assert predict.main(["--workdir", str(workdir), "--input", str(site), "--out", str(out),
                       "--model", "deepall"]) == 0
  assert sorted(p.name for p in out.iterdir()) == [f"case{j}_image_seg.nii.gz" for j in range(3)]
  for j in range(3):
    labels = assert_same_grid(out / f"case{j}_image_seg.nii.gz", site / f"case{j}_image.nii.gz")
    reference = np.asarray(nib.load(str(site / f"case{j}_label.nii.gz")).dataobj)
    dice = metrics.score_volume(labels, reference, num_classes=4, distances=False)["dice"]
    assert dice == record_of(workdir, "C", f"case{j}")["dice"]


def test_unreadable_volume_is_reported_and_the_others_predicted(run, cached_loader, tmp_path, capsys):
  root, workdir = run
  folder = tmp_path / "in"
  folder.mkdir()
  shutil.copy(root / "A" / "case1_image.nii.gz", folder / "good.nii.gz")
  noise = np.random.default_rng(0).normal(size=(12, 10, 6)).astype(np.float32)
  raw = write_nii(folder / "cut.nii.gz", noise).read_bytes()
  (folder / "cut.nii.gz").write_bytes(raw[: len(raw) * 2 // 3])  # header intact, data truncated
  out = tmp_path / "out"
  assert predict.main(["--workdir", str(workdir), "--input", str(folder), "--out", str(out)]) == 1
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 2 and err[0].startswith(f"error: {folder / 'cut.nii.gz'}: ") and "Fix:" in err[0]
  assert err[1] == "error: 1 of 2 volume(s) could not be predicted (listed above)"
  assert sorted(p.name for p in out.iterdir()) == ["good_seg.nii.gz"]


def test_never_overwrites(file_prediction, capsys):
  argv, out = file_prediction
  [seg] = list(out.iterdir())
  before = seg.read_bytes(), seg.stat().st_mtime_ns
  assert predict.main(argv) == 2
  assert capsys.readouterr().err == (f"error: {seg}: already exists; predict never overwrites. Fix: use "
                                     "another --out, or move the old outputs away\n")
  assert (seg.read_bytes(), seg.stat().st_mtime_ns) == before


def bad_inputs(base: Path, root: Path, workdir: Path):
  """(name, argv, expected start of the single error line) for each wrong input."""
  (base / "notes.txt").write_text("hello")
  (base / "fake.nii.gz").write_bytes(b"not a nifti at all")
  write_nii(base / "four_d.nii.gz", np.zeros((4, 4, 4, 2), np.float32))
  write_nii(base / "dup" / "x.nii", np.zeros((4, 4, 4), np.float32))
  write_nii(base / "dup" / "x.nii.gz", np.zeros((4, 4, 4), np.float32))
  (base / "empty").mkdir()
  (base / "no_run").mkdir()
  (base / "unfinished").mkdir()
  shutil.copy(workdir / "config.json", base / "unfinished" / "config.json")
  (base / "a_file").write_text("")
  image = str(root / "A" / "case0_image.nii.gz")
  out = str(base / "out")
  run_args = ["--workdir", str(workdir), "--out", out]
  return [
      ("missing path", run_args + ["--input", str(base / "nope.nii.gz")],
       f"error: --input {base / 'nope.nii.gz'}: does not exist. Fix: "),
      ("not nifti name", run_args + ["--input", str(base / "notes.txt")],
       f"error: --input {base / 'notes.txt'}: not a NIfTI file name (.nii or .nii.gz). Fix: "),
      ("not nifti content", run_args + ["--input", str(base / "fake.nii.gz")],
       f"error: {base / 'fake.nii.gz'}: not a readable NIfTI file ("),
      ("4-D", run_args + ["--input", str(base / "four_d.nii.gz")],
       f"error: {base / 'four_d.nii.gz'}: is 4-D with shape (4, 4, 4, 2) and no channel was chosen. "
       "Fix: pass --channel <index in [0, 1]>"),
      ("channel out of range", run_args + ["--input", str(base / "four_d.nii.gz"), "--channel", "2"],
       f"error: {base / 'four_d.nii.gz'}: --channel 2 does not exist in shape (4, 4, 4, 2)."),
      ("two inputs one output", run_args + ["--input", str(base / "dup")],
       f"error: --input {base / 'dup'}: several inputs would be written to {base / 'out' / 'x_seg.nii.gz'}"),
      ("empty folder", run_args + ["--input", str(base / "empty")],
       f"error: --input {base / 'empty'}: holds no .nii/.nii.gz file."),
      ("dataset root", run_args + ["--input", str(root)],
       f"error: --input {root}: holds no .nii/.nii.gz file. Fix: give one of its site folders (A, B, C)"),
      ("no run", ["--workdir", str(base / "no_run"), "--input", image, "--out", out],
       f"error: {base / 'no_run' / 'config.json'}: no saved run here. Fix: "),
      ("missing run", ["--workdir", str(base / "nowhere"), "--input", image, "--out", out],
       f"error: --workdir {base / 'nowhere'}: does not exist. Fix: "),
      ("unfinished run", ["--workdir", str(base / "unfinished"), "--input", image, "--out", out],
       f"error: --workdir {base / 'unfinished'}: the run has not finished (no results.json)"),
      ("out is a file", ["--workdir", str(workdir), "--input", image, "--out", str(base / "a_file")],
       f"error: --out {base / 'a_file'}: is a file, not a folder."),
      ("out under a file", ["--workdir", str(workdir), "--input", image, "--out", str(base / "a_file" / "o")],
       f"error: --out {base / 'a_file' / 'o'}: cannot be created ("),
  ]


def test_bad_inputs_are_one_line_and_exit_2(run, tmp_path, capsys):
  root, workdir = run
  for name, argv, message in bad_inputs(tmp_path, root, workdir):
    assert predict.main(argv) == 2, name
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1 and "Fix:" in err, (name, err)
    assert not (tmp_path / "out").exists(), name


def test_cli_error_has_no_traceback(tmp_path):
  done = subprocess.run([sys.executable, "-m", "medgen_jax.predict", "--workdir", str(tmp_path),
                         "--input", str(tmp_path / "missing.nii"), "--out", str(tmp_path / "o")],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert done.returncode == 2
  assert done.stderr == (f"error: {tmp_path / 'config.json'}: no saved run here. Fix: give the --workdir "
                         "of a run made by python -m medgen_jax.train\n")


def test_nnunet_channel_files_are_one_input_per_case(tmp_path):
  for case in ("a", "b"):
    for channel in range(2):
      write_nii(tmp_path / f"{case}_{channel:04d}.nii.gz", np.zeros((4, 4, 4), np.float32))
  assert [p.name for p in predict.find_inputs(tmp_path)] == ["a_0000.nii.gz", "b_0000.nii.gz"]
  assert [p.name for p in predict.find_inputs(tmp_path, 1)] == ["a_0001.nii.gz", "b_0001.nii.gz"]


def test_choose_model_by_name():
  class M:
    def __init__(self, name):
      self.name = name

  models = [M("separate_A"), M("separate_B")]
  assert predict.choose_model(models, "separate_B") is models[1]
  assert predict.choose_model(models[:1], None) is models[0]
  with pytest.raises(predict.UsageError, match=r"--model: the run has 2 models \['separate_A', 'separate_B'\]. "
                                               r"Fix: pass --model with one of them"):
    predict.choose_model(models, None)
  with pytest.raises(predict.UsageError, match=r"--model deepall: the run has no such model. "
                                               r"Fix: use one of \['separate_A', 'separate_B'\]"):
    predict.choose_model(models, "deepall")


@pytest.fixture(scope="module")
def site_run(tmp_path_factory):
  """A finished tiny DeepAll run normalized with `site_range` (per-site min/max -> [-1, 1]):
  sources A, B; target C adapted to (its train+val images fit C's range), its test case scored."""
  base = tmp_path_factory.mktemp("predict_site")
  root = make_sites_dataset(base / "toy", sites=("A", "B", "C"), cases=3, seed=1)
  workdir = base / "run"
  train_lib.train_and_evaluate(tiny_config(root, **{"data.normalization.name": "site_range",
                                                    "data.target_adaptation": True}), workdir)
  return root, workdir


def test_site_range_run_needs_site_and_predicts_as_its_evaluation(site_run, tmp_path, capsys, monkeypatch):
  root, workdir = site_run
  stored = json.loads((workdir / "normalizer.json").read_text())
  assert stored["name"] == "site_range" and sorted(stored["site_ranges"]) == ["A", "B", "C"]
  [case] = json.loads((workdir / "splits.json").read_text())["sites"]["C"]["test"]
  image = root / "C" / f"{case}_image.nii.gz"
  out = tmp_path / "out"
  argv = ["--workdir", str(workdir), "--input", str(image), "--out", str(out)]
  # Missing or unknown --site: one line naming the fitted sites, before anything is loaded or written.
  for extra, start in (([], "error: --site: the run's 'site_range' normalization maps each site with its "
                            "own intensity range (fitted sites: ['A', 'B', 'C']) and no site was given. "
                            "Fix: pass --site with the site the input volumes come from, one of A, B, C\n"),
                       (["--site", "Z"], "error: --site Z: the run's 'site_range' normalization has no "
                                         "intensity range for this site (fitted sites: ['A', 'B', 'C']). "
                                         "Fix: use one of A, B, C; ")):
    assert predict.main(argv + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith(start) and err.count("\n") == 1, err
    assert not out.exists()
  loaded = []
  real = evaluation.load_trained_models
  monkeypatch.setattr(evaluation, "load_trained_models", lambda w, **kw: loaded.append(real(w, **kw)) or loaded[-1])
  assert predict.main(argv + ["--site", "C"]) == 0
  labels = assert_same_grid(seg_of(out, image), image)
  # The run's own evaluation of this target test case (normalized with C's range): same Dice.
  reference = np.asarray(nib.load(str(root / "C" / f"{case}_label.nii.gz")).dataobj)
  scores = metrics.score_volume(labels, reference, num_classes=4, spacing=(1.5, 1.5, 3.0))
  assert scores["dice"] == record_of(workdir, "C", case)["dice"]
  # Independent path: C's stored range applied by hand, then the identity normalizer.
  config, _, [model] = loaded[0]
  lo, hi = stored["site_ranges"]["C"]
  x = np.asarray(nib.load(str(image)).dataobj).astype(np.float64)
  mapped = (-1.0 + (np.clip(x, lo, hi) - lo) / (hi - lo) * 2.0).astype(np.float32)
  expected = predict_volume(make_predict_fn(model.model), model.variables, mapped, (1.5, 1.5, 3.0),
                            normalizer=make_normalizer("none"), data_config=config.data,
                            batch_size=config.eval.batch_size)
  np.testing.assert_array_equal(labels, expected)
