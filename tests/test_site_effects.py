"""The scanner-effect study (medgen_jax.analysis.site_effects): features, scores, classifier, CLI."""

import csv
import importlib.util
import sys

import numpy as np
import pytest

from medgen_jax.analysis import site_effects
from medgen_jax.data.loading import Case, load_dataset
from medgen_jax.data.synthesize import synthesize

HAVE_SIMPLEITK = importlib.util.find_spec("SimpleITK") is not None


def test_features_of_a_volume_with_known_values():
  # Ten brain voxels holding 1..10 (labels 1 for 1..5, 2 for 6..10); the background (label 0)
  # holds 1000 and must not count.
  image = np.full((4, 4, 4), 1000.0, np.float32)
  label = np.zeros((4, 4, 4), np.uint8)
  flat_image, flat_label = image.reshape(-1), label.reshape(-1)
  flat_image[5:15] = np.arange(1, 11)
  flat_label[5:10], flat_label[10:15] = 1, 2
  values, tissue = site_effects.brain_values(image, label)
  np.testing.assert_array_equal(np.sort(values), np.arange(1, 11))

  # Histogram: bins [0, 5) and [5, 10] hold 1..4 and 5..10.
  np.testing.assert_allclose(site_effects.intensity_features(values, edges=np.array([0.0, 5.0, 10.0])),
                             [0.4, 0.6])
  # Values beyond the edges fall in the end bins: edges [2, 4, 6] -> {1,2,3} and {4,...,10}.
  np.testing.assert_allclose(site_effects.intensity_features(values, edges=np.array([2.0, 4.0, 6.0])),
                             [0.3, 0.7])
  # Percentiles of 1..10 with linear interpolation: 1 + 9 p / 100.
  expected = [1.09, 1.45, 1.9, 2.8, 3.7, 4.6, 5.5, 6.4, 7.3, 8.2, 9.1, 9.55, 9.91]
  np.testing.assert_allclose(site_effects.intensity_features(values, kind="percentiles"), expected)
  # rich: + mean 5.5, std sqrt(8.25), skewness 0, excess kurtosis -6(n^2+1)/(5(n^2-1)) = -1.2242
  # for n = 10 equally spaced values, label means 3 and 8, and the mean 5.5 for absent label 3.
  rich = site_effects.intensity_features(values, kind="rich", tissue=tissue, tissue_labels=(1, 2, 3))
  np.testing.assert_allclose(rich, expected + [5.5, np.sqrt(8.25), 0.0, -606 / 495, 3.0, 8.0, 5.5], atol=1e-12)

  # Bins fitted on training volumes: [min of their 0.5th percentiles, max of their 99.5th].
  edges = site_effects.histogram_edges([np.arange(1.0, 11.0), np.arange(101.0, 201.0)], bins=4)
  np.testing.assert_allclose(edges, np.linspace(1.045, 199.505, 5))


def test_scores_match_a_hand_computation():
  proba = np.array([[0.6, 0.4, 0.0], [1.0, 0.0, 0.0], [0.3, 0.7, 0.0], [0.1, 0.1, 0.8]])
  truth = np.array([0, 0, 1, 1])
  scores = site_effects.probability_scores(proba, truth)
  # Right: rows 0, 1, 2; row 3 predicts class 2.
  assert scores["Accuracy"] == pytest.approx(0.75)
  # Entropies in nats: 0.673012, 0, 0.610864, 0.639032 (0.8 ln 0.8 + 2 * 0.1 ln 0.1).
  assert scores["Avg. Entropy"] == pytest.approx((0.6730117 + 0.0 + 0.6108643 + 0.6390319) / 4, abs=1e-6)
  assert scores["Avg. Prob."] == pytest.approx((0.6 + 1.0 + 0.7 + 0.1) / 4)
  summary = site_effects.summarize([{"Accuracy": 1.0, "Avg. Entropy": 0.2, "Avg. Prob.": 0.9},
                                    {"Accuracy": 0.5, "Avg. Entropy": 0.4, "Avg. Prob.": 0.7}])
  assert summary["Accuracy"] == pytest.approx((0.75, 0.25))
  assert summary["Avg. Prob."] == pytest.approx((0.8, 0.1))


def test_nyul_landmarks_come_from_the_training_fold_only():
  rng = np.random.default_rng(0)
  label = np.ones((6, 6, 6), np.uint8)
  images = [rng.gamma(2.0 + k, 10.0, size=(6, 6, 6)) for k in range(4)]
  cases = [Case("A", f"c{k}", image, label, np.eye(4), "img", "lbl") for k, image in enumerate(images)]
  train = np.array([0, 1])
  before = site_effects._pipeline_values(images, cases, "histogram", "none")(train)
  changed = images[:3] + [images[3] ** 2]  # a held-out volume changes
  after = site_effects._pipeline_values(changed, cases, "histogram", "none")(train)
  for k in (0, 1, 2):  # the training volumes, and the other held-out one, map exactly as before
    np.testing.assert_array_equal(after[k], before[k])


def _classify(x, classes, seed=0):
  folds = site_effects.cv_folds(classes, folds=3, seed=seed)
  return site_effects.summarize(site_effects.classify_sites(x, classes, fold_indices=folds, seed=seed,
                                                            trees=50))


