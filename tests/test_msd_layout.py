"""The `msd` layout: Medical Segmentation Decathlon and nnU-Net v2 raw folders, sites from a CSV or a pattern."""

import json

import numpy as np
import pytest

from helpers import write_nii
from medgen_jax.data import check
from medgen_jax.data.errors import DataError
from medgen_jax.data.layouts import LAYOUTS, detect_layout, discover
from medgen_jax.data.loading import load_dataset
from medgen_jax.data.pipeline import default_data_config

SHAPE = (8, 6, 4)
PATTERN = "^(?P<site>[A-Z]+)_"
CASES = ("SITEA_001", "SITEA_002", "SITEB_001")


def volumes(k):
  """(channel 0, channel 1, label) of case k: channels told apart by their values."""
  label = np.zeros(SHAPE, np.uint8)
  label[1:4, 1:4, 1:3] = 1
  label[4:6, 1:4, 1:3] = 2
  t2 = (label * 100.0 + k).astype(np.float32)
  adc = (1000.0 + label * 10.0 + k).astype(np.float32)
  return t2, adc, label


def make_msd(root, cases=CASES, **json_overrides):
  """MSD style: imagesTr/<case>.nii.gz is 4-D (T2, ADC); labels map value -> name."""
  for k, case in enumerate(cases):
    t2, adc, label = volumes(k)
    write_nii(root / "imagesTr" / f"{case}.nii.gz", np.stack([t2, adc], axis=-1))
    write_nii(root / "labelsTr" / f"{case}.nii.gz", label)
  meta = {"name": "Prostate", "tensorImageSize": "4D", "modality": {"0": "T2", "1": "ADC"},
          "labels": {"0": "background", "1": "PZ", "2": "TZ"}, "numTraining": len(cases),
          "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases],
          "test": []}
  meta.update(json_overrides)
  (root / "dataset.json").write_text(json.dumps(meta))
  return root


def make_nnunet(root, cases=CASES, **json_overrides):
  """nnU-Net v2 style: one 3-D file per channel (_0000, _0001); labels map name -> value."""
  for k, case in enumerate(cases):
    t2, adc, label = volumes(k)
    write_nii(root / "imagesTr" / f"{case}_0000.nii.gz", t2)
    write_nii(root / "imagesTr" / f"{case}_0001.nii.gz", adc)
    write_nii(root / "labelsTr" / f"{case}.nii.gz", label)
  meta = {"channel_names": {"0": "T2", "1": "ADC"}, "labels": {"background": 0, "PZ": 1, "TZ": 2},
          "numTraining": len(cases), "file_ending": ".nii.gz"}
  meta.update(json_overrides)
  (root / "dataset.json").write_text(json.dumps(meta))
  return root


def problem_lines(excinfo):
  lines = str(excinfo.value).splitlines()
  assert lines and all("Fix:" in l for l in lines), lines
  return lines


def test_msd_is_a_layout_and_detected(tmp_path):
  assert "msd" in LAYOUTS
  assert detect_layout(make_msd(tmp_path / "msd")) == "msd"
  assert detect_layout(make_nnunet(tmp_path / "nnunet")) == "msd"


def test_msd_discovery_with_site_pattern(tmp_path):
  root = make_msd(tmp_path / "Task05")
  (root / "imagesTr" / "._SITEA_001.nii.gz").write_bytes(b"macOS resource fork")  # shipped in MSD tars
  info, by_site, problems = discover(root, channel=0, site_pattern=PATTERN)
  assert problems == []
  assert info.layout == "msd" and info.modality == "T2"
  assert info.labels == {0: "background", 1: "PZ", 2: "TZ"} and info.label_remap == {}
  assert list(by_site) == ["SITEA", "SITEB"]
  assert [c.case_id for c in by_site["SITEA"]] == ["SITEA_001", "SITEA_002"]
  case = by_site["SITEB"][0]
  assert case.site == "SITEB" and case.key == "SITEB/SITEB_001"
  assert case.image == root / "imagesTr" / "SITEB_001.nii.gz"
  assert case.label == root / "labelsTr" / "SITEB_001.nii.gz"


