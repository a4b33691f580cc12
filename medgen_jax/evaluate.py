"""Command line: re-evaluate a saved run.

    python -m medgen_jax.evaluate --workdir DIR [--selection val|last|oracle]

reads DIR/config.json, DIR/splits.json and DIR/normalizer.json, restores the selected checkpoint
of each model (by the run's selection rule unless overridden; 'oracle' only where the run recorded
held-out scores, i.e. was trained with eval.selection='oracle') and rewrites DIR/results.md,
results.csv and results.json — or, under another rule than the run's, writes
DIR/results_<rule>.{md,csv,json} and leaves results.* (what predict uses) as they are. Problems (no run, no checkpoint, missing data) are one line each.
The evaluation library itself is medgen_jax/evaluation.py.
"""

from __future__ import annotations

import sys

from absl import app, flags

from medgen_jax.cli import run_cli_main

FLAGS = flags.FLAGS


def main(argv) -> int:
  del argv
  from medgen_jax import evaluation, runs  # imports JAX; keep --help fast

  config = runs.load_run_config(FLAGS.workdir)
  if FLAGS.selection:
    config.eval.selection = FLAGS.selection
  result = evaluation.evaluate_run(config, FLAGS.workdir)
  print(result["markdown"])
  return 0


def run():
  flags.DEFINE_string("workdir", None, "run directory written by medgen_jax.train")
  flags.DEFINE_enum("selection", None, ["val", "last", "oracle"], "override the run's checkpoint selection")
  run_cli_main(main, usage="python -m medgen_jax.evaluate --workdir DIR [--selection val|last|oracle]",
               required=("workdir",))


if __name__ == "__main__":
  run()
