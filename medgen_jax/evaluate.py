"""Evaluation: whole volumes predicted, scored in 3-D per class and per site, in mm.

    python -m medgen_jax.evaluate --workdir DIR [--selection val|last|oracle]

re-evaluates a saved run: reads DIR/config.json, restores the selected checkpoint of each model
(by the run's selection rule unless overridden) and rewrites DIR/results.md and results.csv.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags

from medgen_jax import metrics
from medgen_jax.inference import predict_volume


def evaluate_cases(predict_fn, variables, cases_by_site, *, normalizer, data_config, num_classes: int,
                   batch_size: int, distances: bool = True, method: str = "", role_of=None) -> list[dict]:
  """One record per volume: per-class Dice (and ASSD/HD95 in mm), the empty-mask flags."""
  records = []
  for site, cases in cases_by_site.items():
    for case in cases:
      pred = predict_volume(predict_fn, variables, case.image, case.spacing, normalizer=normalizer,
                            data_config=data_config, batch_size=batch_size)
      scores = metrics.score_volume(pred, case.label, num_classes=num_classes, spacing=case.spacing,
                                    distances=distances)
      records.append({"method": method, "site": site, "case": case.case_id,
                      "role": role_of(site) if role_of else "", **scores})
  return records


FLAGS = flags.FLAGS


def main(argv):
  del argv
  from medgen_jax import train_lib  # the trainer owns run layout and model restoration

  workdir = Path(FLAGS.workdir)
  config_path = workdir / "config.json"
  if not config_path.is_file():
    print(f"{config_path}: no saved run here. Fix: give the --workdir of a run made by "
          "python -m medgen_jax.train", file=sys.stderr)
    return 1
  config = train_lib.config_from_json(json.loads(config_path.read_text()))
  if FLAGS.selection:
    config.eval.selection = FLAGS.selection
  result = train_lib.evaluate_run(config, workdir)
  print(result["markdown"])
  return 0


def run():
  flags.DEFINE_string("workdir", None, "run directory written by medgen_jax.train", required=True)
  flags.DEFINE_enum("selection", None, ["val", "last", "oracle"], "override the run's checkpoint selection")
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
