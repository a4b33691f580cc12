"""Every validation problem: the checker and the loader both report it, naming the file."""

import gzip
import json
import warnings

import numpy as np
import pytest

from helpers import AFFINE, make_sites_dataset, write_nii
from medgen_jax.data import check
from medgen_jax.data.errors import DataError, DataWarning
from medgen_jax.data.loading import load_dataset


@pytest.fixture
def dataset(tmp_path):
  return make_sites_dataset(tmp_path / "ds", sites=("A", "B"), cases=2)


def assert_reported(root, culprit, words, *, sites=None, capsys=None):
  """The loader raises DataError naming `culprit`; the CLI exits 1 with a line naming it."""
  with pytest.raises(DataError) as err:
    load_dataset(root, sites=sites)
  lines = str(err.value).splitlines()
  matching = [l for l in lines if str(culprit) in l]
  assert matching, f"no line names {culprit}: {lines}"
  assert any(all(w in l for w in words) for l in matching), lines
  assert all("Fix:" in l for l in lines)
  argv = [str(root)] + (["--sites", ",".join(sites)] if sites else [])
  assert check.main(argv) == 1
  if capsys is not None:
    err_text = capsys.readouterr().err
    assert any(str(culprit) in l and all(w in l for w in words) for l in err_text.splitlines())


def test_clean_dataset_passes_check(dataset, capsys):
  assert check.main([str(dataset)]) == 0
  out = capsys.readouterr().out
  assert "| A " in out and "| B " in out and out.strip().endswith("ok")


def test_unreadable_file(dataset, capsys):
  bad = dataset / "A" / "case0_image.nii.gz"
  bad.write_bytes(gzip.compress(b"this is not a nifti header" * 20))
  assert_reported(dataset, bad, ["not a readable NIfTI"], capsys=capsys)


def test_non_nifti_file(dataset, capsys):
  bad = dataset / "B" / "case1_label.nii"
  (dataset / "B" / "case1_label.nii.gz").unlink()
  bad.write_text("label,value\n1,2\n")
  assert_reported(dataset, bad, ["NIfTI"], capsys=capsys)


