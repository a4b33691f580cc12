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
from medgen_jax import parallel, train_lib
from medgen_jax.checkpoint import CheckpointWarning, Checkpoints, abstract_like
from medgen_jax.config import base_config
from medgen_jax.data.sampler import SliceSampler
from medgen_jax.methods.deepall import make_train_step
from medgen_jax.models import UNet
from medgen_jax.train_state import create_train_state, make_optimizer

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
  assert list((run / "tensorboard").glob("events.out.tfevents*"))
  records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
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
  again = train_lib.evaluate_run(train_lib.config_from_json(json.loads((run / "config.json").read_text())), run)
  assert again["markdown"] == result["markdown"]


def test_killed_run_resumes_bit_identical(dataset, tmp_path, monkeypatch):
  straight = tmp_path / "straight"
  train_lib.train_and_evaluate(tiny_config(dataset, **{"checkpoint.every": 2}), straight)

  original_next = SliceSampler.__next__

  def crash_after_5_steps(self):  # between checkpoints: step 5 is redone after the restart
    if self.step == 5:
      raise KeyboardInterrupt("simulated kill")
    return original_next(self)

  interrupted = tmp_path / "interrupted"
  monkeypatch.setattr(SliceSampler, "__next__", crash_after_5_steps)
  with pytest.raises(KeyboardInterrupt):
    train_lib.train_and_evaluate(tiny_config(dataset, **{"checkpoint.every": 2}), interrupted)
  assert sorted(int(p.name) for p in (interrupted / "deepall" / "checkpoints").iterdir()
                if p.name.isdigit()) == [2, 3, 4]
  monkeypatch.setattr(SliceSampler, "__next__", original_next)
  train_lib.train_and_evaluate(tiny_config(dataset, **{"checkpoint.every": 2}), interrupted)
  assert_trees_equal(saved_state(straight, 6), saved_state(interrupted, 6))


def test_workdir_with_a_different_config_is_refused(dataset, tmp_path):
  train_lib.train_and_evaluate(tiny_config(dataset, num_steps=3), tmp_path / "run")
  with pytest.raises(ValueError, match="different config.*optimizer.learning_rate"):
    train_lib.train_and_evaluate(tiny_config(dataset, num_steps=3, **{"optimizer.learning_rate": 0.1}),
                                 tmp_path / "run")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(dataset, tmp_path, monkeypatch):
  original = SliceSampler.batch_at

  def poisoned(self, step):
    batch = original(self, step)
    if step == 4:
      batch["image"] = np.full_like(batch["image"], np.nan)
    return batch

  monkeypatch.setattr(SliceSampler, "batch_at", poisoned)
  with pytest.raises(train_lib.TrainingDivergedError, match=r"non-finite loss \(nan\) at step 5.*step 3"):
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
  with pytest.warns(CheckpointWarning, match=r"ck/2 cannot be read"):
    restored, meta, step = ckpts.restore_latest(abstract_like(state))
  assert step == 1 and meta == {"sampler": {"step": 1}} and int(restored.step) == 1
  assert (tmp_path / "ck" / "2").exists()  # nothing deleted by a failed restore


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
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
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
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  evaluated = subprocess.run([sys.executable, "-m", "medgen_jax.evaluate", "--workdir", str(tmp_path / "run"),
                              "--selection", "last"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)
  assert evaluated.returncode == 0, evaluated.stderr
  assert "selection rule: last checkpoint" in evaluated.stdout


def test_bfloat16_compute_keeps_float32_params():
  config = base_config()
  tx = make_optimizer(config.optimizer, num_steps=10)
  model = UNet(4, base_features=4, depth=2, dtype=jax.numpy.bfloat16)
  state = create_train_state(0, model, tx, input_shape=(1, 16, 16, 1))
  step = jax.jit(make_train_step(model, tx, config, num_classes=4))
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(4, 16, 16, 1)).astype(np.float32),
           "label": rng.integers(0, 4, size=(4, 16, 16)).astype(np.int32)}
  new_state, metrics = step(state, batch, jax.random.PRNGKey(0))
  assert np.isfinite(float(metrics["loss"]))
  assert {x.dtype for x in jax.tree.leaves(new_state.params)} == {np.dtype("float32")}
  assert {x.dtype for x in jax.tree.leaves(new_state.opt_state) if hasattr(x, "dtype") and x.ndim} == {np.dtype("float32")}
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(new_state.params)))
