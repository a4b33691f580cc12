"""Normalization against closed forms and a hand-computed Nyul mapping."""

import json

import numpy as np
import pytest

from medgen_jax.data.errors import DataError
from medgen_jax.data.normalize import (NYUL_PERCENTILES, Normalizer, foreground_mask, make_normalizer,
                                       nyul_apply, nyul_fit, otsu_threshold, scaled, whitening)


def test_whitening_closed_form():
  x = np.array([1.0, 2.0, 3.0, 4.0])
  expected = (x - 2.5) / np.sqrt(1.25)  # population sd: sqrt(mean((x - 2.5)^2))
  np.testing.assert_allclose(whitening(x), expected, rtol=1e-6)


def test_whitening_inside_mask_applies_to_all_voxels():
  x = np.array([0.0, 0.0, 2.0, 4.0])
  mask = x > 0
  np.testing.assert_allclose(whitening(x, mask=mask), [-3.0, -3.0, -1.0, 1.0], rtol=1e-6)


def test_scaled_closed_form_with_percentile_clipping():
  x = np.arange(101, dtype=np.float32)
  out = scaled(x, clip_percentiles=(10, 90))
  np.testing.assert_allclose(out, (np.clip(x, 10, 90) - 10) / 80, atol=1e-6)
  np.testing.assert_allclose(scaled(x), x / 100, atol=1e-6)


def test_nyul_hand_computed_piecewise_linear():
  percentiles = (0.0, 50.0, 100.0)
  v1 = np.array([0.0, 1.0, 2.0, 3.0, 4.0])      # landmarks 0, 2, 4 -> mapped 0, 5, 10
  v2 = np.array([0.0, 1.0, 2.0, 3.0, 10.0])     # landmarks 0, 2, 10 -> mapped 0, 2, 10
  standard = nyul_fit([v1, v2], percentiles=percentiles, standard_range=(0.0, 10.0))
  np.testing.assert_allclose(standard, [0.0, 3.5, 10.0])
  # Inside: 0->0, 1->1.75, 2->3.5, 3->6.75, 4->10. Outside the landmarks (masked out of the
  # landmark computation): continue with the end segments' slopes 3.5/2 and 6.5/2.
  x = np.array([-2.0, 0.0, 1.0, 2.0, 3.0, 4.0, 6.0])
  mask = (x >= 0) & (x <= 4)
  out = nyul_apply(x, standard, mask=mask, percentiles=percentiles)
  np.testing.assert_allclose(out, [-3.5, 0.0, 1.75, 3.5, 6.75, 10.0, 16.5], rtol=1e-5)


def test_nyul_default_landmarks_map_training_volume_ends_to_standard_range():
  rng = np.random.default_rng(0)
  x = rng.gamma(2.0, 50.0, size=20000)
  norm = make_normalizer("histogram").fit([x])
  out = norm(x)
  np.testing.assert_allclose(np.percentile(out, [1, 99]), [0.0, 1.0], atol=1e-4)
  # A differently scaled scanner lands on the same standard scale.
  np.testing.assert_allclose(norm(3.0 * x + 7.0), out, atol=1e-4)


def test_otsu_separates_two_modes():
  x = np.concatenate([np.full(1000, 10.0), np.full(500, 100.0)])
  t = otsu_threshold(x)
  assert 10 < t < 100
  assert foreground_mask(x, "otsu").sum() == 500


def test_factory_names_options_and_round_trip():
  assert make_normalizer("none")(np.array([3, 4])).tolist() == [3.0, 4.0]
  with pytest.raises(DataError, match="unknown normalization"):
    make_normalizer("zscore")
  with pytest.raises(DataError, match="clip_percentiles.*not used by 'whitening'"):
    make_normalizer("whitening", clip_percentiles=(1, 99))
  with pytest.raises(DataError, match="foreground"):
    make_normalizer("whitening", foreground="skull")
  norm = make_normalizer("histogram", foreground="nonzero", percentiles=(1, 50, 99)).fit(
      [np.arange(1, 100, dtype=float)])
  again = Normalizer.from_dict(norm.to_dict())
  assert again == norm
  with pytest.raises(RuntimeError, match="before fit"):
    make_normalizer("histogram")(np.ones(3))


