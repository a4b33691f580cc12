"""The leave-one-domain-out sweep CLI: runs, table, resume without redoing finished runs, refusal of
runs made with other settings, data.sites, failed runs, bad --set values."""

import json

import numpy as np
import pytest

from helpers import make_sites_dataset
from medgen_jax import sweep, train_lib
from medgen_jax.data.errors import DataError, Problem
from medgen_jax.data.pipeline import prepare_data

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

  monkeypatch.setattr(train_lib, "train_and_evaluate", no_training)
  assert sweep.main(argv) == 0
  assert (tmp_path / "sweep" / "sweep.md").read_text() == table
  # Keys in runs.RESUMABLE_KEYS do not change what was computed: still reused.
  assert sweep.main(argv + ["--set", "log_every=7", "--set", "eval.batch_size=3"]) == 0
  capsys.readouterr()

  # Changed settings: refused before any training, one line per run naming the run dir and the
  # differing keys; nothing written is touched.
  run_dir = tmp_path / "sweep" / "tiny" / "A" / "seed0"
  saved = (run_dir / "config.json").read_bytes(), (run_dir / "results.json").read_bytes()
  assert sweep.main(argv + ["--set", "num_steps=3"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 4 + 1  # 4 runs + the summary line
  assert err[0] == (f"error: {run_dir}: holds a run with a different config (num_steps differ from the "
                    f"sweep's settings now). Fix: use a new --workdir, or delete {run_dir} to redo it "
                    "with these settings")
  assert ((run_dir / "config.json").read_bytes(), (run_dir / "results.json").read_bytes()) == saved
  assert (tmp_path / "sweep" / "sweep.md").read_text() == table
  config_file.write_text(TINY.format(root=str(root)).replace("base_features = 4", "base_features = 8"))
  assert sweep.main(argv) == 1
  assert "(model.base_features differ" in capsys.readouterr().err
  config_file.write_text(TINY.format(root=str(root)))
  # A finished run's results were selected by its own rule: not reported under another.
  assert sweep.main(argv + ["--set", "eval.selection='last'"]) == 1
  assert (f"error: {run_dir}: finished with eval.selection='val', the sweep now asks for 'last'"
          in capsys.readouterr().err)
  assert (tmp_path / "sweep" / "sweep.md").read_text() == table


def test_sweep_rejects_unknown_site_and_override(tmp_path, capsys):
  root = make_sites_dataset(tmp_path / "toy", sites=("A", "B"), cases=3)
  config_file = tmp_path / "tiny.py"
  config_file.write_text(TINY.format(root=str(root)))
  assert sweep.main(["--config", str(config_file), "--held-out", "Q", "--workdir", str(tmp_path / "s")]) == 1
  assert "site(s) ['Q'] do not exist" in capsys.readouterr().err
  assert sweep.main(["--config", str(config_file), "--set", "num_stepz=3",
                     "--workdir", str(tmp_path / "s")]) == 2
  assert "unknown config key 'num_stepz'" in capsys.readouterr().err


def fake_records(site, dice, sources):
  """What train_and_evaluate returns: the held-out site's volumes (unseen) and a source's own."""
  return {"records": [
      {"method": "DeepAll", "site": site, "case": "c0", "role": "unseen", "dice": [dice, dice]},
      {"method": "DeepAll", "site": site, "case": "c1", "role": "unseen", "dice": [dice - 0.1, dice + 0.1]},
      {"method": "DeepAll", "site": sources[0], "case": "c0", "role": "in-domain", "dice": [0.0, 0.0]}]}


@pytest.fixture
def tiny_setup(tmp_path):
  root = make_sites_dataset(tmp_path / "toy", sites=("A", "B", "C"), cases=3)
  config_file = tmp_path / "tiny.py"
  config_file.write_text(TINY.format(root=str(root)))
  return root, config_file


def test_sweep_honours_data_sites(tmp_path, tiny_setup, monkeypatch, capsys):
  root, config_file = tiny_setup
  seen = []

  def fake_train(config, workdir):
    seen.append((tuple(config.data.sites), tuple(config.data.held_out), config.seed, workdir))
    return fake_records(config.data.held_out[0], 0.5, ["x"])

  monkeypatch.setattr(train_lib, "train_and_evaluate", fake_train)
  workdir = tmp_path / "s"
  base = ["--config", str(config_file), "--seeds", "1", "--workdir", str(workdir), "--set", "data.sites=A,B"]
  assert sweep.main(base + ["--held-out", "all"]) == 0
  # 'all' = the config's sites, not the dataset's three.
  assert seen == [(("A", "B"), ("A",), 0, workdir / "tiny" / "A" / "seed0"),
                  (("A", "B"), ("B",), 0, workdir / "tiny" / "B" / "seed0")]
  assert "| Method | A (held out) | B (held out) | Average |" in (workdir / "sweep.md").read_text()
  # With those settings the trainer's data pipeline trains on the other config site only.
  config = sweep.load_config(str(config_file), ["data.sites=A,B", "data.held_out=('A',)"])
  data = prepare_data(config.data)
  assert (data.sources, data.held_out, sorted(data.cases["test"])) == (["B"], ["A"], ["A", "B"])
  # A held-out site outside data.sites is refused before any training.
  seen.clear()
  assert sweep.main(base + ["--held-out", "C"]) == 1
  err = capsys.readouterr().err
  assert ("error: --held-out C: site(s) ['C'] do not exist in data.sites=['A', 'B']. "
          "Fix: choose from ['A', 'B']") in err
  assert seen == []
  # Without data.sites, 'all' is every site of the dataset.
  assert sweep.main(["--config", str(config_file), "--seeds", "1", "--workdir", str(tmp_path / "t")]) == 0
  assert [s[1] for s in seen] == [("A",), ("B",), ("C",)] and all(s[0] == () for s in seen)


def test_failed_runs_are_reported_and_the_sweep_goes_on(tmp_path, tiny_setup, monkeypatch, capsys):
  _, config_file = tiny_setup
  # Held-out site -> seed -> Dice of its volumes, or the error its training raises.
  outcome = {"A": {0: 0.5, 1: 0.7, 2: OSError(28, "No space left on device")},
             "B": {0: DataError([Problem("B/case1_image.nii.gz", "bad", "fix it"),
                                 Problem("B/case2_image.nii.gz", "worse", "fix that")]), 1: 0.9, 2: 0.8},
             "C": {0: 0.3, 1: 0.6, 2: train_lib.TrainingDivergedError("non-finite loss")}}
  calls = []

  def fake_train(config, workdir):
    site, seed = config.data.held_out[0], config.seed
    calls.append((site, seed))
    result = outcome[site][seed]
    if isinstance(result, Exception):
      raise result
    return fake_records(site, result, ["A" if site != "A" else "B"])

  monkeypatch.setattr(train_lib, "train_and_evaluate", fake_train)
  workdir = tmp_path / "s"
  assert sweep.main(["--config", str(config_file), "--seeds", "3", "--workdir", str(workdir)]) == 1
  assert len(calls) == 9  # every run was tried
  err = capsys.readouterr().err.strip().splitlines()
  failed = [line for line in err if line.startswith("error: run ")]
  assert failed == [
      f"error: run {workdir / 'tiny/A/seed2'} failed: [Errno 28] No space left on device",
      f"error: run {workdir / 'tiny/B/seed0'} failed: B/case1_image.nii.gz: bad. Fix: fix it | "
      "B/case2_image.nii.gz: worse. Fix: fix that",
      f"error: run {workdir / 'tiny/C/seed2'} failed: non-finite loss"]
  assert err[-1].startswith("error: 3 of 9 run(s) failed")
  markdown = (workdir / "sweep.md").read_text()
  # Held-out Dice per run = mean over its unseen volumes = the given value (in-domain ignored).
  # A: seeds 0, 1 -> 50, 70: 60 ± 10 (n=2). B: seeds 1, 2 -> 90, 80: 85 ± 5. C: seeds 0, 1 -> 30, 60:
  # 45 ± 15. Average over the seeds finished on A, B and C: seed 1 only, (70 + 90 + 60) / 3 = 73.33.
  assert "| Method | A (held out) | B (held out) | C (held out) | Average |" in markdown
  assert ("| DeepAll | 60.00 ± 10.00 (n=2) | 85.00 ± 5.00 (n=2) | 45.00 ± 15.00 (n=2) | "
          "73.33 ± 0.00 (n=1) |") in markdown
  assert "FAILED, not in the table (3): tiny/A/seed2 ([Errno 28] No space left on device); " in markdown
  rows = (workdir / "sweep.csv").read_text().splitlines()
  assert rows[1:] == ["tiny,DeepAll,A,0,50.0000", "tiny,DeepAll,A,1,70.0000", "tiny,DeepAll,B,1,90.0000",
                      "tiny,DeepAll,B,2,80.0000", "tiny,DeepAll,C,0,30.0000", "tiny,DeepAll,C,1,60.0000"]


def test_average_needs_every_held_out_site():
  rows = {"M": {"A": {0: 50.0, 1: 70.0}}, "N": {"A": {0: 10.0}, "B": {0: 30.0}}}
  table = sweep.sweep_table(rows, ["A", "B"], 2, {"M": ["A", "B"], "N": ["A", "B"]})
  assert "| M | 60.00 ± 10.00 | — | — |" in table  # no average over A alone
  assert "| N | 10.00 ± 0.00 (n=1) | 30.00 ± 0.00 (n=1) | 20.00 ± 0.00 (n=1) |" in table


def test_same_method_from_two_configs_gets_two_rows(tmp_path, tiny_setup, monkeypatch):
  _, config_file = tiny_setup
  other = tmp_path / "other.py"
  other.write_text(config_file.read_text())
  monkeypatch.setattr(train_lib, "train_and_evaluate", lambda config, workdir: fake_records(
      config.data.held_out[0], 0.5 if "other" in str(workdir) else 0.25, ["x"]))
  workdir = tmp_path / "s"
  assert sweep.main(["--config", str(config_file), "--config", str(other), "--held-out", "A",
                     "--seeds", "1", "--workdir", str(workdir)]) == 0
  markdown = (workdir / "sweep.md").read_text()
  assert "| DeepAll (tiny) | 25.00 ± 0.00 | 25.00 ± 0.00 |" in markdown
  assert "| DeepAll (other) | 50.00 ± 0.00 | 50.00 ± 0.00 |" in markdown


def test_interrupted_run_with_other_config_is_refused(tmp_path, tiny_setup, monkeypatch, capsys):
  _, config_file = tiny_setup
  monkeypatch.setattr(train_lib, "train_and_evaluate", lambda *a: pytest.fail("trained"))
  run_dir = tmp_path / "s" / "tiny" / "B" / "seed0"
  run_dir.mkdir(parents=True)
  old = sweep.load_config(str(config_file), ["batch_size=8", "data.held_out=B,", "progress_bar=False"])
  (run_dir / "config.json").write_text(json.dumps(json.loads(old.to_json())))
  before = (run_dir / "config.json").read_bytes()
  assert sweep.main(["--config", str(config_file), "--held-out", "A,B", "--seeds", "1",
                     "--workdir", str(tmp_path / "s")]) == 1
  err = capsys.readouterr().err
  assert f"error: {run_dir}: holds a run with a different config (batch_size differ " in err
  assert (run_dir / "config.json").read_bytes() == before
  assert not (tmp_path / "s" / "sweep.md").exists()


def test_finished_runs_are_reused_only_with_the_same_settings(tmp_path, tiny_setup, monkeypatch, capsys):
  _, config_file = tiny_setup
  monkeypatch.setattr(train_lib, "train_and_evaluate", lambda *a: pytest.fail("trained"))
  workdir = tmp_path / "s"
  for site, dice in (("A", 0.4), ("B", 0.6)):
    # A finished run as the trainer leaves it: the sweep's config for that run, and its results.
    config = sweep.load_config(str(config_file), [f"data.held_out={site},", "progress_bar=False"])
    run_dir = workdir / "tiny" / site / "seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(json.loads(config.to_json())))
    (run_dir / "results.json").write_text(json.dumps({"selection": "val", **fake_records(site, dice, ["C"])}))
  argv = ["--config", str(config_file), "--held-out", "A,B", "--seeds", "1", "--workdir", str(workdir)]
  assert sweep.main(argv + ["--set", "log_every=9"]) == 0  # a RESUMABLE_KEYS key may differ
  table = (workdir / "sweep.md").read_text()
  assert "| DeepAll | 40.00 ± 0.00 | 60.00 ± 0.00 | 50.00 ± 0.00 |" in table
  for override, key in (("num_steps=3", "num_steps"), ("data.in_plane_shape=8,8", "data.in_plane_shape"),
                        ("data.sites=A,B", "data.sites")):
    assert sweep.main(argv + ["--set", override]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[:2] == [f"error: {workdir / 'tiny' / s / 'seed0'}: holds a run with a different config ({key} "
                       "differ from the sweep's settings now). Fix: use a new --workdir, or delete "
                       f"{workdir / 'tiny' / s / 'seed0'} to redo it with these settings" for s in "AB"]
  assert sweep.main(argv + ["--set", "eval.selection=last"]) == 1
  assert (f"error: {workdir / 'tiny/A/seed0'}: finished with eval.selection='val', the sweep now asks "
          "for 'last'. "
          f"Fix: python -m medgen_jax.evaluate --workdir {workdir / 'tiny/A/seed0'} --selection last"
          in capsys.readouterr().err)
  (workdir / "tiny" / "B" / "seed0" / "config.json").unlink()
  assert sweep.main(argv) == 1
  err = capsys.readouterr().err
  assert "B/seed0: has results.json but no config.json, so its settings cannot be checked." in err
  assert (workdir / "sweep.md").read_text() == table


@pytest.mark.parametrize("item, message", [
    ("num_steps=abc", "error: --set num_steps=abc: 'abc' is a str, but num_steps takes a value of type int. "
                      "Fix: e.g. --set num_steps=2"),
    ("num_steps=1.5", "error: --set num_steps=1.5: 1.5 is a float, but num_steps takes a value of type int"),
    ("num_steps=None", "error: --set num_steps=None: num_steps cannot be None"),
    ("num_steps", "error: --set 'num_steps': not of the form KEY=VALUE. Fix: write e.g. --set num_steps=300"),
    ("=3", "error: --set '=3': not of the form KEY=VALUE"),
    ("optimizer.learnig_rate=0.1", "error: --set optimizer.learnig_rate=0.1: unknown config key "
                                   "'optimizer.learnig_rate'. Fix: did you mean 'optimizer.learning_rate'?"),
    ("num_steps.x=1", "error: --set num_steps.x=1: unknown config key 'num_steps.x'"),
    ("data=3", "error: --set data=3: 'data' is a group of keys, not a value"),
    ("num_steps=0", "error: --config "),  # config_lib.validate, before training
])
def test_bad_set_is_one_line_and_exit_2_before_training(tmp_path, tiny_setup, monkeypatch, capsys,
                                                        item, message):
  _, config_file = tiny_setup
  monkeypatch.setattr(train_lib, "train_and_evaluate", lambda *a: pytest.fail("trained"))
  assert sweep.main(["--config", str(config_file), "--set", item, "--workdir", str(tmp_path / "s")]) == 2
  err = capsys.readouterr().err
  assert err.startswith(message) and err.count("\n") == 1, err
  assert not (tmp_path / "s").exists()


def test_config_keys_added_after_a_run_count_as_equal_only_at_their_default():
  """A run saved before a config block existed (here: `gan`, `sifa`) is the same run when the new
  keys hold their defaults; a new key set to anything else, or a saved key that changed, differs."""
  import json
  from medgen_jax import runs
  from medgen_jax.config import base_config

  current = json.loads(base_config().to_json())
  saved = json.loads(base_config().to_json())
  del saved["gan"], saved["sifa"]
  del saved["data"]["normalization"]["output_range"]
  assert runs.config_differences(saved, current) == []
  current["gan"]["pool_size"] = 7
  assert runs.config_differences(saved, current) == ["gan.pool_size"]
  current["gan"]["pool_size"] = base_config().gan.pool_size
  saved["num_steps"] = 5
  assert runs.config_differences(saved, current) == ["num_steps"]
  # A key present in the saved run and absent now still differs (an option was removed).
  saved["num_steps"] = current["num_steps"]
  saved["removed_option"] = 1
  assert runs.config_differences(saved, current) == ["removed_option"]


def test_multisite_table_per_site_and_overall_over_volumes(tmp_path, tiny_setup, monkeypatch):
  """--multisite: config × seed, nothing held out; cells = mean ± std over the test volumes of
  every seed (per-volume mean foreground Dice); a Separate row of each site's own model."""
  _, config_file = tiny_setup
  seen = []

  def fake_train(config, workdir):
    seen.append((tuple(config.data.held_out), config.seed, config.data.normalization.name))
    base = 0.5 + 0.1 * config.seed
    records = [{"method": "Joint", "site": s, "case": f"{s}{j}", "role": "in-domain",
                "dice": [base + 0.1 * j, base + 0.1 * j]} for s in ("A", "B") for j in range(2)]
    records += [{"method": f"Separate ({s})", "site": t, "case": f"{t}0", "role": "",
                 "dice": [0.9 if s == t else 0.2, 0.9 if s == t else 0.4]} for s in ("A", "B") for t in ("A", "B")]
    return {"records": records}

  monkeypatch.setattr(train_lib, "train_and_evaluate", fake_train)
  workdir = tmp_path / "m"
  assert sweep.main(["--multisite", "--config", str(config_file), "--seeds", "2", "--workdir", str(workdir),
                     "--set", "data.sites=A,B", "--set", "data.held_out=()"]) == 0
  assert seen == [((), 0, "whitening"), ((), 1, "whitening")]
  table = (workdir / "sweep.md").read_text()
  # Joint at A: volumes 50, 60 (seed 0) and 60, 70 (seed 1): mean 60, population std sqrt(50) = 7.07
  assert "| Method | BFC | Intensities | Site A | Site B | Overall |" in table
  assert "| Joint | ✗ | whitening | 60.00 ± 7.07 | 60.00 ± 7.07 | 60.00 ± 7.07 |" in table
  assert "| Separate (A) | ✗ | whitening | 90.00 ± 0.00 | 30.00 ± 0.00 | 60.00 ± 30.00 |" in table
  assert "| Separate | ✗ | whitening | 90.00 ± 0.00 | 90.00 ± 0.00 | 90.00 ± 0.00 |" in table
  # the talk's order: per-site models, then their own-site row, then the other methods
  assert table.index("| Separate (B)") < table.index("| Separate |") < table.index("| Joint |")
  rows = (workdir / "sweep.csv").read_text().splitlines()
  assert rows[0] == "config,method,bias_correction,normalization,seed,site,case,dice"
  assert len(rows) == 1 + 2 * 8
  assert sweep.main(["--multisite", "--uda", "--config", str(config_file), "--workdir", str(workdir)]) == 2


def test_metrics_dice_and_asd_tables(tmp_path, tiny_setup, monkeypatch, capsys):
  """--metrics dice,asd: a Dice and an ASD table of the same layout; ASD = mean over the held-out
  volumes of the mean ASSD over classes; a run without distances shows '—'."""
  _, config_file = tiny_setup

  def fake_train(config, workdir):
    site, seed = config.data.held_out[0], config.seed
    records = fake_records(site, 0.5, ["x"])["records"]
    if site == "A":   # volumes c0, c1: ASSD means 2 and 4 (seed 0), 4 and 6 (seed 1)
      for r, asd in zip(records, ([1.0 + 2 * seed, 3.0 + 2 * seed], [3.0 + 2 * seed, 5.0 + 2 * seed], [9.0, 9.0])):
        r["asd"] = asd
    return {"records": records}

  monkeypatch.setattr(train_lib, "train_and_evaluate", fake_train)
  workdir = tmp_path / "s"
  assert sweep.main(["--config", str(config_file), "--held-out", "A,B", "--seeds", "2", "--workdir", str(workdir),
                     "--metrics", "dice,asd"]) == 0
  markdown = (workdir / "sweep.md").read_text()
  dice_part, asd_part = markdown.split("## ASD (mm)")
  assert "## Dice (%)" in dice_part and "| DeepAll | 50.00 ± 0.00 | 50.00 ± 0.00 | 50.00 ± 0.00 |" in dice_part
  # A: seed 0 -> (2 + 4) / 2 = 3, seed 1 -> 5: 4 ± 1; B has no distances: '—', so no Average
  assert "| DeepAll | 4.00 ± 1.00 | — | — |" in asd_part
  rows = (workdir / "sweep.csv").read_text().splitlines()
  assert rows[0] == "config,method,held_out,seed,unseen_dice,unseen_asd"
  assert "tiny,DeepAll,A,1,50.0000,5.0000" in rows and "tiny,DeepAll,B,0,50.0000,nan" in rows
  assert sweep.main(["--config", str(config_file), "--workdir", str(workdir), "--metrics", "dice,hd"]) == 2
  assert "--metrics dice,hd" in capsys.readouterr().err


def test_intra_site_rows_train_and_score_the_held_out_site_itself(tmp_path, tiny_setup, monkeypatch):
  root, config_file = tiny_setup
  intra = tmp_path / "intra.py"
  # its own data.sites names one site, as configs/intra_site_brain.py does: the sweep still
  # chooses among all the dataset's sites
  intra.write_text(config_file.read_text().replace(
      "c = base_config()", "c = base_config()\n  c.method = 'intra_site'\n  c.data.sites = ('B',)"))
  seen = []

  def fake_train(config, workdir):
    seen.append((tuple(config.data.sites), tuple(config.data.held_out)))
    site = config.data.sites[0]
    return {"records": [  # its own test split is in-domain; another site's volume must be ignored
        {"method": "Intra-site [target labels]", "site": site, "case": "c0", "role": "in-domain", "dice": [0.8, 0.8]},
        {"method": "Intra-site [target labels]", "site": "x", "case": "c0", "role": "unseen", "dice": [0.1, 0.1]}]}

  monkeypatch.setattr(train_lib, "train_and_evaluate", fake_train)
  workdir = tmp_path / "s"
  assert sweep.main(["--config", str(intra), "--held-out", "A,B", "--seeds", "1", "--workdir", str(workdir)]) == 0
  assert seen == [(("A",), ()), (("B",), ())]
  assert "| Intra-site [target labels] | 80.00 ± 0.00 | 80.00 ± 0.00 | 80.00 ± 0.00 |" in (workdir / "sweep.md").read_text()


def test_intra_site_trains_on_one_site_and_is_labelled(tmp_path):
  from helpers import tiny_config
  from medgen_jax import config as config_lib
  root = make_sites_dataset(tmp_path / "toy", sites=("A", "B"), cases=4)
  with pytest.raises(ValueError, match="intra_site"):
    config_lib.validate(tiny_config(root, method="intra_site"))   # C held out, no single site
  config = tiny_config(root, method="intra_site", **{"data.sites": ("B",), "data.held_out": (), "num_steps": 2,
                                                      "eval.selection": "last"})
  result = train_lib.train_and_evaluate(config, tmp_path / "run")
  assert {r["site"] for r in result["records"]} == {"B"}
  assert {r["role"] for r in result["records"]} == {"in-domain"}
  assert "| Intra-site [target labels] |" in result["markdown"]
