"""Multi-host data parallelism with real processes: 2 processes x 2 CPU devices, joined by
jax.distributed (gloo), against 1 process x 4 devices (this test process).

The processes run the real CLI (`python -m medgen_jax.train` through launch/local_multiprocess.sh
or, where one is to be killed, started one by one). Each draws the same global batch and feeds
its devices their rows of it, so the parameters must match the one-process run; a run whose
process 1 is killed mid-training and is restarted on both processes resumes from the last
checkpoint and still ends on the same parameters.

The runs use SGD: the gloo all-reduce sums in another order than the in-process one (rounding-level
differences, ~1e-7), and Adam's g / (sqrt(v) + eps) turns those into learning-rate-sized ones on
gradient entries near eps (2nd-order MLDG has such entries: 1.6e-4 after 2 steps), while SGD
keeps the comparison at rounding level (1.2e-7 after 6 steps for parameters that moved by 0.07).
Dropout is on, with masks drawn per device from the step key folded with the global device index:
a run whose rows reach other device positions than in the one-process run (processes' devices
out of order, a process feeding another's rows) then differs by ~1e-2 instead of ~5e-8 (measured),
where the loss alone is blind to that permutation.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import make_sites_dataset

from medgen_jax import parallel, train_lib

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launch" / "local_multiprocess.sh"

CONFIG = """
from medgen_jax.config import base_config

def get_config(method):
  c = base_config()
  c.method = method
  c.data.held_out = ("C",)
  c.data.in_plane_shape = (16, 16)
  c.model.base_features = 4
  c.model.depth = 1
  c.model.dropout = 0.5        # masks drawn per device (the step key folded with the GLOBAL device index):
                               # the runs then agree only if every row reaches the same device position
  c.batch_size = 8             # MLDG: 1 meta-train + 1 meta-test site, 4 slices each, 1 per device
  c.meta.meta_train_domains = 1
  c.num_steps = {num_steps}
  c.log_every = 2
  c.eval_every = 100           # no validation pass: the runs are compared on their parameters
  c.checkpoint.every = 2
  c.eval.selection = "last"
  c.eval.distances = False
  c.eval.batch_size = 8
  c.progress_bar = False
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.05
  return c
"""
NUM_STEPS = {"deepall": 4, "mldg": 6}  # MLDG: the kill after step 2 has steps 3..6 to land in


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  data = make_sites_dataset(root / "toy", sites=("A", "B", "C"), cases=4)
  configs = {}
  for method, steps in NUM_STEPS.items():
    configs[method] = root / f"tiny_{method}.py"
    configs[method].write_text(CONFIG.format(num_steps=steps))
  return root, data, configs


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int | None = None):
  """This process's environment (conftest's XLA flags and compilation cache) for the processes:
  the launcher sets each one's device count, or `devices` does."""
  env = dict(os.environ, PORT=str(_free_port()), JAX_PLATFORMS="cpu")
  if devices:
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  return env


def _args(setup, method: str, workdir: Path) -> list[str]:
  _, data, configs = setup
  return ["--config", f"{configs[method]}:{method}", "--workdir", str(workdir), f"--config.data.root={data}"]


def _launch(setup, method: str, workdir: Path) -> subprocess.CompletedProcess:
  done = subprocess.run(["bash", str(LAUNCHER), "2", "2", *_args(setup, method, workdir)], cwd=REPO,
                        env=_env(), capture_output=True, text=True, timeout=400)
  assert done.returncode == 0, done.stderr[-3000:]
  return done


def _one_process_run(setup, method: str) -> Path:
  """The same config trained in this process on its 4 devices."""
  import runpy
  root, data, configs = setup
  workdir = root / f"one_process_{method}"
  config = runpy.run_path(str(configs[method]))["get_config"](method)
  config.data.root = str(data)
  assert jax.process_count() == 1 and jax.local_device_count() == 4
  train_lib.train_and_evaluate(config, workdir)
  return workdir


def _params(workdir: Path, method: str, step: int):
  state = ocp.StandardCheckpointer().restore(workdir.absolute() / method / "checkpoints" / str(step) / "state")
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(state["params"])]


def _assert_same_training(one: Path, two: Path, method: str):
  final = NUM_STEPS[method]
  a, b, before = _params(one, method, final), _params(two, method, final), _params(one, method, final - 2)
  diff = max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))
  moved = max(float(np.max(np.abs(x - y))) for x, y in zip(a, before))
  assert moved > 1e-3, moved  # the compared parameters really changed in the last two steps
  assert diff <= 1e-6, diff
  # written once: one record per (step, kind) in metrics.jsonl, one results file
  records = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
  keys = [(r["step"], r["kind"]) for r in records]
  assert len(keys) == len(set(keys)) and (final, "train") in keys
  assert json.loads((two / "results.json").read_text())


