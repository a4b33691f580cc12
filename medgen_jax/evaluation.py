"""Scoring whole volumes: the evaluation library below the trainer and the CLIs.

`evaluate_cases` predicts every volume of every site (medgen_jax/inference.py) and scores it in
3-D per foreground class (medgen_jax/metrics.py): Dice and, with `distances`, ASSD and HD95 in mm.
"""

from __future__ import annotations

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