def test_msd_4d_channel_selection_and_labels(tmp_path):
  root = make_msd(tmp_path / "Task05")
  info, cases = load_dataset(root, channel=1, site_pattern=PATTERN)
  assert info.modality == "ADC"
  t2, adc, label = volumes(2)
  np.testing.assert_array_equal(cases["SITEB"][0].image, adc)
  np.testing.assert_array_equal(cases["SITEB"][0].label, label)
  _, cases0 = load_dataset(root, channel=0, site_pattern=PATTERN)
  np.testing.assert_array_equal(cases0["SITEB"][0].image, t2)


def test_nnunet_v2_channel_files_and_name_to_value_labels(tmp_path):
  root = make_nnunet(tmp_path / "Dataset042")
  info, cases = load_dataset(root, layout="msd", channel=1, site_pattern=PATTERN)
  assert info.labels == {0: "background", 1: "PZ", 2: "TZ"} and info.modality == "ADC"
  case = cases["SITEA"][1]
  assert case.image_path.endswith("SITEA_002_0001.nii.gz")
  _, adc, label = volumes(1)
  np.testing.assert_array_equal(case.image, adc)
  np.testing.assert_array_equal(case.label, label)
  # One channel: no channel needs choosing.
  single = make_nnunet(tmp_path / "single", channel_names={"0": "CT"})
  for f in (single / "imagesTr").glob("*_0001.nii.gz"):
    f.unlink()
  info, cases = load_dataset(single, site_pattern=PATTERN)
  assert info.modality == "CT" and cases["SITEA"][0].image_path.endswith("_0000.nii.gz")


def test_sites_from_csv(tmp_path):
  cases = ("prostate_00", "prostate_01", "prostate_02")
  root = make_nnunet(tmp_path / "ds", cases=cases)
  # Excel-style BOM, column order and case, an extra column, a blank line, a file name as case id.
  (root / "sites.csv").write_text("\ufeffSite,Case,scanner\nBIDMC,prostate_00,GE\n\nHK,prostate_01.nii.gz,"
                                  "Siemens\nBIDMC,prostate_02,GE\n", encoding="utf-8")
  info, cases_by_site = load_dataset(root, channel=0, site_csv="sites.csv")  # relative: found in ROOT
  assert {s: [c.case_id for c in cs] for s, cs in cases_by_site.items()} == {
      "BIDMC": ["prostate_00", "prostate_02"], "HK": ["prostate_01"]}
  _, subset = load_dataset(root, channel=0, site_csv=root / "sites.csv", sites=["HK"])
  assert list(subset) == ["HK"]


def test_check_cli_msd_summary_per_site(tmp_path, capsys):
  root = make_msd(tmp_path / "Task05")
  assert check.main([str(root), "--layout", "msd", "--channel", "0", "--site-pattern", PATTERN]) == 0
  out = capsys.readouterr().out
  assert "layout msd" in out and "| SITEA " in out and "| SITEB " in out and "PZ vox" in out
  assert out.strip().endswith("ok")
  (root / "sites.csv").write_text("case,site\nSITEA_001,X\nSITEA_002,Y\nSITEB_001,Y\n")
  assert check.main([str(root), "--channel", "0", "--site-csv", str(root / "sites.csv")]) == 0
  out = capsys.readouterr().out
  assert "| X " in out and "| Y " in out


def test_no_site_source_is_a_clear_error(tmp_path, capsys):
  root = make_msd(tmp_path / "Task05")
  with pytest.raises(DataError) as err:
    load_dataset(root, channel=0)
  (line,) = problem_lines(err)
  assert "data.msd.site_csv" in line and "data.msd.site_pattern" in line and "--site-csv" in line
  assert check.main([str(root), "--channel", "0"]) == 1
  assert "data.msd.site_csv" in capsys.readouterr().err
  with pytest.raises(DataError, match="both a site CSV and a site pattern"):
    load_dataset(root, channel=0, site_csv="x.csv", site_pattern=PATTERN)