def test_process_rows_split_a_global_batch_into_contiguous_blocks():
  batch = {"image": np.arange(8 * 3).reshape(8, 3), "meta": {"domain": np.arange(8)}}
  blocks = [parallel.process_rows(batch, process_index=p, process_count=2) for p in range(2)]
  np.testing.assert_array_equal(blocks[1]["image"], np.arange(12, 24).reshape(4, 3))
  np.testing.assert_array_equal(np.concatenate([b["meta"]["domain"] for b in blocks]), np.arange(8))
  with pytest.raises(ValueError, match="multiple of"):
    parallel.process_rows({"x": np.zeros(6)}, process_index=0, process_count=4)


def test_global_devices_hold_each_process_s_devices_as_one_block_in_process_order(monkeypatch):
  """The pmapped axis is [process 0's devices, process 1's, ...] whatever order jax.devices()
  lists them in (it may interleave processes), so process p's devices hold the p-th block of the
  global batch, the rows process_rows gives it."""
  from types import SimpleNamespace
  fake = [SimpleNamespace(process_index=p, id=i) for p, i in ((1, 3), (0, 1), (1, 2), (0, 0))]
  monkeypatch.setattr(jax, "devices", lambda *a, **k: list(fake))
  assert [(d.process_index, d.id) for d in parallel.global_devices()] == [(0, 0), (0, 1), (1, 2), (1, 3)]


def test_distributed_flags_come_together(monkeypatch):
  monkeypatch.delenv("MEDGEN_JAX_DISTRIBUTED", raising=False)
  with pytest.raises(ValueError, match="--process_id missing"):
    parallel.initialize_distributed(coordinator_address="127.0.0.1:1", num_processes=2)
  with pytest.raises(ValueError, match="not in 0 .. --num_processes-1 = 1"):
    parallel.initialize_distributed(coordinator_address="127.0.0.1:1", num_processes=2, process_id=2)
  assert parallel.initialize_distributed() is False  # no flags, no MEDGEN_JAX_DISTRIBUTED: one process


def test_two_processes_train_deepall_like_one_process_with_all_devices(setup):
  root = setup[0]
  two = root / "two_processes_deepall"
  done = _launch(setup, "deepall", two)
  assert done.stdout.count("# medgen_jax results") == 1  # process 1 prints nothing
  _assert_same_training(_one_process_run(setup, "deepall"), two, "deepall")


def test_second_order_mldg_killed_process_and_restart_resume_exactly(setup):
  """Process 1 is killed (SIGKILL) once the step-2 checkpoint exists, then process 0 (it would
  wait for process 1 in the next collective); the same command on both resumes and ends on the
  uninterrupted one-process run's parameters."""
  root, _, configs = setup
  assert "first_order" not in configs["mldg"].read_text()  # the default: exact second order
  two = root / "two_processes_mldg"
  env, port = _env(devices=2), _free_port()
  # stderr to files, not pipes: an unread pipe that fills up would stall a process, and reading
  # one of a process that is still running would wait for it forever
  logs = [root / f"mldg_process_{i}.stderr" for i in range(2)]
  procs = []
  for i, log in enumerate(logs):
    with log.open("w") as err:
      procs.append(subprocess.Popen([sys.executable, "-m", "medgen_jax.train", "--coordinator_address",
                                     f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i),
                                     *_args(setup, "mldg", two)],
                                    cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err))
  checkpoints = two / "mldg" / "checkpoints"
  deadline = time.monotonic() + 300
  try:
    while not (checkpoints / "2").is_dir():
      assert time.monotonic() < deadline and all(p.poll() is None for p in procs), logs[0].read_text()[-3000:]
      time.sleep(0.02)
  finally:
    for p in reversed(procs):
      p.send_signal(signal.SIGKILL)
      p.wait()
  saved = sorted(int(d.name) for d in checkpoints.iterdir() if d.name.isdigit())
  assert saved and saved[-1] < NUM_STEPS["mldg"], saved  # killed mid-run

  restart = _launch(setup, "mldg", two)
  # The restart trains from the newest checkpoint on: it logs (every 2 steps) none of the steps
  # before it, and metrics.jsonl holds each of them once.
  final = NUM_STEPS["mldg"]
  logged = [int(line.split("step ")[1].split("/")[0]) for line in restart.stdout.splitlines()
            if line.startswith("[mldg] step ")]
  assert logged == list(range(saved[-1] + 2, final + 1, 2)), (saved, logged)
  records = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
  train_steps = [r["step"] for r in records if r["kind"] == "train"]
  assert train_steps == list(range(2, final + 1, 2)), train_steps
  _assert_same_training(_one_process_run(setup, "mldg"), two, "mldg")
