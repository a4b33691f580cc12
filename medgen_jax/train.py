"""Command line: `python -m medgen_jax.train --config configs/<x>.py --workdir DIR`.

Overrides: `--config.key=value` (e.g. `--config.num_steps=200 --config.data.held_out='("D",)'`).
The config is locked: an unknown key fails with a message naming close matches. Rerunning the
same command resumes from the newest checkpoint in DIR. Expected failures (bad data, a workdir
holding another config, a diverged run, a full disk) print one line and exit 1 (medgen_jax/cli.py).
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from medgen_jax import parallel
from medgen_jax.cli import run_cli_main

USAGE = "python -m medgen_jax.train --config configs/<x>.py --workdir DIR [--config.key=value ...]"

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (created; resumed if it exists)")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "multi-process: host:port of process 0 (jax.distributed); "
    "not needed on TPU VMs and under Slurm, where JAX reads it from the environment")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-process: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-process: this process's index, 0 .. N-1")


def main(argv) -> int:
  del argv
  parallel.initialize_distributed(coordinator_address=_COORDINATOR.value,
                                  num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  from medgen_jax import train_lib  # after distributed init: it touches devices

  result = train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if parallel.is_main_process():
    print(result["markdown"])
  return 0


def run():
  from medgen_jax.train_lib import TrainingDivergedError
  run_cli_main(main, usage=USAGE, required=("config", "workdir"), expected=(TrainingDivergedError,),
               config_files=("config",))


if __name__ == "__main__":
  run()