def test_classifier_separates_separable_sites_and_not_identical_ones():
  rng = np.random.default_rng(0)
  classes = np.repeat([0, 1, 2], 12)
  separable = rng.normal(size=(36, 5)) + 10.0 * classes[:, None]
  scores = _classify(separable, classes)
  assert scores["Accuracy"] == (1.0, 0.0)
  assert scores["Avg. Prob."][0] > 0.9
  identical = rng.normal(size=(36, 5))  # every site drawn from one distribution
  scores = _classify(identical, classes)
  assert abs(scores["Accuracy"][0] - 1 / 3) < 0.2
  assert abs(scores["Avg. Prob."][0] - 1 / 3) < 0.1
  assert scores["Avg. Entropy"][0] > 0.7  # ln 3 = 1.10 for a uniform guess; 0 for certainty


def test_grouped_folds_keep_each_subject_on_one_side():
  classes = np.repeat([0, 1], 6)
  groups = [f"s{i // 2}" for i in range(12)]  # six subjects with two cases each
  for train, test in site_effects.cv_folds(classes, folds=3, seed=0, groups=groups):
    assert not {groups[i] for i in train} & {groups[i] for i in test}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
  """brain-sites at 4 mm (50x59x48): sites A and B, 3 cases each."""
  root = tmp_path_factory.mktemp("data") / "brain-sites"
  synthesize(root, sites=2, cases_per_site=3, resolution_mm=4, progress=None)
  return root


def test_study_is_deterministic_for_a_seed(tiny_root):
  _, by_site = load_dataset(tiny_root)
  cases = [c for site in sorted(by_site) for c in by_site[site]]
  options = dict(features="rich", folds=3, trees=20, n4=False, progress=None)
  first = site_effects.run_study(cases, seed=1, **options)
  again = site_effects.run_study(cases, seed=1, **options)
  assert site_effects.table_csv(first) == site_effects.table_csv(again)
  assert list(first.rows) == ["raw", "whitening", "histogram", "scaled"]
  assert first.rows["raw"]["Accuracy"][0] == 1.0  # site A's scale 1000 vs site B's 300


def test_cli_writes_the_table_and_the_figure(tiny_root, tmp_path, capsys):
  out = tmp_path / "study"
  code = site_effects.main([str(tiny_root), "--out", str(out), "--folds", "3", "--trees", "20",
                            "--n4-cache-dir", str(tmp_path / "n4")])
  assert code == 0
  with open(out / "site_effects.csv") as f:
    rows = list(csv.DictReader(f))
  n4 = ["raw+n4", "whitening+n4", "histogram+n4", "scaled+n4"] if HAVE_SIMPLEITK else []
  assert [r["pipeline"] for r in rows] == ["raw", "whitening", "histogram", "scaled"] + n4
  assert {"Accuracy", "Avg. Entropy", "Avg. Prob."} <= set(rows[0])
  assert all(0 <= float(r["Accuracy"]) <= 1 for r in rows)
  markdown = (out / "site_effects.md").read_text()
  assert "| pipeline | Accuracy | Avg. Entropy | Avg. Prob. |" in markdown
  assert "majority site 50.00 %, 1/K = 50.00 % (K = 2)" in markdown
  assert ("| raw+n4 |" in markdown) == HAVE_SIMPLEITK
  assert ("+n4 pipelines skipped" in markdown) != HAVE_SIMPLEITK
  assert (out / "site_histograms.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "| raw |" in capsys.readouterr().out


def test_n4_rows_are_skipped_with_a_note_without_simpleitk(tiny_root, tmp_path, monkeypatch):
  from medgen_jax.data import bias_field
  monkeypatch.setitem(sys.modules, "SimpleITK", None)
  monkeypatch.setattr(bias_field, "_memo", type(bias_field._memo)())
  _, by_site = load_dataset(tiny_root)
  cases = [c for site in sorted(by_site) for c in by_site[site]]
  result = site_effects.run_study(cases, pipelines=("raw",), trees=5, n4_options={"cache_dir": str(tmp_path)},
                                  progress=None)
  assert list(result.rows) == ["raw"]
  assert result.notes == ["+n4 pipelines skipped: data.bias_correction='n4': needs SimpleITK, which is not "
                          "installed. Fix: pip install 'medgen_jax[n4]'"]


def test_bad_root_is_one_line_and_exit_2(tmp_path, capsys):
  code = site_effects.main([str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
  err = capsys.readouterr().err
  assert code == 2
  assert err.count("\n") == 1 and "missing: does not exist" in err and "--synthesize" in err
  with pytest.raises(SystemExit) as caught:
    site_effects.main([str(tmp_path), "--out", str(tmp_path / "out"), "--folds", "x"])
  assert caught.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_too_many_folds_is_a_clear_error(tiny_root, tmp_path, capsys):
  code = site_effects.main([str(tiny_root), "--out", str(tmp_path / "out"), "--folds", "4", "--no-n4"])
  assert code == 2
  assert "--folds=4: must be between 2 and the smallest site's case count (3)" in capsys.readouterr().err


def test_study_refuses_a_single_site(tmp_path):
  label = np.ones((2, 2, 2), np.uint8)
  cases = [Case("A", f"c{i}", np.ones((2, 2, 2), np.float32), label, np.eye(4), "img", "lbl") for i in range(3)]
  with pytest.raises(site_effects.DataError, match="at least 2"):
    site_effects.run_study(cases, n4=False, progress=None)
