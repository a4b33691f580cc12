"""In-plane crop/pad/resampling, 2.5-D offsets, the bias-correction hook."""

import numpy as np
import pytest

from medgen_jax.data.errors import DataError
from medgen_jax.data.normalize import make_normalizer
from medgen_jax.data.preprocess import (context_offsets, correct_bias_field, crop_or_pad,
                                        preprocess_case, resample_inplane)


def test_crop_or_pad_is_centred():
  x = np.arange(5 * 4 * 2).reshape(5, 4, 2)
  out = crop_or_pad(x, (3, 6), pad_value=-1)
  assert out.shape == (3, 6, 2)
  np.testing.assert_array_equal(out[:, 1:5], x[1:4])  # crop rows 1..3, pad one column each side
  assert (out[:, 0] == -1).all() and (out[:, 5] == -1).all()


def test_resample_inplane_halves_the_grid_and_keeps_labels_integer():
  label = np.zeros((8, 8, 3), np.uint8)
  label[:4] = 2
  out = resample_inplane(label, (1.0, 1.0, 3.0), (2.0, 2.0), order=0)
  assert out.shape == (4, 4, 3)
  np.testing.assert_array_equal(out[:2], 2)
  np.testing.assert_array_equal(out[2:], 0)
  assert resample_inplane(label, (1.0, 1.0, 3.0), (1.0, 1.0), order=0) is label


def test_preprocess_case_normalizes_then_fits_the_grid():
  rng = np.random.default_rng(0)
  image = rng.normal(50, 10, size=(10, 12, 4)).astype(np.float32)
  label = (image > 50).astype(np.uint8)
  out_image, out_label = preprocess_case(image, label, (1, 1, 1), normalizer=make_normalizer("whitening"),
                                         in_plane_shape=(12, 8))
  inner = out_image[1:11]
  np.testing.assert_allclose(inner, ((image - image.mean()) / image.std())[:, 2:10], rtol=1e-5, atol=1e-5)
  assert (out_image[0] == out_image.min()).all()  # padding uses the normalized background
  np.testing.assert_array_equal(out_label[1:11], label[:, 2:10])


def test_context_offsets_and_bias_hook():
  np.testing.assert_array_equal(context_offsets(5), [-2, -1, 0, 1, 2])
  with pytest.raises(DataError, match="odd"):
    context_offsets(2)
  x = np.ones(3)
  assert correct_bias_field(x, method="none") is x
  with pytest.raises(DataError, match="data.bias_correction='n3'"):
    correct_bias_field(x, method="n3")
