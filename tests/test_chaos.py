"""CHAOS DICOM + PNG reader, T1-DUAL phases, BTCV remap, conversion to `sites`, raw check."""

import json
import sys

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from PIL import Image  # noqa: E402  (matplotlib's own dependency)

from medgen_jax.data import chaos, check, convert  # noqa: E402
from medgen_jax.data.errors import DataError  # noqa: E402
from medgen_jax.data.loading import load_dataset  # noqa: E402
from medgen_jax.data.nifti import write_nifti  # noqa: E402

ROWS, COLS = 6, 5
ROW_SP, COL_SP, DZ = 0.8, 0.7, 2.5


def write_dicom(path, pixels, z, *, echo=None, instance=1, slope=None, intercept=None, iop=(1, 0, 0, 0, 1, 0)):
  from pydicom.dataset import FileDataset, FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian, generate_uid
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
  ds.SOPClassUID = meta.MediaStorageSOPClassUID
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.Rows, ds.Columns = pixels.shape
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = "MONOCHROME2"
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
  ds.PixelData = pixels.astype("<i2").tobytes()
  ds.ImagePositionPatient = [-10.0, -20.0, float(z)]
  ds.ImageOrientationPatient = list(iop)
  ds.PixelSpacing = [ROW_SP, COL_SP]
  ds.InstanceNumber = instance
  if echo is not None:
    ds.EchoTime = echo
  if slope is not None:
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
  if int(pydicom.__version__.split(".")[0]) < 3:
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.save_as(str(path), write_like_original=False)
  else:
    ds.save_as(str(path), enforce_file_format=True)


def write_png(path, grey):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(grey.astype(np.uint8)).save(path)


MR_GREYS = (0, 63, 126, 189, 252)


def make_series(dcm_dir, ground_dir, *, n, names, png_names=None, ct=False, echo=None, base_value=0, masks=True,
                z0=40.0, skip=None):
  """n slices at z = z0 - DZ * k (decreasing with instance number); file names given per slice.
  Slice k has pixels base_value + 100 k (+ a column ramp) and a square of organ (k % 4) + 1."""
  dcm_dir.mkdir(parents=True, exist_ok=True)
  truth = []
  for k in range(n):
    if skip is not None and k == skip:
      continue
    pixels = base_value + 100 * k + np.tile(np.arange(COLS), (ROWS, 1))
    organ = k % 4 + 1
    grey = np.zeros((ROWS, COLS), np.uint8)
    grey[1:3, 1:4] = 255 if ct else MR_GREYS[organ]
    stored = pixels + 1024 if ct else pixels
    write_dicom(dcm_dir / f"{names[k]}.dcm", stored, z0 - DZ * k, echo=echo, instance=k + 1,
                slope=1 if ct else None, intercept=-1024 if ct else None)
    if masks:
      write_png(ground_dir / f"{(png_names or names)[k]}.png", grey)
    truth.append((z0 - DZ * k, pixels, (grey > 0) * (1 if ct else organ)))
  return sorted(truth, key=lambda t: t[0])  # ascending position = expected slice order


def make_chaos(root, rng, *, patients=("1", "2"), n=4):
  """A tiny CHAOS_Train_Sets/Train_Sets tree with shuffled file names."""
  base = root / "CHAOS_Train_Sets" / "Train_Sets"
  truth = {}
  for p in patients:
    perm = rng.permutation(n)
    # MR: names whose sorted order differs from the position order; PNGs share the stems
    names = [f"IMG-0004-{100 + 7 * int(j):05d}" for j in perm]
    truth[("T2SPIR", p)] = make_series(base / "MR" / p / "T2SPIR" / "DICOM_anon", base / "MR" / p / "T2SPIR" / "Ground",
                                       n=n, names=names)
    t1 = base / "MR" / p / "T1DUAL"
    in_names = [f"IMG-0002-{2 * (k + 1):05d}" for k in range(n)]
    out_names = [f"IMG-0002-{2 * k + 1:05d}" for k in range(n)]
    truth[("T1DUAL_InPhase", p)] = make_series(t1 / "DICOM_anon" / "InPhase", t1 / "Ground", n=n, names=in_names,
                                               echo=4.6, base_value=1000)
    truth[("T1DUAL_OutPhase", p)] = make_series(t1 / "DICOM_anon" / "OutPhase", t1 / "Ground", n=n,
                                                names=out_names, echo=2.3, base_value=2000, masks=False)
    # CT: i0000,0000b.dcm-style names in instance order, liver_GT_000.png masks, positions shuffled
    ct_perm = rng.permutation(n)
    ct_dir = base / "CT" / p
    ct_truth = []
    (ct_dir / "DICOM_anon").mkdir(parents=True)
    for k in range(n):
      z = 100.0 - DZ * int(ct_perm[k])
      pixels = 100 * k + np.tile(np.arange(COLS), (ROWS, 1)) - 500
      grey = np.zeros((ROWS, COLS), np.uint8)
      grey[2:5, 0:2 + k % 3] = 255
      write_dicom(ct_dir / "DICOM_anon" / f"i{k:04d},0000b.dcm", pixels + 1024, z, instance=k + 1, slope=1,
                  intercept=-1024)
      write_png(ct_dir / "Ground" / f"liver_GT_{k:03d}.png", grey)
      ct_truth.append((z, pixels, (grey > 0).astype(np.uint8)))
    truth[("CT", p)] = sorted(ct_truth, key=lambda t: t[0])
  return base, truth


