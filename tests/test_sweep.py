"""The leave-one-domain-out sweep CLI: runs, table, resume without redoing finished runs."""

import numpy as np

from helpers import make_sites_dataset
from medgen_jax import sweep

TINY = """
from medgen_jax.config import base_config
def get_config(arg=None):
  c = base_config()
  c.data.root = {root!r}
  c.data.in_plane_shape = (16, 16)
  c.model.base_features = 4
  c.model.depth = 2
  c.batch_size = 4
  c.num_steps = 2
  c.eval_every = 2
  c.checkpoint.every = 2
  c.eval.distances = False
  c.augment.enabled = arg == "bigaug"
  return c
"""


def test_sweep_runs_every_fold_and_resumes(tmp_path, capsys, monkeypatch):
  root = make_sites_dataset(tmp_path / "toy", sites=("A", "B", "C"), cases=3)
  config_file = tmp_path / "tiny.py"
  config_file.write_text(TINY.format(root=str(root)))
  argv = ["--config", str(config_file), "--config", f"{config_file}:bigaug", "--held-out", "A,B",
          "--seeds", "1", "--workdir", str(tmp_path / "sweep")]
  assert sweep.main(argv) == 0
  table = (tmp_path / "sweep" / "sweep.md").read_text()
  assert "| Method | A (held out) | B (held out) | Average |" in table
  assert "| DeepAll |" in table and "| DeepAll + BigAug |" in table
  assert "model selection: best mean Dice on the source sites' validation cases" in table
  csv_rows = (tmp_path / "sweep" / "sweep.csv").read_text().splitlines()
  assert len(csv_rows) == 1 + 2 * 2 * 1
  assert (tmp_path / "sweep" / "tiny" / "A" / "seed0" / "results.json").is_file()
  # The average column is the mean over held-out sites of each seed's Dice.
  dice = {(r.split(",")[1], r.split(",")[2]): float(r.split(",")[4]) for r in csv_rows[1:]}
  average = np.mean([dice[("DeepAll", "A")], dice[("DeepAll", "B")]])
  assert "| DeepAll | " in table and f"{average:.2f} ± 0.00 |" in table

  def no_training(*args, **kwargs):
    raise AssertionError("a finished run was trained again")

  from medgen_jax import train_lib
  monkeypatch.setattr(train_lib, "train_and_evaluate", no_training)
  assert sweep.main(argv) == 0
  assert (tmp_path / "sweep" / "sweep.md").read_text() == table


def test_sweep_rejects_unknown_site_and_override(tmp_path, capsys):
  root = make_sites_dataset(tmp_path / "toy", sites=("A", "B"), cases=3)
  config_file = tmp_path / "tiny.py"
  config_file.write_text(TINY.format(root=str(root)))
  assert sweep.main(["--config", str(config_file), "--held-out", "Q", "--workdir", str(tmp_path / "s")]) == 1
  assert "site(s) ['Q'] do not exist" in capsys.readouterr().err
  assert sweep.main(["--config", str(config_file), "--set", "num_stepz=3", "--workdir", str(tmp_path / "s")]) == 1
  assert "unknown config key 'num_stepz'" in capsys.readouterr().err
