"""The cross-modality benchmarks brain-modalities and cardiac-phantom: bytes, labels, contrasts."""

import hashlib
import json

import numpy as np
import pytest

from medgen_jax.data import anatomy as anatomy_lib
from medgen_jax.data import brain_modalities as bm
from medgen_jax.data import cardiac_phantom as cp
from medgen_jax.data import synthesize as synth
from medgen_jax.data.errors import DataError
from medgen_jax.data.loading import inspect_dataset

BRAIN_MM = 4      # tiny grids: 50x59x48 brains, 48x48x40 hearts
HEART_MM = 4.0


def _digest(folder):
  h = hashlib.sha256()
  for f in sorted(p for p in folder.rglob("*") if p.is_file()):
    h.update(str(f.relative_to(folder)).encode())
    h.update(f.read_bytes())
  return h.hexdigest()


@pytest.fixture(scope="module")
def brain_dir(tmp_path_factory):
  return synth.synthesize(tmp_path_factory.mktemp("b") / "brain-modalities", benchmark="brain-modalities",
                          cases_per_site=1, seed=3, resolution_mm=BRAIN_MM, progress=None)


@pytest.fixture(scope="module")
def heart_dir(tmp_path_factory):
  return synth.synthesize(tmp_path_factory.mktemp("h") / "cardiac-phantom", benchmark="cardiac-phantom",
                          cases_per_site=2, seed=3, resolution_mm=int(HEART_MM), progress=None)


@pytest.mark.parametrize("benchmark, fixture", [("brain-modalities", "brain_dir"),
                                                ("cardiac-phantom", "heart_dir")])
def test_same_arguments_same_bytes(benchmark, fixture, tmp_path, request):
  first = request.getfixturevalue(fixture)
  meta = json.loads((first / "dataset.json").read_text())
  resolution = int(HEART_MM) if benchmark == "cardiac-phantom" else BRAIN_MM
  again = synth.synthesize(tmp_path / "again", benchmark=benchmark, seed=3, resolution_mm=resolution,
                           cases_per_site=meta["generator"]["cases_per_site"], progress=None)
  assert _digest(first) == _digest(again)
  assert not list(tmp_path.glob(".*partial"))


def test_brain_modalities_loads_with_all_labels_and_unpaired_subjects(brain_dir):
  info, cases, problems = inspect_dataset(brain_dir)  # what `python -m medgen_jax.data.check` runs
  assert problems == []
  assert sorted(cases) == ["CT", "T1", "T2"] and info.labels == anatomy_lib.LABEL_NAMES
  meta = json.loads((brain_dir / "dataset.json").read_text())
  assert {s: v["modality"] for s, v in meta["sites"].items()} == {"T1": "T1", "T2": "T2", "CT": "CT"}
  labels = {site: c[0].label for site, c in cases.items()}
  for site, label in labels.items():
    assert set(np.unique(label)) == {0, 1, 2, 3}, site
  # Different random subjects per modality: no two label maps agree.
  assert not np.array_equal(labels["T1"], labels["T2"]) and not np.array_equal(labels["T1"], labels["CT"])
  assert np.mean(labels["T1"] != labels["CT"]) > 0.02
  ct = cases["CT"][0].image
  assert ct.min() >= bm.CT_WINDOW_HU[0] and ct.max() <= bm.CT_WINDOW_HU[1]


@pytest.fixture(scope="module")
def brain_subject():
  return anatomy_lib.random_subject(anatomy_lib.mni152(BRAIN_MM), np.random.default_rng(0))


def _pure_means(image, subject, threshold=0.9):
  return {k: float(image[getattr(subject, k) > threshold].mean()) for k in ("csf", "gm", "wm")}


def test_brain_contrast_order_per_modality(brain_subject):
  rng = np.random.default_rng(1)
  t1 = _pure_means(bm.render(brain_subject, bm.scan_parameters("T1", rng), rng, noise=False), brain_subject)
  t2 = _pure_means(bm.render(brain_subject, bm.scan_parameters("T2", rng), rng, noise=False), brain_subject)
  assert t1["wm"] > t1["gm"] > t1["csf"]
  assert t2["csf"] > t2["gm"] > t2["wm"]
  ct_params = bm.scan_parameters("CT", rng)
  hu = _pure_means(bm.ct_hu(brain_subject, ct_params), brain_subject, threshold=0.99)  # before PSF/window
  assert 0 <= hu["csf"] <= 15 and 20 <= hu["wm"] <= 30 and 35 <= hu["gm"] <= 45
  # The full CT scan (blur, noise, window) keeps GM > WM > CSF inside the labels.
  scan = bm.render(brain_subject, ct_params, rng)
  interior = brain_subject.mask > 0.99
  means = [float(scan[(brain_subject.label == k) & interior].mean()) for k in (1, 2, 3)]
  assert means[1] > means[2] > means[0]
  # Outside the brain: skull saturates the window, air sits at its bottom.
  hu_full = bm.ct_hu(brain_subject, ct_params)
  assert hu_full.max() == pytest.approx(bm.CT_OUTSIDE_HU["bone"], rel=1e-3)
  assert np.mean(scan[hu_full < -999]) == pytest.approx(bm.CT_WINDOW_HU[0], abs=0.5)