def assert_series(series, expected):
  image = series.image.transpose(1, 0, 2)  # back to [row, col, z]
  label = series.label.transpose(1, 0, 2)
  assert image.shape[2] == len(expected)
  for z, (_, pixels, mask) in enumerate(expected):
    np.testing.assert_array_equal(image[..., z], pixels)
    np.testing.assert_array_equal(label[..., z], mask)


@pytest.fixture(scope="module")
def chaos_tree(tmp_path_factory):
  root = tmp_path_factory.mktemp("chaos")
  base, truth = make_chaos(root, np.random.default_rng(0))
  return root, base, truth


def test_series_ordered_by_position_with_masks_remapped(chaos_tree):
  root, base, truth = chaos_tree
  series, problems = chaos.discover(root)
  assert not problems
  assert [s.key for s in series] == ["CT/1", "CT/2", "T2SPIR/1", "T1DUAL_InPhase/1", "T1DUAL_OutPhase/1",
                                     "T2SPIR/2", "T1DUAL_InPhase/2", "T1DUAL_OutPhase/2"]
  by_key = {s.key: s for s in series}
  for key in ("T2SPIR/1", "T2SPIR/2", "CT/1", "CT/2", "T1DUAL_InPhase/2", "T1DUAL_OutPhase/2"):
    seq, p = key.split("/")
    ser = chaos.read_series(by_key[key])
    assert_series(ser, truth[(seq, p)])  # also checks 63/126/189/252 -> 1..4, 255 -> 1, HU rescale
    assert ser.spacing == pytest.approx((COL_SP, ROW_SP, DZ))
    # RAS affine of an axial LPS series: x, y flipped, z ascending, origin at the lowest slice
    np.testing.assert_allclose(np.diag(ser.affine)[:3], [-COL_SP, -ROW_SP, DZ])
    np.testing.assert_allclose(ser.affine[:3, 3], [10.0, 20.0, truth[(seq, p)][0][0]])
  inp = chaos.read_series(by_key["T1DUAL_InPhase/1"])
  out = chaos.read_series(by_key["T1DUAL_OutPhase/1"])
  assert (inp.echo_time, out.echo_time) == (4.6, 2.3)
  assert inp.image.min() >= 1000 and out.image.min() >= 2000 and inp.image.max() < 2000  # phases kept apart
  np.testing.assert_array_equal(inp.label, out.label)  # one Ground folder for both phases
  chaos.check_phases(inp, out, base)
  with pytest.raises(DataError, match="swapped"):
    chaos.check_phases(out, inp, base)


