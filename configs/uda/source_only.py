"""Source only (no adaptation) on the cross-modality benchmarks: DeepAll on the labelled source
modality, tested on the target modality's test volumes — the "no adaptation" row.

    python -m medgen_jax.train --config configs/uda/source_only.py:quick --workdir runs/source_only_mr2ct
    python -m medgen_jax.sweep --uda --config configs/uda/source_only.py:quick --config configs/uda/dann.py:quick \
        --directions MR:CT,CT:MR --seeds 2 --workdir runs/uda_cardiac

Arguments: (none) cardiac-phantom MR -> CT at full size (256x256, a GPU run); `quick` the same at
64x64 on the CPU; `brain` / `brain_quick`: brain-modalities T1 -> T2 (the sweep's --directions
chooses other pairs, e.g. T1:CT). Settings: medgen_jax/config.uda_benchmark.

Numbers (2-core CPU, 2026-11-28, 2 seeds, `sweep --uda`, mean Dice % on the target test volumes,
last checkpoint): `:quick` MR -> CT 11.60 ± 3.07, CT -> MR 38.81 ± 7.77;
`:brain_quick` T1 -> T2 25.40 ± 0.09, T1 -> CT 15.92 ± 1.39 (README: per structure, ASD).
Full size not measured (no GPU was lent).
"""

from medgen_jax.config import base_config, uda_benchmark


def get_config(arg=None):
  return uda_benchmark(base_config(), arg, method="source_only", num_steps=20_000, quick_steps=600)
