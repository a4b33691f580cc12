"""The data CLIs end to end on tiny data: preview writes a PNG, synthesize refuses to overwrite."""

from helpers import make_sites_dataset
from medgen_jax.data import preview, synthesize


def test_preview_writes_a_png_with_one_column_per_site(tmp_path, capsys):
  root = make_sites_dataset(tmp_path / "ds", sites=("A", "B", "C"), cases=1, shape=(20, 16, 6))
  out = tmp_path / "p.png"
  assert preview.main([str(root), "--out", str(out)]) == 0
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  import matplotlib.image
  height, width = matplotlib.image.imread(str(out)).shape[:2]
  assert width > height * 0.6  # three panels side by side


def test_preview_reports_bad_data_and_fails(tmp_path, capsys):
  root = make_sites_dataset(tmp_path / "ds", sites=("A",), cases=1)
  (root / "A" / "case0_label.nii.gz").unlink()
  assert preview.main([str(root), "--out", str(tmp_path / "p.png")]) == 1
  assert "case0_image.nii.gz: case has no label file" in capsys.readouterr().err
  assert not (tmp_path / "p.png").exists()


def test_synthesize_cli_rejects_bad_arguments_without_writing(tmp_path, capsys):
  assert synthesize.main(["--out", str(tmp_path / "x"), "--sites", "9"]) == 2
  assert "--sites=9" in capsys.readouterr().err
  assert not (tmp_path / "x").exists()


def test_preview_unwritable_output_is_one_line(tmp_path, capsys):
  root = make_sites_dataset(tmp_path / "ds", sites=("A",), cases=1)
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  assert preview.main([str(root), "--out", str(blocker / "p.png")]) == 1
  err = capsys.readouterr().err
  assert "cannot write the preview" in err and "Traceback" not in err


def test_synthesize_unwritable_output_is_one_line(tmp_path, capsys):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  assert synthesize.main(["--out", str(blocker / "x"), "--cases-per-site", "1", "--sites", "1"]) == 1
  assert "cannot write the dataset" in capsys.readouterr().err