def test_grey_level_maps_and_btcv_remap():
  grey = np.array([0, 55, 63, 70, 110, 126, 135, 175, 189, 200, 240, 252, 255])
  assert chaos.mr_grey_to_labels("m.png", grey).tolist() == [0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
  with pytest.raises(DataError, match=r"grey levels \[100\]"):
    chaos.mr_grey_to_labels("m.png", np.array([0, 100]))
  assert chaos.ct_grey_to_labels("c.png", np.array([0, 255])).tolist() == [0, 1]
  with pytest.raises(DataError, match="not 0 / 255"):
    chaos.ct_grey_to_labels("c.png", np.array([0, 1]))
  btcv = np.arange(14)
  assert chaos.btcv_to_labels("l.nii.gz", btcv).tolist() == [0, 4, 2, 3, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
  with pytest.raises(DataError, match="outside the BTCV labels"):
    chaos.btcv_to_labels("l.nii.gz", np.array([0, 14]))


def test_flat_t1dual_folder_split_by_echo_time(tmp_path):
  t1 = tmp_path / "MR" / "7" / "T1DUAL"
  names_in = [f"IMG-{2 * k + 2:05d}" for k in range(3)]
  names_out = [f"IMG-{2 * k + 1:05d}" for k in range(3)]
  expected_in = make_series(t1 / "DICOM_anon", t1 / "Ground", n=3, names=names_in, echo=4.4, base_value=1000)
  make_series(t1 / "DICOM_anon", t1 / "Ground", n=3, names=names_out, echo=2.2, base_value=3000, masks=False)
  series, problems = chaos.discover(tmp_path)
  assert not problems and [s.key for s in series] == ["T1DUAL_InPhase/7", "T1DUAL_OutPhase/7"]
  assert_series(chaos.read_series(series[0]), expected_in)
  assert chaos.read_series(series[1]).image.min() >= 3000


def test_mixed_or_gapped_series_are_errors(tmp_path):
  d = tmp_path / "MR" / "3" / "T2SPIR"
  make_series(d / "DICOM_anon", d / "Ground", n=4, names=[f"a{k}" for k in range(4)], skip=2)
  (s,) = chaos.discover(tmp_path)[0]
  with pytest.raises(DataError, match="uneven slice spacing"):
    chaos.read_series(s)
  write_dicom(d / "DICOM_anon" / "dup.dcm", np.zeros((ROWS, COLS)), 40.0)
  write_png(d / "Ground" / "dup.png", np.zeros((ROWS, COLS)))
  with pytest.raises(DataError, match="same position"):
    chaos.read_series(s)


def test_missing_pydicom_is_one_clear_line(chaos_tree, monkeypatch):
  root, _, _ = chaos_tree
  monkeypatch.setitem(sys.modules, "pydicom", None)
  series, _ = chaos.discover(root)
  with pytest.raises(DataError) as e:
    chaos.read_series(series[0])
  assert "pip install medgen_jax[dicom]" in str(e.value) and "\n" not in str(e.value)


def write_btcv(root, rng, n=2):
  for i in range(1, n + 1):
    image = rng.normal(size=(5, 4, 3)).astype(np.float32)
    label = rng.integers(0, 14, size=(5, 4, 3)).astype(np.uint8)
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    write_nifti(root / "img" / f"img{i:04d}.nii.gz", image, affine)
    write_nifti(root / "label" / f"label{i:04d}.nii.gz", label, affine)


def test_convert_chaos_and_btcv_then_load_as_sites(chaos_tree, tmp_path):
  root, _, truth = chaos_tree
  assert convert.detect_raw_format(root) == "chaos"
  out = convert.convert("chaos", root, tmp_path / "abd", progress=None)
  info, cases = load_dataset(out)
  assert info.labels == chaos.LABELS
  assert {s: [c.case_id for c in cs] for s, cs in cases.items()} == {"CT": ["1", "2"], "MR": ["1", "2"]}
  mr = cases["MR"][0]
  assert mr.spacing == pytest.approx((COL_SP, ROW_SP, DZ))
  # RAS reorientation of the LPS series flips x and y back
  expected = truth[("T2SPIR", "1")]
  for z, (_, pixels, mask) in enumerate(expected):
    np.testing.assert_array_equal(mr.image[::-1, ::-1, z].T, pixels)
    np.testing.assert_array_equal(mr.label[::-1, ::-1, z].T, mask)
  assert set(np.unique(cases["CT"][0].label)) == {0, 1}
  meta = json.loads((out / "dataset.json").read_text())
  assert meta["generator"]["cases"]["MR/1"]["source"] == "MR/1/T2SPIR/DICOM_anon"
  # all sequences: one MR site per sequence
  out_all = convert.convert("chaos", root, tmp_path / "all", sequences=chaos.SEQUENCES, modalities=("MR",),
                            progress=None)
  assert sorted(p.name for p in out_all.iterdir() if p.is_dir()) == ["MR_T1DUAL_InPhase", "MR_T1DUAL_OutPhase",
                                                                    "MR_T2SPIR"]
  # SIFA's abdominal setting: CHAOS MR + BTCV CT; and BTCV alone
  btcv = tmp_path / "btcv"
  write_btcv(btcv, np.random.default_rng(1))
  assert convert.detect_raw_format(btcv) == "btcv"
  out_sifa = convert.convert("chaos", root, tmp_path / "sifa", ct_from_btcv=btcv, progress=None)
  _, cases = load_dataset(out_sifa)
  assert [c.case_id for c in cases["CT"]] == ["btcv0001", "btcv0002"]
  out_btcv = convert.convert("btcv", btcv, tmp_path / "btcv_sites", progress=None)
  _, cases = load_dataset(out_btcv)
  from medgen_jax.data.nifti import load_nifti
  raw = load_nifti(btcv / "label" / "label0002.nii.gz").data.astype(int)
  np.testing.assert_array_equal(cases["CT"][1].label, chaos.btcv_to_labels("x", raw))


def test_check_cli_on_raw_chaos(tmp_path, capsys):
  base, _ = make_chaos(tmp_path, np.random.default_rng(2), patients=("5",), n=3)
  assert check.main([str(tmp_path)]) == 0
  assert "raw chaos release" in capsys.readouterr().out
  bad = sorted((base / "MR" / "5" / "T2SPIR" / "Ground").iterdir())[0]
  write_png(bad, np.full((ROWS, COLS), 100))
  (base / "CT" / "5" / "DICOM_anon" / "i0001,0000b.dcm").write_bytes(b"not a dicom")
  assert check.main([str(tmp_path)]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1] == "check failed: 2 problem(s)"
  assert any(str(bad) in line and "grey levels [100]" in line and "medgen_jax.data.convert" in line for line in err)
  assert any("i0001,0000b.dcm" in line and "not a readable DICOM" in line for line in err)
