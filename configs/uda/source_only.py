"""Source only (no adaptation) on the cross-modality benchmarks: DeepAll on the labelled source
modality, tested on the target modality's test volumes — the "no adaptation" row.

    python -m medgen_jax.train --config configs/uda/source_only.py:quick --workdir runs/source_only_mr2ct
    python -m medgen_jax.sweep --uda --config configs/uda/source_only.py:quick --config configs/uda/dann.py:quick \
        --directions MR:CT,CT:MR --seeds 2 --workdir runs/uda_cardiac

Arguments: (none) cardiac-phantom MR -> CT at full size (256x256, a GPU run); `quick` the same at
64x64 on the CPU; `brain` / `brain_quick`: brain-modalities T1 -> T2 (the sweep's --directions
chooses other pairs, e.g. T1:CT). Settings: medgen_jax/config.uda_benchmark.

Numbers: see the README's cross-modality table (measured with the sweep command above).
"""

from medgen_jax.config import base_config, uda_benchmark


def get_config(arg=None):
  return uda_benchmark(base_config(), arg, method="source_only", num_steps=20_000, quick_steps=600)