@pytest.mark.parametrize("name", ["none", "whitening", "scaled", "histogram", "site_range"])
def test_every_normalization_builds_from_the_default_config(name):
  from medgen_jax.config import base_config
  from medgen_jax.data.pipeline import make_normalizer_from_config
  config = base_config()
  config.data.normalization.name = name
  norm = make_normalizer_from_config(config.data.normalization)
  assert norm == Normalizer(name=name)
  x = np.random.default_rng(0).gamma(2.0, 30.0, size=(6, 5, 4))
  if name == "none":
    out = norm.fit([x])(x)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, x.astype(np.float32))


def test_default_valued_options_are_accepted_other_unused_options_rejected():
  from medgen_jax.config import base_config
  from medgen_jax.data.normalize import NYUL_PERCENTILES
  from medgen_jax.data.pipeline import make_normalizer_from_config
  defaults = dict(foreground="none", clip_percentiles=[0, 100], percentiles=NYUL_PERCENTILES,
                  standard_range=(0, 1), output_range=(-1, 1))
  for name in ("none", "whitening", "scaled", "histogram", "site_range"):
    assert make_normalizer(name, **defaults) == Normalizer(name=name)
  with pytest.raises(DataError, match=r"data.normalization.foreground: option not used by 'none' "
                                      r"\(value 'otsu'\).*Fix: 'none' takes no options"):
    make_normalizer("none", foreground="otsu")
  with pytest.raises(DataError, match="clip_percentiles.*not used by 'histogram'"):
    make_normalizer("histogram", clip_percentiles=(1, 99))
  with pytest.raises(DataError, match="standard_range.*not used by 'scaled'"):
    make_normalizer("scaled", standard_range=(0, 100))
  with pytest.raises(DataError, match=r"data.normalization.clip_percentiles: 'ab' is not a list of numbers"):
    make_normalizer("scaled", clip_percentiles="ab")
  config = base_config()
  config.data.normalization.name = "none"
  config.data.normalization.foreground = "nonzero"
  with pytest.raises(DataError, match="foreground.*not used by 'none'"):
    make_normalizer_from_config(config.data.normalization)


# --- site_range: SIFA's per-site (per-modality) min/max -> [-1, 1] --------------------------------


def _sifa_map(x, lo, hi, out=(-1.0, 1.0)):
  """The formula, written independently: out_lo + (clip(x, lo, hi) - lo) / (hi - lo) * (out_hi - out_lo)."""
  x = np.asarray(x, np.float64)
  return out[0] + (np.minimum(np.maximum(x, lo), hi) - lo) / (hi - lo) * (out[1] - out[0])


def test_site_range_hand_example_two_sites():
  ct = [np.array([0.0, 10.0, 20.0]), np.array([[-5.0, 30.0]])]   # pooled: min -5, max 30
  mr = [np.array([100.0, 300.0, 200.0])]                         # min 100, max 300
  norm = make_normalizer("site_range").fit(ct + mr, sites=["CT", "CT", "MR"])
  assert norm.site_ranges == {"CT": (-5.0, 30.0), "MR": (100.0, 300.0)}
  x = np.array([-10.0, -5.0, 12.5, 30.0, 40.0])                  # beyond both ends: clipped
  np.testing.assert_allclose(norm(x, site="CT"), [-1.0, -1.0, 0.0, 1.0, 1.0], atol=1e-6)
  y = np.array([50.0, 150.0, 250.0, 400.0])
  out = norm(y, site="MR")
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, [-1.0, -0.5, 0.5, 1.0], atol=1e-6)
  rng = np.random.default_rng(0)
  z = rng.normal(100, 80, size=(5, 4, 3))
  np.testing.assert_allclose(norm(z, site="CT"), _sifa_map(z, -5, 30), atol=1e-6)
  np.testing.assert_allclose(norm(z, site="MR"), _sifa_map(z, 100, 300), atol=1e-6)
  # Stored with the run: JSON and back, same ranges and same outputs.
  stored = json.loads(json.dumps(norm.to_dict()))
  assert stored["site_ranges"] == {"CT": [-5.0, 30.0], "MR": [100.0, 300.0]}
  again = Normalizer.from_dict(stored)
  assert again == norm
  np.testing.assert_array_equal(again(z, site="MR"), norm(z, site="MR"))


