"""Supervised target (upper bound, uses TARGET LABELS): DeepAll trained on the target modality's
labelled train cases, tested on the same target test volumes as the adaptation methods.

    python -m medgen_jax.train --config configs/uda/supervised_target.py:quick --workdir runs/supervised_ct
    python -m medgen_jax.sweep --uda --config configs/uda/supervised_target.py:quick --directions MR:CT,CT:MR \
        --seeds 2 --workdir runs/uda_cardiac

Arguments as configs/uda/source_only.py (the sweep sets data.sites to the direction's target).
Numbers (2-core CPU, 2026-11-28, 2 seeds, `sweep --uda`, mean Dice % on the target test volumes,
last checkpoint): `:quick` MR -> CT 77.88 ± 0.08, CT -> MR 69.84 ± 7.13;
`:brain_quick` T1 -> T2 73.62 ± 0.49, T1 -> CT 63.59 ± 1.29 (README: per structure, ASD).
Full size not measured (no GPU was lent).
"""

from medgen_jax.config import base_config, uda_benchmark


def get_config(arg=None):
  return uda_benchmark(base_config(), arg, method="supervised_target", num_steps=20_000, quick_steps=600)
