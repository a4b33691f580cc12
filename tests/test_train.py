"""The trainer end to end on tiny data: pmap = one device, exact resume, guards, CLI, outputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import make_sites_dataset, tiny_config
from medgen_jax import evaluation, parallel, runs, train_lib
from medgen_jax.checkpoint import CheckpointWarning, Checkpoints, abstract_like
from medgen_jax.config import base_config
from medgen_jax.data.sampler import SliceSampler
from medgen_jax.methods.deepall import make_train_step
from medgen_jax.models import UNet
from medgen_jax.train_state import create_train_state, make_optimizer
from medgen_jax.writers import read_records

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return make_sites_dataset(tmp_path_factory.mktemp("data") / "toy", sites=("A", "B", "C"), cases=5)


def saved_state(workdir, step, model="deepall"):
  return ocp.StandardCheckpointer().restore(Path(workdir).absolute() / model / "checkpoints" / str(step) / "state")


def assert_trees_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_pmapped_step_equals_one_device_step():
  """2 fake devices, bn_sync on: params within 1e-5 of the one-device step after 3 steps."""
  config = base_config()
  tx = make_optimizer(config.optimizer, num_steps=10)
  rng = np.random.default_rng(0)
  batches = [{"image": rng.normal(size=(4, 32, 32, 1)).astype(np.float32),
              "label": rng.integers(0, 4, size=(4, 32, 32)).astype(np.int32)} for _ in range(3)]
  single_model = UNet(4, base_features=4, depth=2)
  single = create_train_state(0, single_model, tx, input_shape=(1, 32, 32, 1))
  single_step = jax.jit(make_train_step(single_model, tx, config, num_classes=4))
  multi_model = UNet(4, base_features=4, depth=2, bn_axis_name=parallel.AXIS_NAME)
  runner = parallel.DataParallel(make_train_step(multi_model, tx, config, num_classes=4,
                                                 axis_name=parallel.AXIS_NAME, bn_sync=True), num_devices=2)
  multi = runner.replicate(create_train_state(0, multi_model, tx, input_shape=(1, 32, 32, 1)))
  key = jax.random.PRNGKey(1)
  for batch in batches:
    single, m1 = single_step(single, batch, key)
    multi, m2 = runner.step(multi, batch, key)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
  host = runner.unreplicate(multi)
  for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(host.params)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  for a, b in zip(jax.tree.leaves(single.batch_stats), jax.tree.leaves(host.batch_stats)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_train_and_evaluate_writes_every_output(dataset, tmp_path):
  result = train_lib.train_and_evaluate(tiny_config(dataset), tmp_path / "run")
  run = tmp_path / "run"
  for name in ("config.json", "splits.json", "normalizer.json", "metrics.jsonl", "results.md",
               "results.csv", "results.json"):
    assert (run / name).is_file(), name
  assert list((run / "tensorboard" / "deepall").glob("events.out.tfevents*"))
  records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
  assert {r["model"] for r in records} == {"deepall"}
  assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4, 6]
  assert [r["step"] for r in records if r["kind"] == "eval"] == [3, 6]
  assert "| DeepAll |" in result["markdown"] and "C (unseen)" in result["markdown"]
  assert "selection rule: checkpoint selected by mean Dice on the source sites' validation" in result["markdown"]
  roles = {(r["site"], r["role"]) for r in result["records"]}
  assert roles == {("A", "in-domain"), ("B", "in-domain"), ("C", "unseen")}
  assert sum(r["site"] == "C" for r in result["records"]) == 5  # every case of the unseen site
  csv_lines = (run / "results.csv").read_text().splitlines()
  assert csv_lines[0].startswith("method,site,role,case,class_index,dice,asd_mm,hd95_mm")
  assert len(csv_lines) == 1 + 7 * 3  # 7 test volumes x 3 foreground classes
  # Re-evaluating the saved run gives the same table (no training step is taken).
  again = evaluation.evaluate_run(runs.config_from_json(json.loads((run / "config.json").read_text())), run)
  assert again["markdown"] == result["markdown"]


def test_killed_run_resumes_bit_identical(dataset, tmp_path, monkeypatch):
  straight = tmp_path / "straight"
  config = lambda: tiny_config(dataset, log_every=1, **{"checkpoint.every": 2})
  train_lib.train_and_evaluate(config(), straight)

  original_batch_at = SliceSampler.batch_at

  def crash_at_step_6(self, step, **kw):  # after step 5 was logged, not saved: it is redone after the restart
    if step == 5:
      raise KeyboardInterrupt("simulated kill")
    return original_batch_at(self, step, **kw)

  interrupted = tmp_path / "interrupted"
  monkeypatch.setattr(SliceSampler, "batch_at", crash_at_step_6)
  with pytest.raises(KeyboardInterrupt):
    train_lib.train_and_evaluate(config(), interrupted)
  assert sorted(int(p.name) for p in (interrupted / "deepall" / "checkpoints").iterdir()
                if p.name.isdigit()) == [2, 3, 4]
  logged = [(r["kind"], r["step"]) for r in read_records(interrupted / "metrics.jsonl")]
  assert logged[-2:] == [("train", 4), ("train", 5)]
  monkeypatch.setattr(SliceSampler, "batch_at", original_batch_at)
  train_lib.train_and_evaluate(config(), interrupted)
  assert_trees_equal(saved_state(straight, 6), saved_state(interrupted, 6))
  # Each step is logged once after the resume, in metrics.jsonl and in TensorBoard.
  expected = [(r["kind"], r["step"]) for r in read_records(straight / "metrics.jsonl")]
  assert [(r["kind"], r["step"]) for r in read_records(interrupted / "metrics.jsonl")] == expected
  assert tensorboard_steps(interrupted, "train/loss") == tensorboard_steps(straight, "train/loss") == [1, 2, 3, 4, 5, 6]


def tensorboard_steps(run, tag, model="deepall"):
  """The steps of `tag` in every event file of the model, as any TensorBoard reader sees them."""
  from tensorboardX.proto import event_pb2
  steps = []
  for path in sorted((run / "tensorboard" / model).glob("events.out.tfevents*")):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):  # TFRecord: length u64, crc u32, payload, crc u32
      length = int.from_bytes(data[offset:offset + 8], "little")
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      steps += [event.step for v in event.summary.value if v.tag == tag]
  return sorted(steps)


def test_workdir_with_a_different_config_is_refused(dataset, tmp_path):
  train_lib.train_and_evaluate(tiny_config(dataset, num_steps=3), tmp_path / "run")
  with pytest.raises(ValueError, match="different config.*optimizer.learning_rate"):
    train_lib.train_and_evaluate(tiny_config(dataset, num_steps=3, **{"optimizer.learning_rate": 0.1}),
                                 tmp_path / "run")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(dataset, tmp_path, monkeypatch):
  original = SliceSampler.batch_at

  def poisoned(self, step, **kw):
    batch = original(self, step, **kw)
    if step == 4:
      batch["image"] = np.full_like(batch["image"], np.nan)
    return batch

  monkeypatch.setattr(SliceSampler, "batch_at", poisoned)
  with pytest.raises(train_lib.TrainingDivergedError,
                     match=r"non-finite loss, gradient norm or parameters at step 5 .*step 3.*new --workdir"):
    train_lib.train_and_evaluate(tiny_config(dataset), tmp_path / "run")
  steps = sorted(int(p.name) for p in (tmp_path / "run" / "deepall" / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [3]
  params = saved_state(tmp_path / "run", 3)["params"]
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path):
  config = base_config()
  tx = make_optimizer(config.optimizer, num_steps=10)
  state = create_train_state(0, UNet(4, base_features=4, depth=2), tx, input_shape=(1, 16, 16, 1))
  ckpts = Checkpoints(tmp_path / "ck", keep=3)
  for step in (1, 2):
    ckpts.save(step, jax.device_get(state.replace(step=np.int32(step))), meta={"sampler": {"step": step}})
  ckpts.wait()
  for f in (tmp_path / "ck" / "2" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"\x00garbage")
  with pytest.warns(CheckpointWarning, match=r"ck/2 cannot be read.*moved to .*ck/2.corrupt"):
    restored, meta, step = ckpts.restore_latest(abstract_like(state))
  assert step == 1 and meta == {"sampler": {"step": 1}} and int(restored.step) == 1
  assert (tmp_path / "ck" / "2.corrupt").is_dir()  # moved aside, never deleted
  assert ckpts.steps() == [1]
  # The step can be written again (orbax refused an existing step before).
  ckpts.save(2, jax.device_get(state.replace(step=np.int32(2))), meta={"sampler": {"step": 2}})
  ckpts.wait()
  assert ckpts.steps() == [1, 2]


def test_separate_trains_one_model_per_site(dataset, tmp_path):
  result = train_lib.train_and_evaluate(tiny_config(dataset, method="separate", num_steps=3, batch_size=4),
                                        tmp_path / "run")
  methods = {r["method"] for r in result["records"]}
  assert methods == {"Separate (A)", "Separate (B)"}
  roles = {(r["method"], r["site"]): r["role"] for r in result["records"]}
  assert roles[("Separate (A)", "A")] == "in-domain" and roles[("Separate (A)", "B")] == "unseen"
  assert (tmp_path / "run" / "separate_B" / "checkpoints").is_dir()
  assert "| Method | A | B | C (unseen) | Overall |" in result["markdown"]  # A, B: roles differ per row
  assert "†" in result["markdown"]


def test_oracle_selection_is_labelled(dataset, tmp_path):
  result = train_lib.train_and_evaluate(tiny_config(dataset, num_steps=3, **{"eval.selection": "oracle"}),
                                        tmp_path / "run")
  assert "DeepAll [oracle]" in result["markdown"] and "ORACLE" in result["markdown"]


def _cli(*args, cwd):
  env = dict(os.environ)  # conftest's XLA flags (4 devices, -O0: compiling dominates here)
  return subprocess.run([sys.executable, "-m", "medgen_jax.train", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_end_to_end_and_unknown_key(dataset, tmp_path):
  config_file = tmp_path / "tiny.py"
  config_file.write_text(
      "from medgen_jax.config import base_config\n"
      "def get_config():\n"
      "  c = base_config()\n"
      "  c.data.held_out = ('C',)\n  c.data.in_plane_shape = (16, 16)\n"
      "  c.model.base_features = 4\n  c.model.depth = 2\n  c.batch_size = 4\n  c.num_steps = 2\n"
      "  c.log_every = 1\n  c.eval_every = 2\n  c.checkpoint.every = 2\n  c.eval.batch_size = 8\n"
      "  return c\n")
  done = _cli("--config", str(config_file), "--workdir", str(tmp_path / "run"),
              f"--config.data.root={dataset}", "--config.progress_bar=False", cwd=REPO)
  assert done.returncode == 0, done.stderr
  assert "| DeepAll |" in done.stdout and (tmp_path / "run" / "results.md").is_file()
  bad = _cli("--config", str(config_file), "--workdir", str(tmp_path / "bad"),
             "--config.optimiser.learning_rate=0.1", cwd=REPO)
  assert bad.returncode == 2
  assert 'unknown config key "optimiser"; did you mean "optimizer"?' in bad.stderr
  assert "Traceback" not in bad.stderr and not (tmp_path / "bad").exists()
  env = dict(os.environ)  # conftest's XLA flags (4 devices, -O0: compiling dominates here)
  evaluated = subprocess.run([sys.executable, "-m", "medgen_jax.evaluate", "--workdir", str(tmp_path / "run"),
                              "--selection", "last"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)
  assert evaluated.returncode == 0, evaluated.stderr
  assert "selection rule: last checkpoint" in evaluated.stdout
  assert (tmp_path / "run" / "results_last.md").is_file()  # results.md keeps the run's own rule


def test_bfloat16_step_matches_the_float32_step():
  """bfloat16 compute, float32 parameters: the update is the float32 step's within bf16 precision."""
  config = base_config()
  config.optimizer.name = "sgd"  # Adam would normalise rounding noise in tiny gradients to full steps
  config.optimizer.learning_rate = 0.1
  tx = make_optimizer(config.optimizer, num_steps=10)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(4, 16, 16, 1)).astype(np.float32),
           "label": rng.integers(0, 4, size=(4, 16, 16)).astype(np.int32)}
  other = dict(batch, label=rng.integers(0, 4, size=(4, 16, 16)).astype(np.int32))
  results = {}
  for dtype in (jax.numpy.float32, jax.numpy.bfloat16):
    model = UNet(4, base_features=4, depth=2, dtype=dtype)
    state = create_train_state(0, model, tx, input_shape=(1, 16, 16, 1))
    step = jax.jit(make_train_step(model, tx, config, num_classes=4))
    results[dtype] = (state, *step(state, batch, jax.random.PRNGKey(0)))
    if dtype == jax.numpy.float32:
      results["other labels"] = (state, *step(state, other, jax.random.PRNGKey(0)))
  state, f32, m32 = results[jax.numpy.float32]
  _, bf16, m16 = results[jax.numpy.bfloat16]
  assert {x.dtype for x in jax.tree.leaves(bf16.params)} == {np.dtype("float32")}
  assert {x.dtype for x in jax.tree.leaves(bf16.opt_state) if hasattr(x, "dtype") and x.ndim} == {np.dtype("float32")}
  np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=2e-2)

  def update(new):
    return np.concatenate([np.ravel(b - a) for a, b in zip(jax.tree.leaves(state.params),
                                                            jax.tree.leaves(new.params))])

  u32, u16, u_other = update(f32), update(bf16), update(results["other labels"][1])
  assert np.linalg.norm(u32) > 1e-3  # the compared quantity is not trivially small
  # bf16 keeps 8 significant bits (relative rounding 2^-8 ≈ 0.4 % per operation); through a
  # forward and backward pass with BatchNorm the gradient's relative error was 13 % (measured),
  # far below what a real change of the step gives (another label map: ~100 %).
  error = np.linalg.norm(u16 - u32) / np.linalg.norm(u32)
  assert error < 0.25 and error < 0.3 * np.linalg.norm(u_other - u32) / np.linalg.norm(u32)
  assert u16 @ u32 / (np.linalg.norm(u16) * np.linalg.norm(u32)) > 0.97


