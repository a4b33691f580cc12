"""The sweep on several machines: `--shard K/N` (disjoint slices covering the grid, each resumable
and idempotent), a submitit job array (`--executor local`, the stand-in for Slurm), `--no-wait`
and `--report` (the table of whatever finished, the rest listed). Training is faked (as in
tests/test_sweep.py): a fake trainer leaves a finished run as the trainer does."""

import json
import os
import shlex
import time
from pathlib import Path

import pytest

from helpers import make_sites_dataset
from medgen_jax import sweep, train_lib
from test_sweep import TINY   # the same tiny config file


def make_fake_train(log=None, fail=()):
  """A trainer that leaves a finished run as train_lib does (config.json, results.json) without
  training; held-out Dice (fraction) A 0.40, B 0.50, C 0.60, + 0.02 per seed. Self-contained (no
  module-level names), so submitit pickles it by value into a job."""

  def fake_train(config, workdir):
    import json
    import os
    from pathlib import Path

    site, seed = (config.data.held_out or ('A',))[0], config.seed   # --multisite: nothing held out
    if log is not None:
      log.append((site, seed))
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json())
    if (site, seed) in fail:
      raise OSError(28, "No space left on device")
    d = 0.4 + 0.1 * "ABC".index(site) + 0.02 * seed
    records = [{"method": "DeepAll", "site": site, "case": "c0", "role": "unseen", "dice": [d, d]},
               {"method": "DeepAll", "site": "x", "case": "c0", "role": "in-domain", "dice": [0.0, 0.0]}]
    result = {"selection": config.eval.selection, "records": records, "pid": os.getpid()}
    (workdir / "results.json").write_text(json.dumps(result))
    return result

  return fake_train


@pytest.fixture
def setup(tmp_path):
  root = make_sites_dataset(tmp_path / "toy", sites=("A", "B", "C"), cases=3)
  config_file = tmp_path / "tiny.py"
  config_file.write_text(TINY.format(root=str(root)))
  return config_file


def no_training(*args, **kwargs):
  raise AssertionError("trained")


def test_shard_slices_are_disjoint_covering_balanced_and_order_free(tmp_path):
  names = ["m/A/seed0", "m/A/seed1", "m/B/seed0", "m/B/seed1", "m/C/seed0", "m/C/seed1", "n/A/seed0"]
  runs = [sweep.PlannedRun("x", "", 0, None, tmp_path / name) for name in names]
  names_of = lambda k, n, runs: [runs[i].run_dir.relative_to(tmp_path).as_posix()
                                 for i in sweep.shard_indices(runs, tmp_path, k, n)]
  # by hand: the sorted folders, every third from the K-th
  assert names_of(1, 3, runs) == ["m/A/seed0", "m/B/seed1", "n/A/seed0"]
  assert names_of(2, 3, runs) == ["m/A/seed1", "m/C/seed0"]
  assert names_of(3, 3, runs) == ["m/B/seed0", "m/C/seed1"]
  shuffled = [runs[i] for i in (6, 3, 0, 5, 1, 4, 2)]   # another --config / --held-out order
  for n in range(1, 9):
    slices = [names_of(k, n, runs) for k in range(1, n + 1)]
    assert sorted(sum(slices, [])) == sorted(names)                         # disjoint and covering
    assert max(map(len, slices)) - min(map(len, slices)) <= 1               # balanced
    assert [sorted(names_of(k, n, shuffled)) for k in range(1, n + 1)] == [sorted(s) for s in slices]


