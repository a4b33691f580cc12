"""DANN (Ganin & Lempitsky 2015) on the cross-modality benchmarks: a domain classifier on the
U-Net bottleneck behind a gradient reversal layer (λ_p = 2/(1+exp(−10p)) − 1), trained with the
segmenter in one step; the target modality's train+val slices are seen without labels.

    python -m medgen_jax.train --config configs/uda/dann.py:quick --workdir runs/dann_mr2ct
    python -m medgen_jax.sweep --uda --config configs/uda/source_only.py:quick --config configs/uda/dann.py:quick \
        --directions MR:CT,CT:MR --seeds 2 --workdir runs/uda_cardiac

Segmenter: config.optimizer (Adam 1e-3, cosine) as every segmenter here, not the paper's SGD
schedule; classifier: 3 stride-2 convs (32-64-128) + global pooling + linear, Adam 1e-3 (`dann.*`).
Arguments as configs/uda/source_only.py.

Numbers (2-core CPU, 2026-11-28, 2 seeds, `sweep --uda`, mean Dice % on the target test volumes,
last checkpoint): `:quick` MR -> CT 37.62 ± 1.07, CT -> MR 45.46 ± 1.71;
`:brain_quick` T1 -> T2 21.48 ± 0.13, T1 -> CT 25.95 ± 1.83 (README: per structure, ASD).
Full size not measured (no GPU was lent).
"""

from medgen_jax.config import base_config, uda_benchmark


def get_config(arg=None):
  return uda_benchmark(base_config(), arg, method="dann", num_steps=20_000, quick_steps=600)
