"""Reading NIfTI: orientation, spacing, scaling, layouts, label remapping."""

import json

import nibabel as nib
import numpy as np

from helpers import AFFINE, make_sites_dataset, write_nii
from medgen_jax.data.layouts import detect_layout, discover
from medgen_jax.data.loading import load_dataset
from medgen_jax.data.nifti import load_nifti, write_nifti


def test_flipped_affine_loads_equal_to_canonical(tmp_path):
  data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
  canonical = write_nii(tmp_path / "ras.nii.gz", data, AFFINE)
  # Same physical image stored L-P-S: flip axes 0 and 1 and move the origin accordingly.
  flip = np.diag([-1.0, -1.0, 1.0, 1.0])
  flip[0, 3] = (data.shape[0] - 1)
  flip[1, 3] = (data.shape[1] - 1)
  lps_affine = AFFINE @ flip
  lps = write_nii(tmp_path / "lps.nii.gz", data[::-1, ::-1, :], lps_affine)
  assert nib.aff2axcodes(lps_affine) == ("L", "P", "S")
  a, b = load_nifti(canonical), load_nifti(lps)
  np.testing.assert_array_equal(a.data, b.data)
  np.testing.assert_allclose(a.affine, b.affine)


def test_permuted_axes_are_reoriented(tmp_path):
  data = np.random.default_rng(0).normal(size=(4, 5, 6)).astype(np.float32)
  # Stored as (z, y, x): the affine's columns say which world axis each array axis runs along.
  perm_affine = np.array([[0, 0, 1.5, 0], [0, 1.5, 0, 0], [3.0, 0, 0, 0], [0, 0, 0, 1]])
  path = write_nii(tmp_path / "zyx.nii", np.transpose(data, (2, 1, 0)), perm_affine)
  vol = load_nifti(path)
  np.testing.assert_array_equal(vol.data, data)
  assert vol.spacing == (1.5, 1.5, 3.0)


def test_spacing_from_oblique_affine(tmp_path):
  theta = np.deg2rad(20)
  rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
  affine = np.eye(4)
  affine[:3, :3] = rot @ np.diag([0.7, 0.8, 4.0])
  vol = load_nifti(write_nii(tmp_path / "o.nii.gz", np.zeros((3, 3, 3), np.float32), affine))
  np.testing.assert_allclose(vol.spacing, (0.7, 0.8, 4.0), rtol=1e-6)


def test_scl_slope_and_inter_are_applied(tmp_path):
  raw = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
  img = nib.Nifti1Image(raw, AFFINE)
  img.header.set_slope_inter(0.5, 10.0)
  nib.save(img, str(tmp_path / "s.nii"))
  np.testing.assert_allclose(load_nifti(tmp_path / "s.nii").data, raw * 0.5 + 10.0)


def test_writer_is_deterministic_and_round_trips(tmp_path):
  data = np.random.default_rng(1).normal(100, 20, size=(6, 7, 5)).astype(np.float32)
  write_nifti(tmp_path / "a.nii.gz", data, AFFINE, on_disk_dtype=np.int16)
  write_nifti(tmp_path / "b.nii.gz", data, AFFINE, on_disk_dtype=np.int16)
  assert (tmp_path / "a.nii.gz").read_bytes() == (tmp_path / "b.nii.gz").read_bytes()
  back = load_nifti(tmp_path / "a.nii.gz").data
  step = (data.max() - data.min()) / 65535
  np.testing.assert_allclose(back, data, atol=step)
  assert not list(tmp_path.glob(".*tmp*"))


def test_sites_layout_discovery_and_dataset_json(tmp_path):
  root = make_sites_dataset(tmp_path / "ds", sites=("X", "Y"), cases=2)
  assert detect_layout(root) == "sites"
  info, by_site, problems = discover(root)
  assert problems == []
  assert sorted(by_site) == ["X", "Y"]
  assert [c.case_id for c in by_site["X"]] == ["case0", "case1"]
  assert info.labels[0] == "background" and info.num_classes == 4


def test_sites_layout_label_remap(tmp_path):
  root = make_sites_dataset(tmp_path / "ds", sites=("X",), cases=1, num_classes=3)
  (root / "dataset.json").write_text(json.dumps(
      {"labels": {"0": "background", "1": "organ"}, "label_remap": {"2": 1}}))
  _, cases = load_dataset(root)
  raw = np.asarray(nib.load(str(root / "X" / "case0_label.nii.gz")).dataobj)
  expected = np.where(raw == 2, 1, raw)
  np.testing.assert_array_equal(cases["X"][0].label, expected)
  assert set(np.unique(cases["X"][0].label)) == {0, 1}


def test_prostate6_layout_case_insensitive_suffix_and_label_merge(tmp_path):
  root = tmp_path / "prostate"
  label = np.zeros((8, 8, 4), np.uint8)
  label[2:5, 2:5, 1:3] = 1
  label[5:7, 2:5, 1:3] = 2  # peripheral zone in NCI-ISBI masks
  image = np.random.default_rng(0).normal(size=label.shape).astype(np.float32)
  write_nii(root / "BMC" / "Case00.nii.gz", image)
  write_nii(root / "BMC" / "Case00_Segmentation.nii.gz", label)
  write_nii(root / "HK" / "Case38.nii.gz", image)
  write_nii(root / "HK" / "Case38_segmentation.nii.gz", (label > 0).astype(np.uint8))
  (root / "HK" / "README.txt").write_text("not a case")
  assert detect_layout(root) == "prostate6"
  info, cases = load_dataset(root, layout="prostate6")
  assert info.labels == {0: "background", 1: "prostate"}
  np.testing.assert_array_equal(cases["BMC"][0].label, (label > 0).astype(np.uint8))
  assert [c.case_id for c in cases["HK"]] == ["Case38"]


def test_site_subset_is_selected(tmp_path):
  root = make_sites_dataset(tmp_path / "ds", sites=("A", "B", "C"), cases=1)
  _, cases = load_dataset(root, sites=["C", "A"])
  assert list(cases) == ["C", "A"]


def test_verified_gz_reading_equals_nibabel(tmp_path):
  """.nii.gz goes through our CRC-checked decompression; .nii through nib.load: same result for
  scaling, orientation, NIfTI-2 and 4-D channel selection."""
  raw = np.arange(4 * 5 * 6 * 2, dtype=np.int16).reshape(4, 5, 6, 2)
  flip = np.diag([-1.0, 1.0, -1.0, 1.0])
  flip[0, 3], flip[2, 3] = 3, 5
  for klass in (nib.Nifti1Image, nib.Nifti2Image):
    img = klass(raw, AFFINE @ flip)
    img.header.set_slope_inter(0.5, -3.0)
    nib.save(img, str(tmp_path / f"{klass.__name__}.nii"))
    nib.save(img, str(tmp_path / f"{klass.__name__}.nii.gz"))
    for channel in (0, 1):
      a = load_nifti(tmp_path / f"{klass.__name__}.nii", channel=channel)
      b = load_nifti(tmp_path / f"{klass.__name__}.nii.gz", channel=channel)
      np.testing.assert_array_equal(a.data, b.data)
      np.testing.assert_array_equal(b.data, (raw[::-1, :, ::-1, channel] * 0.5 - 3.0))
      np.testing.assert_allclose(a.affine, b.affine)