@pytest.mark.parametrize("extra, message", [
    (["--shard", "0/4"], "error: --shard 0/4: not K/N with 1 <= K <= N. Fix: give each of N machines one of "
                         "--shard 1/N, ..., --shard N/N, e.g. --shard 2/4"),
    (["--shard", "5/4"], "error: --shard 5/4: not K/N"),
    (["--shard", "2"], "error: --shard 2: not K/N"),
    (["--shard", "a/b"], "error: --shard a/b: not K/N"),
    (["--shard", "1/2/3"], "error: --shard 1/2/3: not K/N"),
    (["--report", "--shard", "1/2"], "error: --report trains nothing and reads every run of the sweep: drop --shard"),
    (["--report", "--executor", "local"], "error: --report trains nothing and reads every run of the sweep: "
                                          "drop --executor"),
    (["--no-wait"], "error: --no-wait: only with --executor. Fix: add --executor slurm (or local)"),
    (["--executor", "local", "--slurm-partition", "gpu"], "error: --slurm-partition: only with --executor slurm"),
    (["--executor", "slurm", "--slurm-gpus", "0"], "error: --slurm-gpus 0: must be >= 1"),
])
def test_bad_cluster_options_are_one_line_and_exit_2(tmp_path, setup, monkeypatch, capsys, extra, message):
  monkeypatch.setattr(train_lib, "train_and_evaluate", no_training)
  assert sweep.main(["--config", str(setup), "--workdir", str(tmp_path / "s")] + extra) == 2
  err = capsys.readouterr().err
  assert err.startswith(message) and err.count("\n") == 1, err
  assert not (tmp_path / "s").exists()


def test_shards_then_report(tmp_path, setup, monkeypatch, capsys):
  """Two shards train disjoint halves (rerunning one redoes nothing); --report in between gives the
  table of what finished and lists the rest; at the end it is the plain sweep's own table."""
  log = []
  monkeypatch.setattr(train_lib, "train_and_evaluate", make_fake_train(log))
  workdir = tmp_path / "s"
  argv = ["--config", str(setup), "--seeds", "2", "--workdir", str(workdir)]
  assert sweep.main(argv + ["--report"]) == 1
  assert ("error: none of the 6 planned run(s) has finished in " in capsys.readouterr().err)
  assert not (workdir / "sweep.md").exists()
  # an interrupted run (config.json, no results): listed as started, resumed by its shard
  started = workdir / "tiny" / "B" / "seed1"
  started.mkdir(parents=True)
  (started / "config.json").write_text(sweep.run_config(str(setup), [], 1, {"held_out": ("B",)}).to_json())

  # runs ranked A0 A1 B0 B1 C0 C1: shard 1/2 = A0 B0 C0, shard 2/2 = A1 B1 C1
  assert sweep.main(argv + ["--shard", "1/2"]) == 0
  out = capsys.readouterr().out
  assert "[sweep] shard 1/2: 3 of the 6 run(s)" in out
  assert f"the table: python -m medgen_jax.sweep --config {setup} --seeds 2 --workdir {workdir} --report" in out
  assert log == [("A", 0), ("B", 0), ("C", 0)]
  assert not (workdir / "sweep.md").exists()   # a shard writes no table
  monkeypatch.setattr(train_lib, "train_and_evaluate", no_training)
  assert sweep.main(argv + ["--shard", "1/2"]) == 0   # idempotent: finished runs are not redone

  assert sweep.main(argv + ["--report"]) == 0
  captured = capsys.readouterr()
  table = (workdir / "sweep.md").read_text()
  # one seed each: 40, 50, 60 (seed 0); Average over the seeds finished on every site: seed 0 only
  assert "| DeepAll | 40.00 ± 0.00 (n=1) | 50.00 ± 0.00 (n=1) | 60.00 ± 0.00 (n=1) | 50.00 ± 0.00 (n=1) |" in table
  assert ("NOT FINISHED, not in the table (3): tiny/A/seed1 (not started); tiny/B/seed1 (started); "
          "tiny/C/seed1 (not started)") in table
  assert "note: 3 of 6 planned run(s) have not finished yet" in captured.err
  assert (workdir / "sweep.csv").read_text().splitlines()[1:] == [
      "tiny,DeepAll,A,0,40.0000", "tiny,DeepAll,B,0,50.0000", "tiny,DeepAll,C,0,60.0000"]

  monkeypatch.setattr(train_lib, "train_and_evaluate", make_fake_train(log))
  assert sweep.main(argv + ["--shard", "2/2"]) == 0
  assert log[3:] == [("A", 1), ("B", 1), ("C", 1)]   # disjoint from shard 1, together every run
  assert sweep.main(argv + ["--report"]) == 0
  table = (workdir / "sweep.md").read_text()
  # A: 40, 42 -> 41 ± 1; B: 50, 52; C: 60, 62; Average per seed 50 and 52 -> 51 ± 1
  assert "| DeepAll | 41.00 ± 1.00 | 51.00 ± 1.00 | 61.00 ± 1.00 | 51.00 ± 1.00 |" in table
  assert "NOT FINISHED" not in table
  monkeypatch.setattr(train_lib, "train_and_evaluate", no_training)
  assert sweep.main(argv) == 0   # the plain sweep reads them all back: the same table
  assert (workdir / "sweep.md").read_text() == table
  # --report refuses runs made with other settings, as the sweep does
  assert sweep.main(argv + ["--report", "--set", "num_steps=3"]) == 1
  assert "error: refusing to run the sweep: 6 existing run(s)" in capsys.readouterr().err