def test_truncated_file(dataset, capsys):
  bad = dataset / "A" / "case1_image.nii.gz"
  raw = gzip.decompress(bad.read_bytes())
  bad.write_bytes(gzip.compress(raw[: len(raw) // 2]))
  assert_reported(dataset, bad, ["truncated"], capsys=capsys)


def test_shape_mismatch(dataset, capsys):
  bad = dataset / "A" / "case0_label.nii.gz"
  write_nii(bad, np.zeros((12, 10, 5), np.uint8))
  assert_reported(dataset, bad, ["shape"], capsys=capsys)


def test_affine_mismatch(dataset, capsys):
  bad = dataset / "B" / "case0_label.nii.gz"
  shifted = AFFINE.copy()
  shifted[0, 3] = 4.0
  write_nii(bad, np.zeros((12, 10, 6), np.uint8), shifted)
  assert_reported(dataset, bad, ["affine"], capsys=capsys)


def test_label_values_outside_label_set(dataset, capsys):
  bad = dataset / "A" / "case1_label.nii.gz"
  label = np.zeros((12, 10, 6), np.uint8)
  label[0, 0, 0] = 7
  write_nii(bad, label)
  assert_reported(dataset, bad, ["[7]", "outside the label set"], capsys=capsys)


def test_non_integer_labels(dataset, capsys):
  bad = dataset / "A" / "case1_label.nii.gz"
  label = np.zeros((12, 10, 6), np.float32)
  label[1, 1, 1] = 0.5
  write_nii(bad, label)
  assert_reported(dataset, bad, ["non-integer"], capsys=capsys)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_or_inf_in_image(dataset, capsys, value):
  bad = dataset / "B" / "case1_image.nii.gz"
  image = np.ones((12, 10, 6), np.float32)
  image[3, 3, 3] = value
  write_nii(bad, image)
  assert_reported(dataset, bad, ["NaN or Inf"], capsys=capsys)


def test_4d_image_is_an_error_unless_a_channel_is_selected(dataset, capsys):
  bad = dataset / "A" / "case0_image.nii.gz"
  image4d = np.stack([np.full((12, 10, 6), 1.0), np.full((12, 10, 6), 2.0)], axis=-1).astype(np.float32)
  write_nii(bad, image4d)
  assert_reported(dataset, bad, ["4-D", "channel"], capsys=capsys)
  _, cases = load_dataset(dataset, channel=1)
  np.testing.assert_array_equal(cases["A"][0].image, 2.0)


def test_empty_site_folder(dataset, capsys):
  (dataset / "EMPTY").mkdir()
  assert_reported(dataset, dataset / "EMPTY", ["no cases"], capsys=capsys)


def test_case_without_label(dataset, capsys):
  (dataset / "B" / "case0_label.nii.gz").unlink()
  assert_reported(dataset, dataset / "B" / "case0_image.nii.gz", ["no label"], capsys=capsys)


def test_label_without_image(dataset, capsys):
  (dataset / "B" / "case0_image.nii.gz").unlink()
  assert_reported(dataset, dataset / "B" / "case0_label.nii.gz", ["no image"], capsys=capsys)


def test_site_named_in_config_missing(dataset, capsys):
  assert_reported(dataset, dataset / "Z", ["'Z'", "does not exist"], sites=["A", "Z"], capsys=capsys)


def test_missing_root_names_the_synthesize_fix(tmp_path):
  with pytest.raises(DataError, match="does not exist.*synthesize"):
    load_dataset(tmp_path / "nowhere")


def test_bad_dataset_json(dataset):
  (dataset / "dataset.json").write_text("{not json")
  with pytest.raises(DataError, match="dataset.json: is not valid JSON"):
    load_dataset(dataset)
  (dataset / "dataset.json").write_text(json.dumps({"labels": {"0": "bg"}, "lables": {}}))
  with pytest.raises(DataError, match="unknown key"):
    load_dataset(dataset)


def test_every_problem_is_listed_at_once(dataset):
  (dataset / "A" / "case0_label.nii.gz").unlink()
  image = np.ones((12, 10, 6), np.float32)
  image[0, 0, 0] = np.nan
  write_nii(dataset / "B" / "case1_image.nii.gz", image)
  with pytest.raises(DataError) as err:
    load_dataset(dataset)
  assert len(err.value.problems) == 2


def test_skip_bad_cases_warns_with_each_file(dataset):
  bad1 = dataset / "A" / "case0_image.nii.gz"
  bad1.write_bytes(b"garbage")
  bad2 = dataset / "B" / "case1_label.nii.gz"
  write_nii(bad2, np.full((12, 10, 6), 9, np.uint8))
  with pytest.warns(DataWarning) as record:
    _, cases = load_dataset(dataset, skip_bad_cases=True)
  message = str(record[0].message)
  assert str(bad1) in message and str(bad2) in message
  assert [c.case_id for c in cases["A"]] == ["case1"]
  assert [c.case_id for c in cases["B"]] == ["case0"]


def test_skip_bad_cases_still_fails_on_missing_site_or_site_without_cases(dataset):
  with pytest.raises(DataError, match="does not exist"):
    load_dataset(dataset, sites=["A", "Q"], skip_bad_cases=True)
  for j in range(2):
    (dataset / "B" / f"case{j}_image.nii.gz").write_bytes(b"x")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DataWarning)
    with pytest.raises(DataError, match="no usable case"):
      load_dataset(dataset, skip_bad_cases=True)


@pytest.mark.parametrize("remap, words", [
    ({"-1": 0}, ['entry "-1": 0', "invalid key"]),        # would overwrite the LUT's last entry
    ({"1.5": 1}, ['entry "1.5": 1', "invalid key"]),
    ({"x": 1}, ['entry "x": 1', "invalid key"]),
    ({"3": 1.5}, ['entry "3": 1.5', "invalid value"]),     # int() would truncate it to 1
    ({"3": -1}, ['entry "3": -1', "invalid value"]),
    ({"3": "one"}, ['entry "3": "one"', "invalid value"]),
    ({"3": True}, ['entry "3": true', "invalid value"]),
    ({"70000": 1}, ['entry "70000": 1', "above 65535"]),
])
def test_label_remap_entries_must_be_non_negative_integers(dataset, capsys, remap, words):
  path = dataset / "dataset.json"
  meta = json.loads(path.read_text())
  path.write_text(json.dumps({**meta, "label_remap": remap}))
  with pytest.raises(DataError) as err:
    load_dataset(dataset)
  (line,) = str(err.value).splitlines()
  assert line.startswith(f"{path}: ") and '"label_remap"' in line and "Fix:" in line
  assert all(w in line for w in words), line
  assert check.main([str(dataset)]) == 1
  assert str(path) in capsys.readouterr().err


def test_label_remap_accepts_digit_strings(dataset):
  path = dataset / "dataset.json"
  path.write_text(json.dumps({"labels": {"0": "background", "1": "a", "2": "b"}, "label_remap": {"3": "2"}}))
  info, _ = load_dataset(dataset)
  assert info.label_remap == {3: 2}


@pytest.mark.parametrize("labels", [{"0": "background", "-1": "x"}, {"0": "background", "1.0": "x"},
                                    {"0": "background", "1": 7}])
def test_labels_entries_must_be_non_negative_integer_keys_and_names(dataset, labels):
  (dataset / "dataset.json").write_text(json.dumps({"labels": labels}))
  with pytest.raises(DataError, match=r'dataset.json: "labels" entry .* is invalid.*Fix:'):
    load_dataset(dataset)


def stored_gzip_nifti(path, data):
  """A .nii.gz with stored (uncompressed) deflate blocks: payload bytes appear verbatim, so a
  flipped byte still decompresses and only the CRC-32 in the gzip trailer can tell."""
  import nibabel as nib
  path.write_bytes(gzip.compress(nib.Nifti1Image(data, AFFINE).to_bytes(), compresslevel=0, mtime=0))
  return path


def flip(path, offset, bit=0x10):
  raw = bytearray(path.read_bytes())
  raw[offset] ^= bit
  path.write_bytes(bytes(raw))


@pytest.mark.parametrize("where, offset", [("payload", -9), ("crc trailer", -8), ("isize trailer", -3)])
def test_bit_flipped_gzip_is_detected(tmp_path, where, offset):
  import nibabel as nib
  from medgen_jax.data.nifti import load_nifti
  data = np.arange(12 * 10 * 6, dtype=np.float32).reshape(12, 10, 6)
  path = stored_gzip_nifti(tmp_path / "x.nii.gz", data)
  np.testing.assert_array_equal(load_nifti(path).data, data)
  flip(path, offset)
  # nibabel alone loads it without complaint: it never reads the gzip trailer.
  old = np.asanyarray(nib.load(str(path)).dataobj)
  assert old.shape == data.shape
  if where == "payload":
    assert (old != data).sum() == 1  # one voxel silently wrong
  with pytest.raises(DataError) as err:
    load_nifti(path)
  (line,) = str(err.value).splitlines()
  assert line.startswith(f"{path}: corrupt compressed data: gzip integrity check failed") and "Fix: re-copy" in line


def test_bit_flipped_case_is_reported_by_loader_and_checker(dataset, capsys):
  bad = dataset / "B" / "case0_image.nii.gz"
  import nibabel as nib
  stored_gzip_nifti(bad, np.asanyarray(nib.load(str(bad)).dataobj))
  assert check.main([str(dataset)]) == 0
  capsys.readouterr()
  flip(bad, -20)
  assert_reported(dataset, bad, ["gzip integrity check failed"], capsys=capsys)


def test_truncated_or_non_gzip_stream(dataset, capsys):
  bad = dataset / "A" / "case1_label.nii.gz"
  raw = bad.read_bytes()
  bad.write_bytes(raw[: len(raw) // 2])  # the copy stopped half-way
  assert_reported(dataset, bad, ["truncated or corrupt compressed data"], capsys=capsys)
  bad.write_bytes(gzip.decompress(raw))  # plain .nii content under a .gz name
  assert_reported(dataset, bad, ["not gzip-compressed"], capsys=capsys)