def test_site_options_rejected_for_other_layouts(tmp_path):
  root = make_msd(tmp_path / "Task05")
  with pytest.raises(DataError, match="only used by the msd layout"):
    load_dataset(root, layout="sites", site_pattern=PATTERN)


def test_case_missing_from_csv_names_the_case(tmp_path, capsys):
  root = make_msd(tmp_path / "Task05")
  csv = tmp_path / "sites.csv"
  csv.write_text("case,site\nSITEA_001,A\nSITEB_001,B\n")
  with pytest.raises(DataError) as err:
    load_dataset(root, channel=0, site_csv=csv)
  (line,) = problem_lines(err)
  assert str(root / "imagesTr" / "SITEA_002.nii.gz") in line
  assert "'SITEA_002'" in line and "not listed" in line and "add a row 'SITEA_002,<site>'" in line
  assert check.main([str(root), "--channel", "0", "--site-csv", str(csv)]) == 1
  assert "SITEA_002" in capsys.readouterr().err


@pytest.mark.parametrize("text, words", [
    ("patient,hospital\nSITEA_001,A\n", "lacks the columns"),
    ("case,site\nSITEA_001,A\nSITEA_001,B\n", "two sites"),
    ("case,site\nSITEA_001,\n", "empty case or site"),
])
def test_bad_site_csv(tmp_path, text, words):
  root = make_msd(tmp_path / "Task05")
  (tmp_path / "s.csv").write_text(text)
  with pytest.raises(DataError, match=words) as err:
    load_dataset(root, channel=0, site_csv=tmp_path / "s.csv")
  assert all(str(tmp_path / "s.csv") in l for l in problem_lines(err))
  with pytest.raises(DataError, match="site CSV .*does not exist"):
    load_dataset(root, channel=0, site_csv=tmp_path / "nowhere.csv")


def test_site_pattern_errors(tmp_path):
  root = make_msd(tmp_path / "Task05", cases=("SITEA_001", "site_b_002"))
  with pytest.raises(DataError) as err:
    load_dataset(root, channel=0, site_pattern=PATTERN)
  (line,) = problem_lines(err)
  assert str(root / "imagesTr" / "site_b_002.nii.gz") in line and "does not match" in line
  with pytest.raises(DataError, match=r"site_pattern=.*no named group 'site'"):
    load_dataset(root, channel=0, site_pattern="^([A-Z]+)_")
  with pytest.raises(DataError, match=r"site_pattern=.*not a valid regular expression"):
    load_dataset(root, channel=0, site_pattern="^(?P<site>[A-Z+_")


def test_missing_label_or_image_file(tmp_path, capsys):
  root = make_nnunet(tmp_path / "ds")
  (root / "labelsTr" / "SITEA_002.nii.gz").unlink()
  (root / "imagesTr" / "SITEB_001_0000.nii.gz").unlink()
  (root / "imagesTr" / "SITEB_001_0001.nii.gz").unlink()
  (root / "dataset.json").write_text(json.dumps({**json.loads((root / "dataset.json").read_text()),
                                                 "numTraining": 2}))
  with pytest.raises(DataError) as err:
    load_dataset(root, channel=0, site_pattern=PATTERN)
  lines = problem_lines(err)
  assert len(lines) == 2
  assert any(str(root / "imagesTr" / "SITEA_002_0000.nii.gz") in l and "no label file" in l
             and "labelsTr/SITEA_002.nii.gz" in l for l in lines)
  assert any(str(root / "labelsTr" / "SITEB_001.nii.gz") in l and "no image" in l for l in lines)
  assert check.main([str(root), "--channel", "0", "--site-pattern", PATTERN]) == 1
  assert "no label file" in capsys.readouterr().err