def test_num_sources_and_multisite_reports_list_missing_runs(tmp_path, setup, monkeypatch, capsys):
  monkeypatch.setattr(train_lib, "train_and_evaluate", make_fake_train())
  workdir = tmp_path / "n"
  argv = ["--num-sources", "1", "--config", str(setup), "--held-out", "A", "--seeds", "1", "--workdir", str(workdir)]
  # runs: A/k1_B/seed0, A/k1_C/seed0; shard 1/2 trains the first
  assert sweep.main(argv + ["--shard", "1/2"]) == 0
  assert sweep.main(argv + ["--report"]) == 0
  markdown = (workdir / "num_sources.md").read_text()
  assert "NOT FINISHED, not in the table (1): tiny/A/k1_C/seed0 (not started)" in markdown
  assert "| DeepAll | A | 40.00 ± 0.00 (n=1) |" in markdown
  workdir = tmp_path / "m"
  argv = ["--multisite", "--config", str(setup), "--seeds", "2", "--workdir", str(workdir),
          "--set", "data.held_out=()"]
  assert sweep.main(argv + ["--shard", "2/2"]) == 0   # seed1 only
  assert sweep.main(argv + ["--report"]) == 0
  markdown = (workdir / "sweep.md").read_text()
  assert "NOT FINISHED, not in the table (1): tiny/seed0 (not started)" in markdown
  assert "| DeepAll | ✗ | whitening | 42.00 ± 0.00 | — | — | 42.00 ± 0.00 |" in markdown
  capsys.readouterr()


def wait_for(paths, seconds=90):
  deadline = time.time() + seconds
  while not all(p.is_file() for p in paths):
    assert time.time() < deadline, f"jobs did not finish in {seconds} s: {[p for p in paths if not p.is_file()]}"
    time.sleep(0.2)


def test_job_array_through_submitit_local_executor(tmp_path, setup, monkeypatch, capsys):
  """--executor local: one submitit job per unfinished run, run in other processes (the fake
  trainer is pickled into them), a failed job listed; --no-wait, then the --report it prints."""
  monkeypatch.setattr(train_lib, "train_and_evaluate", make_fake_train(fail={("C", 0)}))
  workdir = tmp_path / "s"
  argv = ["--config", str(setup), "--seeds", "1", "--workdir", str(workdir)]
  assert sweep.main(argv + ["--shard", "1/3"]) == 0   # A finished here, so not submitted
  capsys.readouterr()
  assert sweep.main(argv + ["--executor", "local", "--job-minutes", "5"]) == 1
  captured = capsys.readouterr()
  assert "[sweep] 1 run(s) already finished, not submitted" in captured.out
  assert "[sweep] submitted 2 job(s) to the local executor as one array" in captured.out
  assert (f"error: run {workdir / 'tiny/C/seed0'} failed: [Errno 28] No space left on device"
          in captured.err)
  results = json.loads((workdir / "tiny/B/seed0/results.json").read_text())
  assert results["pid"] != os.getpid()   # trained in a job, not in the sweep's process
  assert json.loads((workdir / "tiny/A/seed0/results.json").read_text())["pid"] == os.getpid()
  table = (workdir / "sweep.md").read_text()
  assert "| DeepAll | 40.00 ± 0.00 | 50.00 ± 0.00 | — | — |" in table
  assert "FAILED, not in the table (1): tiny/C/seed0 ([Errno 28] No space left on device)" in table
  logs = sorted(p.name for p in (workdir / "submitit").iterdir())
  assert any(name.endswith("_log.out") for name in logs)

  # --no-wait: submit and return; the printed --report command gathers the table afterwards
  monkeypatch.setattr(train_lib, "train_and_evaluate", make_fake_train())
  workdir = tmp_path / "t"
  argv = ["--config", str(setup), "--seeds", "1", "--held-out", "A,B", "--workdir", str(workdir)]
  assert sweep.main(argv + ["--executor=local", "--no-wait"]) == 0
  out = capsys.readouterr().out
  command = out.split("When they have finished, the table: ")[1].strip()
  assert command == shlex.join(["python", "-m", "medgen_jax.sweep", *argv, "--report"])
  assert not (workdir / "sweep.md").exists()
  wait_for([workdir / "tiny" / s / "seed0" / "results.json" for s in "AB"])
  assert sweep.main(shlex.split(command)[3:]) == 0
  assert "| DeepAll | 40.00 ± 0.00 | 50.00 ± 0.00 | 45.00 ± 0.00 |" in (workdir / "sweep.md").read_text()


