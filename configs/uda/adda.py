"""ADDA (Tzeng et al., CVPR 2017) on the cross-modality benchmarks, MR -> CT by default: the U-Net
is first trained on the labelled source (phase 1, `adda.pretrain_steps` = two thirds of the run:
exactly the source-only run), then its
encoder (down* + bottleneck, initialised from the source model) is adapted against a bottleneck
discriminator with inverted labels while the decoder and head stay frozen; the target's
train+val slices are seen without labels, its test cases are scored at the last step.

    python -m medgen_jax.train --config configs/uda/adda.py:quick --workdir runs/adda_mr2ct_quick
    python -m medgen_jax.train --config configs/uda/adda.py --workdir runs/adda_mr2ct
    python -m medgen_jax.sweep --uda --config configs/uda/source_only.py:quick --config configs/uda/adda.py:quick \
        --directions MR:CT,CT:MR --seeds 2 --workdir runs/uda_cardiac

Phase 1: config.optimizer (Adam 1e-3, cosine over phase 1's steps). Phase 2: Adam 2e-4, b1 0.5
for D and the target encoder (the paper's setting); D = 3 stride-2 convs (32-64-128) + pooling +
linear (`adda.*`), not the paper's 3 FC layers (methods/uda/adda.py says what differs).
Full size (default): 256x256 slices at 0.75 mm, U-Net 16-..-256, batch 8 + 8, 20k + 10k steps
(a GPU run); `:quick` 64x64 at 3 mm, U-Net 8-..-128, 600 + 300 steps on the 2-core CPU;
`brain` / `brain_quick`: brain-modalities T1 -> T2. Data, split and sizes: config.uda_benchmark.

Numbers (2-core CPU, 2026-11-28, 2 seeds, `sweep --uda`, mean Dice % on the target test volumes,
last checkpoint): `:quick` MR -> CT 5.91 ± 1.29, CT -> MR 19.83 ± 13.10;
`:brain_quick` T1 -> T2 19.10 ± 0.87, T1 -> CT 28.65 ± 1.21 (README: per structure, ASD).
Full size not measured (no GPU was lent).
"""

from medgen_jax.config import base_config, uda_benchmark

QUICK_STEPS = 900


def get_config(arg=None):
  # Phase 1 is exactly the source-only run (same steps, schedule, seed and source batches), so
  # the adaptation phase starts from the "no adaptation" row's model.
  config = uda_benchmark(base_config(), arg, method="adda", num_steps=30_000, quick_steps=QUICK_STEPS)
  config.adda.pretrain_steps = config.num_steps * 2 // 3
  return config
