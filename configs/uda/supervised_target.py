"""Supervised target (upper bound, uses TARGET LABELS): DeepAll trained on the target modality's
labelled train cases, tested on the same target test volumes as the adaptation methods.

    python -m medgen_jax.train --config configs/uda/supervised_target.py:quick --workdir runs/supervised_ct
    python -m medgen_jax.sweep --uda --config configs/uda/supervised_target.py:quick --directions MR:CT,CT:MR \
        --seeds 2 --workdir runs/uda_cardiac

Arguments as configs/uda/source_only.py (the sweep sets data.sites to the direction's target).
Numbers: see the README's cross-modality table.
"""

from medgen_jax.config import base_config, uda_benchmark


def get_config(arg=None):
  return uda_benchmark(base_config(), arg, method="supervised_target", num_steps=20_000, quick_steps=600)