def test_run_job_requeues_the_same_call_and_report_command():
  job = sweep.RunJob(train=None)
  run = sweep.PlannedRun("c.py", "A", 0, None, Path("/w/c/A/seed0"))
  again = job.checkpoint(run)   # what submitit requeues on a time-out or preemption
  assert again.function is job and again.args == (run,) and again.kwargs == {}
  assert sweep.report_command(["--config", "c.py", "--shard", "1/2", "--executor=slurm", "--no-wait",
                               "--slurm-partition", "gpu", "--job-minutes", "60", "--workdir", "w x"]) == \
      "python -m medgen_jax.sweep --config c.py --workdir 'w x' --report"


def test_slurm_executor_submits_one_array_through_sbatch(tmp_path, setup, monkeypatch, capsys):
  """--executor slurm without a cluster: a stand-in `sbatch` on PATH records the batch file that
  submitit writes; one array of the unfinished runs with the partition, GPUs, CPUs, time limit and
  array parallelism asked for, each task running submitit's job runner on its pickled run."""
  monkeypatch.setattr(train_lib, "train_and_evaluate", make_fake_train())
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "sbatch").write_text('#!/bin/sh\ncp "$1" "$SBATCH_COPY"\necho "Submitted batch job 4242"\n')
  (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")   # submitit looks for it; never called here
  for tool in ("sbatch", "srun"):
    (bin_dir / tool).chmod(0o755)
  path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
  monkeypatch.setenv("SBATCH_COPY", str(tmp_path / "submitted.sh"))
  workdir = tmp_path / "s"
  argv = ["--config", str(setup), "--seeds", "1", "--workdir", str(workdir)]
  monkeypatch.setenv("PATH", str(tmp_path / "nothing"))   # no Slurm here: one line, before anything
  assert sweep.main(argv + ["--executor", "slurm"]) == 2
  assert capsys.readouterr().err == ("error: --executor slurm: sbatch and srun not found, so this is no Slurm "
                                     "machine. Fix: run the sweep on the cluster's login node, or use "
                                     "--executor local or --shard K/N\n")
  monkeypatch.setenv("PATH", path)
  assert sweep.main(argv + ["--shard", "2/3"]) == 0   # B finished: not submitted
  assert sweep.main(argv + ["--executor", "slurm", "--no-wait", "--slurm-partition", "gpu", "--slurm-gpus", "2",
                            "--slurm-cpus", "8", "--job-minutes", "90", "--slurm-array-parallelism", "1"]) == 0
  out = capsys.readouterr().out
  assert "[sweep] submitted 2 job(s) to the slurm executor as one array (job ids 4242_0 .. 4242_1)" in out
  batch = (tmp_path / "submitted.sh").read_text()
  for line in ("#SBATCH --array=0-1%1", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2",
               "#SBATCH --cpus-per-task=8", "#SBATCH --time=90", "#SBATCH --job-name=medgen_jax_sweep"):
    assert line in batch.splitlines(), batch
  assert "-m submitit.core._submit" in batch
  # the pickled calls: RunJob on the runs of held-out A and C (in plan order)
  import pickle
  calls = sorted((workdir / "submitit").glob("*_submitted.pkl"))
  runs = [pickle.loads(p.read_bytes()).args[0] for p in calls]
  assert sorted(run.run_dir.relative_to(workdir).as_posix() for run in runs) == ["tiny/A/seed0", "tiny/C/seed0"]
  assert isinstance(pickle.loads(calls[0].read_bytes()).function, sweep.RunJob)