def test_missing_channel_file_and_num_training(tmp_path):
  root = make_nnunet(tmp_path / "ds")
  (root / "imagesTr" / "SITEA_001_0001.nii.gz").unlink()
  (root / "labelsTr" / "SITEB_001.nii.gz").rename(tmp_path / "moved.nii.gz")
  (root / "imagesTr" / "SITEB_001_0000.nii.gz").unlink()
  (root / "imagesTr" / "SITEB_001_0001.nii.gz").unlink()
  with pytest.raises(DataError) as err:
    load_dataset(root, channel=1, site_pattern=PATTERN)
  lines = problem_lines(err)
  assert any(str(root / "imagesTr" / "SITEA_001_0001.nii.gz") in l and "does not exist" in l for l in lines)
  assert any("dataset.json" in l and '"numTraining" is 3 but labelsTr holds 2' in l for l in lines)


def test_multi_channel_needs_a_channel(tmp_path):
  for make in (make_msd, make_nnunet):
    root = make(tmp_path / make.__name__)
    with pytest.raises(DataError) as err:
      load_dataset(root, site_pattern=PATTERN)
    (line,) = problem_lines(err)
    assert str(root / "dataset.json") in line and "2 channels" in line and "data.channel" in line
    with pytest.raises(DataError, match="channel 2 does not exist"):
      load_dataset(root, channel=2, site_pattern=PATTERN)


@pytest.mark.parametrize("labels, words", [
    ({"background": 0, "whole tumour": [1, 2], "core": [2]}, "region-based"),
    ({"background": 0, "tumour": 1, "ignore": 2}, '"ignore" label'),
    ({"background": 0, "tumour": -1}, '"tumour": -1 is invalid'),
    ({"background": 0, "tumour": 1.5}, '"tumour": 1.5 is invalid'),
    ({"background": 0, "tumour": 2}, "must be 0..C-1"),
    ({"background": 0, "a": 1, "b": 1}, "share the value 1"),
    ({"0": "background", "tumour": 1}, "mixes the two formats"),
    ({"0": "background", "-1": "tumour"}, "mixes the two formats"),
    ({"0": "background", "2": "tumour"}, "must be 0..C-1"),
    ({}, "missing or empty"),
])
def test_invalid_label_mapping(tmp_path, labels, words):
  root = make_nnunet(tmp_path / "ds", labels=labels)
  with pytest.raises(DataError) as err:
    load_dataset(root, channel=0, site_pattern=PATTERN)
  (line,) = problem_lines(err)
  assert str(root / "dataset.json") in line and words in line


def test_label_remap_and_file_ending(tmp_path):
  root = make_nnunet(tmp_path / "ds", labels={"background": 0, "prostate": 1}, label_remap={"2": 1})
  info, cases = load_dataset(root, channel=0, site_pattern=PATTERN)
  assert info.labels == {0: "background", 1: "prostate"} and info.label_remap == {2: 1}
  assert set(np.unique(cases["SITEA"][0].label)) == {0, 1}
  make_nnunet(root, file_ending=".png")
  with pytest.raises(DataError, match='"file_ending" ".png" is not supported'):
    load_dataset(root, channel=0, site_pattern=PATTERN)


def test_config_has_msd_site_keys():
  c = default_data_config()
  assert c.msd.site_csv == "" and c.msd.site_pattern == ""


def test_msd_case_ids_that_look_like_channel_files(tmp_path):
  """MSD images are named exactly like their labels, even when the id ends in 4 digits."""
  root = make_msd(tmp_path / "Task", cases=("SITEA_0001",))
  _, by_site, problems = discover(root, channel=0, site_pattern=PATTERN)
  assert problems == []
  (case,) = by_site["SITEA"]
  assert case.case_id == "SITEA_0001" and case.image == root / "imagesTr" / "SITEA_0001.nii.gz"