def test_finish_step_flags_infinite_gradients_with_a_finite_loss():
  from medgen_jax.methods.deepall import finish_step
  config = base_config()
  tx = make_optimizer(config.optimizer, num_steps=10)
  state = create_train_state(0, UNet(4, base_features=4, depth=2), tx, input_shape=(1, 16, 16, 1))
  grads = jax.tree.map(jax.numpy.zeros_like, state.params)
  metrics = {"loss": jax.numpy.float32(0.5)}
  good, _ = finish_step(state.replace(step=np.int32(6)), tx, grads, metrics, state.batch_stats,
                        axis_name=None, bn_sync=True)
  assert int(good.first_bad_step) == 0
  leaves, treedef = jax.tree.flatten(grads)
  bad_grads = jax.tree.unflatten(treedef, [leaves[0].at[(0,) * leaves[0].ndim].set(np.inf)] + leaves[1:])
  bad, out = finish_step(good, tx, bad_grads, metrics, state.batch_stats, axis_name=None, bn_sync=True)
  assert np.isfinite(float(out["loss"])) and not np.isfinite(float(out["grad_norm"]))
  assert int(bad.first_bad_step) == 8  # the first bad step is remembered ...
  again, _ = finish_step(bad, tx, grads, metrics, state.batch_stats, axis_name=None, bn_sync=True)
  assert int(again.first_bad_step) == 8  # ... and kept


