"""Normalization against closed forms and a hand-computed Nyul mapping."""

import numpy as np
import pytest

from medgen_jax.data.errors import DataError
from medgen_jax.data.normalize import (Normalizer, foreground_mask, make_normalizer, nyul_apply,
                                       nyul_fit, otsu_threshold, scaled, whitening)


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


@pytest.mark.parametrize("name", ["none", "whitening", "scaled", "histogram"])
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
                  standard_range=(0, 1))
  for name in ("none", "whitening", "scaled", "histogram"):
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