def test_site_range_percentiles_output_range_and_foreground():
  a1, a2 = np.arange(0.0, 51.0), np.arange(51.0, 101.0)[::-1]    # pooled: 0..100
  b = np.arange(200.0, 301.0)
  norm = make_normalizer("site_range", clip_percentiles=(10, 90), output_range=(0, 1)).fit(
      [a1, b, a2], sites=["A", "B", "A"])
  pooled = np.concatenate([a1, a2])
  lo, hi = np.percentile(pooled, [10, 90])
  assert (lo, hi) == (10.0, 90.0)
  np.testing.assert_allclose(norm.site_ranges["A"], (lo, hi))
  np.testing.assert_allclose(norm.site_ranges["B"], np.percentile(b, [10, 90]))
  np.testing.assert_allclose(norm(np.array([0.0, 10.0, 50.0, 90.0, 100.0]), site="A"),
                             [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
  # foreground='nonzero': the range ignores the zero background, the map applies to every voxel.
  fg = make_normalizer("site_range", foreground="nonzero").fit(
      [np.array([0.0, 0.0, 5.0, 10.0]), np.array([0.0, 7.0])], sites=["S", "S"])
  assert fg.site_ranges == {"S": (5.0, 10.0)}
  np.testing.assert_allclose(fg(np.array([0.0, 5.0, 7.5, 10.0]), site="S"), [-1, -1, 0, 1], atol=1e-6)


def test_site_range_unknown_or_missing_site_and_options():
  norm = make_normalizer("site_range").fit([np.arange(4.0), np.arange(8.0)], sites=["CT", "MR"])
  with pytest.raises(DataError, match=r"called without a site \(fitted sites: \['CT', 'MR'\]\)"
                                      r".*Fix: pass the volume's site, one of \['CT', 'MR'\]"):
    norm(np.ones(3))
  with pytest.raises(DataError, match=r"site 'PET': has no intensity range.*\['CT', 'MR'\].*"
                                      r"Fix: .*target_adaptation=True.*'scaled'") as e:
    norm(np.ones(3), site="PET")
  assert str(e.value).count("\n") == 0
  with pytest.raises(ValueError, match="needs the site of each"):
    make_normalizer("site_range").fit([np.ones(3)])
  with pytest.raises(RuntimeError, match="before fit"):
    make_normalizer("site_range")(np.ones(3), site="CT")
  for option, value in (("percentiles", (1, 50, 99)), ("standard_range", (0, 100))):
    with pytest.raises(DataError, match=f"{option}.*not used by 'site_range'"):
      make_normalizer("site_range", **{option: value})
  for name in ("scaled", "whitening", "histogram", "none"):
    with pytest.raises(DataError, match=f"output_range.*not used by '{name}'"):
      make_normalizer(name, output_range=(0, 1))
  with pytest.raises(DataError, match="output_range: .*not an increasing pair"):
    make_normalizer("site_range", output_range=(1, -1))
  with pytest.raises(DataError, match="clip_percentiles: .*percentiles in \\[0, 100\\]"):
    make_normalizer("site_range", clip_percentiles=(5, 105))
  # The others ignore a site.
  x = np.arange(5.0)
  np.testing.assert_array_equal(make_normalizer("scaled")(x, site="anything"), make_normalizer("scaled")(x))


def test_stored_json_of_the_other_normalizers_is_unchanged_and_old_files_load():
  keys = ["name", "foreground", "clip_percentiles", "percentiles", "standard_range", "landmarks"]
  for name in ("none", "whitening", "scaled", "histogram"):
    norm = make_normalizer(name).fit([np.arange(1.0, 100.0)], sites=["A"])
    assert list(norm.to_dict()) == keys
    assert Normalizer.from_dict(json.loads(json.dumps(norm.to_dict()))) == norm
  old = {"name": "scaled", "foreground": "none", "clip_percentiles": [1, 99],
         "percentiles": list(NYUL_PERCENTILES), "standard_range": [0, 1], "landmarks": None}
  assert Normalizer.from_dict(old) == make_normalizer("scaled", clip_percentiles=(1, 99))


def test_site_range_from_the_config_block():
  from medgen_jax.config import base_config
  from medgen_jax.data.pipeline import make_normalizer_from_config
  config = base_config()
  config.data.normalization.name = "site_range"
  config.data.normalization.output_range = (0, 1)
  config.data.normalization.clip_percentiles = (0.5, 99.5)
  assert make_normalizer_from_config(config.data.normalization) == Normalizer(
      name="site_range", output_range=(0.0, 1.0), clip_percentiles=(0.5, 99.5))