def test_infinite_gradient_with_finite_loss_is_never_saved(dataset, tmp_path, monkeypatch):
  import medgen_jax.methods.deepall as deepall
  original = deepall.finish_step

  def poisoned_at_step_6(state, tx, grads, metrics, batch_stats, **kw):
    # Step 6 is a save step: its loss is finite, its gradient infinite, its new params NaN.
    scale = jax.numpy.where(state.step == 5, jax.numpy.inf, 1.0)
    return original(state, tx, jax.tree.map(lambda g: g * scale, grads), metrics, batch_stats, **kw)

  monkeypatch.setattr(deepall, "finish_step", poisoned_at_step_6)
  with pytest.raises(train_lib.TrainingDivergedError, match=r"at step 6 \(loss at step 6: [0-9.]+\).*step 3"):
    train_lib.train_and_evaluate(tiny_config(dataset), tmp_path / "run")
  steps = sorted(int(p.name) for p in (tmp_path / "run" / "deepall" / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [3]


@pytest.fixture(scope="module")
def finished_run(dataset, tmp_path_factory):
  """A finished tiny DeepAll run (checkpoints at 3 and 6), copied by the tests that change it."""
  run = tmp_path_factory.mktemp("finished") / "run"
  result = train_lib.train_and_evaluate(tiny_config(dataset), run)
  return run, result


def _copy(run, tmp_path):
  import shutil
  target = tmp_path / "copy"
  shutil.copytree(run, target)
  return target


def test_corrupt_newest_checkpoint_is_moved_aside_and_the_rerun_finishes_identically(dataset, finished_run, tmp_path):
  run, result = finished_run
  copy = _copy(run, tmp_path)
  for f in (copy / "deepall" / "checkpoints" / "6" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"\x00garbage")
  with pytest.warns(CheckpointWarning, match=r"checkpoints/6 cannot be read"):
    again = train_lib.train_and_evaluate(tiny_config(dataset), copy)
  assert (copy / "deepall" / "checkpoints" / "6.corrupt").is_dir()
  assert_trees_equal(saved_state(run, 6), saved_state(copy, 6))
  assert again["markdown"] == result["markdown"]


def test_resume_with_another_selection_rule_and_evaluate_errors(dataset, finished_run, tmp_path, capsys):
  run, _ = finished_run
  copy = _copy(run, tmp_path)
  # The run recorded validation scores only: oracle selection is one clear line, not a KeyError.
  with pytest.raises(ValueError, match="no checkpoint of 'deepall' recorded oracle_dice.*Fix"):
    evaluation.evaluate_run(_with_selection(copy, "oracle"), copy)
  # Resuming a finished run with a changed eval.selection works (it is a resumable key).
  last = train_lib.train_and_evaluate(tiny_config(dataset, **{"eval.selection": "last"}), copy)
  assert "selection rule: last checkpoint" in last["markdown"]


def _with_selection(workdir, selection):
  config = runs.load_run_config(workdir)
  config.eval.selection = selection
  return config


def _run_module(module, *args, cwd=REPO):
  env = dict(os.environ)  # conftest's XLA flags (4 devices, -O0: compiling dominates here)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=300)


def test_cli_expected_failures_are_one_line(dataset, finished_run, tmp_path):
  run, _ = finished_run
  copy = _copy(run, tmp_path)
  checks = []
  # evaluate: oracle on a run trained with val selection; a data root that is gone; no checkpoint.
  checks.append(_run_module("medgen_jax.evaluate", "--workdir", str(copy), "--selection", "oracle"))
  moved = tmp_path / "moved"
  config = json.loads((copy / "config.json").read_text())
  gone = dict(config, data=dict(config["data"], root=str(moved)))
  nodata = _copy(run, tmp_path / "n")
  (nodata / "config.json").write_text(json.dumps(gone))
  checks.append(_run_module("medgen_jax.evaluate", "--workdir", str(nodata)))
  killed = _copy(run, tmp_path / "k")
  import shutil
  shutil.rmtree(killed / "deepall" / "checkpoints")
  (killed / "deepall" / "checkpoints").mkdir()
  checks.append(_run_module("medgen_jax.evaluate", "--workdir", str(killed)))
  checks.append(_run_module("medgen_jax.evaluate", "--workdir", str(tmp_path / "nothing")))
  checks.append(_run_module("medgen_jax.evaluate"))
  # train: the workdir is a file; no --config; no --workdir.
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  checks.append(_run_module("medgen_jax.train", "--config", str(REPO / "configs" / "quickstart.py"),
                            "--workdir", str(a_file)))
  checks.append(_run_module("medgen_jax.train", "--workdir", str(tmp_path / "w")))
  checks.append(_run_module("medgen_jax.train", "--config", str(REPO / "configs" / "quickstart.py")))
  checks.append(_run_module("medgen_jax.train", "--config", str(tmp_path / "none.py"), "--workdir", str(tmp_path / "w")))
  expected = ["recorded oracle_dice", f"{moved}: dataset folder does not exist", "has no checkpoint",
              "no run was started here", "--workdir is required", "is a file, not a folder",
              "--config is required", "--workdir is required", "none.py does not exist"]
  for done, text in zip(checks, expected):
    assert done.returncode in (1, 2), done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert text in done.stderr, done.stderr
    assert "bad config override" not in done.stderr
    assert done.stderr.startswith("error: ")


def test_failed_first_run_does_not_claim_its_workdir_and_progress_is_printed(dataset, tmp_path, capsys):
  missing = tmp_path / "no-data-here"
  with pytest.raises(Exception, match="dataset folder does not exist"):
    train_lib.train_and_evaluate(tiny_config(missing, num_steps=2), tmp_path / "run")
  assert not (tmp_path / "run" / "config.json").exists()
  capsys.readouterr()
  result = train_lib.train_and_evaluate(tiny_config(dataset, num_steps=2, eval_every=2, log_every=1,
                                                    progress_bar=True), tmp_path / "run")
  assert "| DeepAll |" in result["markdown"]
  # No terminal (pytest captures stdout): tqdm is off, so one plain line per log step.
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[deepall]")]
  assert len(lines) == 2 and lines[1].startswith("[deepall] step 2/2  loss ")
  assert "slices/s  ETA " in lines[1]


def test_val_selection_needs_validation_cases_and_missing_test_splits_are_said(tmp_path):
  small = make_sites_dataset(tmp_path / "small", sites=("A", "B", "C"), cases=2)
  with pytest.raises(Exception, match=r"eval.selection='val'.*no validation case.*Fix: set eval.selection='last'"):
    train_lib.train_and_evaluate(tiny_config(small), tmp_path / "run")
  assert not (tmp_path / "run" / "config.json").exists()
  with pytest.warns(UserWarning, match=r"\['A', 'B'\] have no in-domain test case"):
    result = train_lib.train_and_evaluate(
        tiny_config(small, num_steps=2, eval_every=2, **{"eval.selection": "last"}), tmp_path / "last")
  assert "no in-domain test volume for source site(s) ['A', 'B']" in result["markdown"]
  assert "selection rule: last checkpoint" in result["markdown"]


def test_only_process_zero_generates_data_and_writes_run_files(dataset, tmp_path, monkeypatch):
  from medgen_jax.data import pipeline
  data = pipeline.prepare_data(tiny_config(dataset).data, progress=None, build_train=False)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  (tmp_path / "w1").mkdir()
  train_lib._save_run_files(tiny_config(dataset), data, tmp_path / "w1")
  assert list((tmp_path / "w1").iterdir()) == []
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  (tmp_path / "w0").mkdir()
  train_lib._save_run_files(tiny_config(dataset), data, tmp_path / "w0")
  assert sorted(p.name for p in (tmp_path / "w0").iterdir()) == [
      "config.json", "data_info.json", "normalizer.json", "splits.json"]
  calls = []
  monkeypatch.setattr(pipeline, "ensure_benchmark", lambda *a, **k: calls.append(a))
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  config = tiny_config(tmp_path / "brain-sites")
  with pytest.raises(Exception, match="dataset folder does not exist"):
    pipeline.prepare_data(config.data, progress=None)
  assert calls == []  # process 1 waits for process 0 (barrier) instead of generating
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  with pytest.raises(Exception):
    pipeline.prepare_data(config.data, progress=None)
  assert len(calls) == 1


def _tiny_state():
  config = base_config()
  tx = make_optimizer(config.optimizer, num_steps=10)
  return create_train_state(0, UNet(4, base_features=4, depth=2), tx, input_shape=(1, 16, 16, 1))


def test_checkpoints_keep_the_best_of_each_recorded_metric_and_survive_torn_metrics(tmp_path):
  state = jax.device_get(_tiny_state())
  ckpts = Checkpoints(tmp_path / "ck", keep=1, selection_key="oracle_dice")
  scores = {1: (0.9, 0.1), 2: (0.1, 0.9), 3: (0.2, 0.2), 4: (0.3, 0.3)}  # step: (val, oracle)
  for step, (val, oracle) in scores.items():
    ckpts.save(step, state, meta={}, metrics={"val_dice": val, "oracle_dice": oracle})
  ckpts.wait()
  assert ckpts.steps() == [1, 2, 4]  # latest, best oracle (training rule) and best val
  assert ckpts.best_step() == 2
  ckpts.close()
  assert Checkpoints(tmp_path / "ck", selection_key="val_dice", read_only=True).best_step() == 1
  # A torn metrics file: read-only users get one line naming it; training moves the step aside.
  (tmp_path / "ck" / "4" / "metrics" / "metrics").write_text('{"val_dice": 0.')
  with pytest.raises(ValueError, match=r"ck/4: its metrics file .* is unreadable.*Fix: move that step"):
    Checkpoints(tmp_path / "ck", read_only=True)
  with pytest.warns(CheckpointWarning, match=r"ck/4 cannot be read.*moved to .*4.corrupt"):
    reopened = Checkpoints(tmp_path / "ck")
  assert reopened.steps() == [1, 2]


def test_a_checkpoint_of_another_structure_is_refused_not_moved(tmp_path):
  state = jax.device_get(_tiny_state())
  ckpts = Checkpoints(tmp_path / "ck")
  ckpts.save(1, {"params": state.params}, meta={})
  ckpts.wait()
  with pytest.raises(ValueError, match="another structure.*Fix: use the medgen_jax version"):
    ckpts.restore_latest(abstract_like(state))
  assert (tmp_path / "ck" / "1").is_dir() and not (tmp_path / "ck" / "1.corrupt").exists()


def test_non_finite_batchnorm_statistics_are_flagged():
  from medgen_jax.methods.deepall import finish_step
  config = base_config()
  tx = make_optimizer(config.optimizer, num_steps=10)
  state = _tiny_state()
  grads = jax.tree.map(jax.numpy.zeros_like, state.params)
  bad_stats = jax.tree.map(lambda x: x * np.inf, state.batch_stats)
  new, _ = finish_step(state, tx, grads, {"loss": jax.numpy.float32(0.5)}, bad_stats, axis_name=None,
                       bn_sync=True)
  assert int(new.first_bad_step) == 1


def test_prefetcher_keeps_order_and_reraises_errors_in_place():
  def make(i):
    if i == 3:
      raise StopIteration("ends a zip() silently if re-raised as is")
    return i * 10
  got = []
  with pytest.raises(RuntimeError, match="item 3 raised StopIteration"):
    with parallel.Prefetcher(make, range(6), size=2) as items:
      for i, item in zip(range(6), items):
        got.append(item)
  assert got == [0, 10, 20]


def test_sampler_or_model_errors_do_not_claim_the_workdir(dataset, tmp_path):
  # An episode of 3 domains from 2 source sites: the sampler refuses it before config.json exists.
  config = tiny_config(dataset, method="mldg", batch_size=12)
  with pytest.raises(Exception, match="at most 2 source sites"):
    train_lib.train_and_evaluate(config, tmp_path / "run")
  assert not (tmp_path / "run" / "config.json").exists()
