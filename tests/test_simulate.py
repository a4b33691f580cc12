"""The brain-sites simulator: determinism, and each preset does what it claims."""

import dataclasses
import hashlib

import numpy as np
import pytest

from medgen_jax.data import anatomy as anatomy_lib
from medgen_jax.data.errors import DataError
from medgen_jax.data.loading import load_dataset
from medgen_jax.data.simulate import SITE_PRESETS, scan_parameters, simulate_scan, thick_slices
from medgen_jax.data.synthesize import synthesize

ALL = ("contrast", "thick", "intensity", "bias", "noise", "offset")


@pytest.fixture(scope="module")
def subject():
  """One warped subject, cropped to a 64x80x56 block around the brain centre for speed."""
  full = anatomy_lib.random_subject(anatomy_lib.mni152(2), np.random.default_rng(0))
  crop = (slice(17, 81), slice(18, 98), slice(18, 74))
  return anatomy_lib.Anatomy(*(getattr(full, f.name)[crop] if f.name != "affine" else full.affine
                               for f in dataclasses.fields(full)))


def test_mni152_labels_follow_reference_note():
  a = anatomy_lib.mni152(2)
  assert a.t1.shape == (99, 117, 95)
  counts = np.bincount(a.label.ravel(), minlength=4)
  assert counts[0] > counts[3] > counts[1] > 0 and counts[2] > counts[3]  # GM > WM > CSF
  means = [a.t1[a.label == k].mean() for k in (1, 2, 3)]
  assert means[0] < means[1] < means[2]  # T1: CSF < GM < WM


def test_subject_warp_keeps_image_and_label_aligned(subject):
  means = [subject.t1[subject.label == k].mean() for k in (1, 2, 3)]
  assert means[0] < means[1] < means[2]
  assert set(np.unique(subject.label)) == {0, 1, 2, 3}


@pytest.mark.parametrize("site", list(SITE_PRESETS))
def test_bias_field_ratio_is_in_preset_range(subject, site):
  preset = SITE_PRESETS[site]
  params = scan_parameters(preset, np.random.default_rng(1))
  stages = ("contrast", "thick", "intensity")
  clean = simulate_scan(subject, params, np.random.default_rng(2), stages=stages)
  biased = simulate_scan(subject, params, np.random.default_rng(2), stages=stages + ("bias",))
  inside = (subject.mask > 0.5) & (clean > 0.01 * params["scale"])
  field = biased[inside] / clean[inside]
  measured = field.max() / field.min()
  assert preset.bias_ratio[0] - 1e-3 <= measured <= preset.bias_ratio[1] + 1e-3
  np.testing.assert_allclose(measured, params["bias_ratio"], rtol=1e-3)


@pytest.mark.parametrize("site", list(SITE_PRESETS))
def test_background_noise_sd_matches_preset(subject, site):
  preset = SITE_PRESETS[site]
  params = scan_parameters(preset, np.random.default_rng(3))
  noiseless = simulate_scan(subject, params, np.random.default_rng(4), stages=tuple(s for s in ALL if s != "noise"))
  noisy = simulate_scan(subject, params, np.random.default_rng(4), stages=ALL)
  background = noiseless == np.float32(params["offset"])
  assert background.sum() > 5000
  # Zero signal + complex Gaussian noise is Rayleigh: E[x^2] = 2 sigma^2.
  sigma = np.sqrt(np.mean((noisy[background] - params["offset"]) ** 2) / 2)
  relative = sigma / params["scale"]
  lo, hi = preset.noise * (1 - preset.noise_jitter), preset.noise * (1 + preset.noise_jitter)
  assert lo * 0.97 <= relative <= hi * 1.03
  np.testing.assert_allclose(relative, params["noise"], rtol=0.03)


@pytest.mark.parametrize("site", list(SITE_PRESETS))
def test_thick_slices_lower_through_plane_high_frequency_energy(subject, site):
  preset = SITE_PRESETS[site]
  params = scan_parameters(preset, np.random.default_rng(5))
  sharp = simulate_scan(subject, params, np.random.default_rng(6), stages=("intensity",))
  thick = simulate_scan(subject, params, np.random.default_rng(6), stages=("thick", "intensity"))

  def high_frequency_energy(x):  # energy of the second difference along z: a high-pass filter
    return np.sum((x[..., 2:] - 2 * x[..., 1:-1] + x[..., :-2]) ** 2)

  ratio = high_frequency_energy(thick) / high_frequency_energy(sharp)
  if preset.slice_factor > 1:
    assert ratio < 0.4  # measured 0.14 (f = 3) and 0.26 (f = 2) on the full volume
  else:
    assert ratio == pytest.approx(1.0)


def test_thick_slices_keep_sampled_slices_blurred_only():
  x = np.zeros((1, 1, 12), np.float32)
  x[0, 0, 6] = 1.0
  out = thick_slices(x, factor=3, phase=0)
  assert out[0, 0, 6] < 1.0 and out.sum() == pytest.approx(1.0, abs=0.15)


def test_intensity_mapping_and_contrast_closed_forms(subject):
  params = scan_parameters(SITE_PRESETS["D"], np.random.default_rng(7))
  mapped = simulate_scan(subject, params, np.random.default_rng(0), stages=("intensity",))
  np.testing.assert_allclose(mapped, params["scale"] * subject.t1.clip(0) ** params["gamma"], rtol=1e-5)
  contrasted = simulate_scan(subject, params, np.random.default_rng(0), stages=("contrast",))
  pure_csf = subject.csf > 0.999
  np.testing.assert_allclose(contrasted[pure_csf] / subject.t1[pure_csf], params["contrast"][0], rtol=1e-3)


def test_simulation_is_deterministic(subject):
  params = scan_parameters(SITE_PRESETS["B"], np.random.default_rng(9))
  a = simulate_scan(subject, params, np.random.default_rng(10))
  b = simulate_scan(subject, params, np.random.default_rng(10))
  np.testing.assert_array_equal(a, b)


def _digest(folder):
  h = hashlib.sha256()
  for f in sorted(p for p in folder.rglob("*") if p.is_file()):
    h.update(str(f.relative_to(folder)).encode())
    h.update(f.read_bytes())
  return h.hexdigest()


def test_synthesize_same_seed_same_bytes_and_loads_in_ras(tmp_path):
  a = synthesize(tmp_path / "a", sites=2, cases_per_site=1, seed=3, progress=None)
  b = synthesize(tmp_path / "b", sites=2, cases_per_site=1, seed=3, progress=None)
  assert _digest(a) == _digest(b)
  c = synthesize(tmp_path / "c", sites=2, cases_per_site=1, seed=4, progress=None)
  assert _digest(a) != _digest(c)
  info, cases = load_dataset(a)
  assert info.labels == {0: "background", 1: "CSF", 2: "GM", 3: "WM"}
  # Site B is stored LPS on disk; it loads in RAS with the same grid as the RAS site A.
  np.testing.assert_allclose(cases["A"][0].affine, cases["B"][0].affine)
  assert not list(tmp_path.glob(".*partial"))


def test_synthesize_never_overwrites(tmp_path):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "mine.txt").write_text("precious")
  with pytest.raises(DataError, match="already exists"):
    synthesize(tmp_path / "out", sites=1, cases_per_site=1, progress=None)
  assert (tmp_path / "out" / "mine.txt").read_text() == "precious"