def test_cardiac_phantom_loads_with_every_structure_and_unpaired_subjects(heart_dir):
  info, cases, problems = inspect_dataset(heart_dir)
  assert problems == []
  assert info.labels == {0: "background", 1: "MYO", 2: "LAC", 3: "LVC", 4: "AA"}
  assert sorted(cases) == ["CT", "MR"]
  for site, site_cases in cases.items():
    for case in site_cases:
      assert case.image.shape == cp.grid_shape(HEART_MM)
      np.testing.assert_allclose(case.spacing, (HEART_MM,) * 3)
      counts = np.bincount(case.label.ravel(), minlength=5)
      assert (counts[1:] > 50).all(), (site, case.case_id, counts)
  mr, ct = cases["MR"][0].label, cases["CT"][0].label
  assert np.mean((mr > 0) != (ct > 0)) > 0.005  # different hearts
  assert not np.array_equal(cases["MR"][0].label, cases["MR"][1].label)


@pytest.fixture(scope="module")
def heart():
  rng = np.random.default_rng(5)
  anatomy = cp.sample_anatomy(rng)
  fractions, label = cp.build_phantom(anatomy, cp.grid_shape(HEART_MM), HEART_MM)
  return fractions, label


def test_cardiac_contrast_order_mr_and_ct(heart):
  fractions, label = heart
  rng = np.random.default_rng(6)
  pure = {t: fractions[cp.TISSUES.index(t)] > 0.95 for t in cp.TISSUES}
  counts = {t: int(m.sum()) for t, m in pure.items()}
  assert all(counts[t] > 20 for t in ("blood", "myocardium", "fat", "lung")), counts
  mr_params, ct_params = cp.scan_parameters("MR", rng), cp.scan_parameters("CT", rng)
  mr = cp.render(fractions, mr_params, rng, HEART_MM, noise=False, psf=False)
  ct = cp.render(fractions, ct_params, rng, HEART_MM, noise=False, psf=False, window=False)

  def mean(image, tissue):
    return float(image[pure[tissue]].mean())

  # MR (bSSFP): blood > fat > myocardium > lung; bias field varies by < 1.8x, so compare ratios loosely.
  assert mean(mr, "blood") > 1.5 * mean(mr, "myocardium")
  assert mean(mr, "fat") > 1.3 * mean(mr, "myocardium") and mean(mr, "lung") < 0.2 * mean(mr, "myocardium")
  # CT HU before windowing, against the stated constants.
  assert 300 <= mean(ct, "blood") <= 400 and 100 <= mean(ct, "myocardium") <= 150
  assert mean(ct, "fat") == pytest.approx(-100, abs=1) and mean(ct, "lung") == pytest.approx(-800, abs=1)
  # Fat is bright in MR and dark in CT: the contrast orders differ.
  assert mean(ct, "fat") < mean(ct, "myocardium") < mean(ct, "blood")
  # Through the labels, with noise, PSF and window: blood pools brighter than myocardium in both.
  mr_scan = cp.render(fractions, mr_params, rng, HEART_MM)
  ct_scan = cp.render(fractions, ct_params, rng, HEART_MM)
  for scan in (mr_scan, ct_scan):
    myo = scan[label == cp.MYO].mean()
    assert all(scan[label == k].mean() > myo for k in (cp.LAC, cp.LVC, cp.AA))
  assert ct_scan.min() >= cp.CT_WINDOW_HU[0] and ct_scan.max() <= cp.CT_WINDOW_HU[1]


def test_cli_bad_benchmark_is_one_line_and_writes_nothing(tmp_path, capsys):
  assert synth.main(["--benchmark", "mmwhs", "--out", str(tmp_path / "x")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "--benchmark=mmwhs" in err and "cardiac-phantom" in err
  assert synth.main(["--benchmark", "cardiac-phantom", "--sites", "2", "--out", str(tmp_path / "x")]) == 2
  assert "brain-sites only" in capsys.readouterr().err
  assert not (tmp_path / "x").exists() and not list(tmp_path.iterdir())


def test_never_overwrites(tmp_path):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "mine.txt").write_text("precious")
  with pytest.raises(DataError, match="already exists"):
    synth.synthesize(tmp_path / "out", benchmark="cardiac-phantom", cases_per_site=1, progress=None)
  assert (tmp_path / "out" / "mine.txt").read_text() == "precious"


def test_data_config_generates_the_named_benchmark_when_missing(tmp_path, monkeypatch, heart_dir):
  from medgen_jax.data import pipeline
  calls = []
  monkeypatch.setattr(pipeline, "ensure_benchmark", lambda root, **kw: calls.append((root, kw)))
  config = pipeline.default_data_config()
  assert config.synthesize.benchmark == "brain-sites"
  config.root = str(tmp_path / "cardiac-phantom")
  config.synthesize.benchmark = "cardiac-phantom"
  pipeline.ensure_dataset(config, progress=None)
  assert calls and calls[0][1]["benchmark"] == "cardiac-phantom"
  # An existing folder is used as it is.
  before = _digest(heart_dir)
  assert synth.ensure_benchmark(heart_dir, benchmark="cardiac-phantom", progress=None) == heart_dir
  assert _digest(heart_dir) == before
