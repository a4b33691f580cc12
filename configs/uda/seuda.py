"""SeUDA (Chen et al., MLMI 2018) on the cross-modality benchmarks, MR -> CT by default: the U-Net
trained on the labelled source (`seuda.pretrain_steps`, exactly the source-only run), then frozen
while a CycleGAN learns target -> source with the semantic-aware mask discriminator (lambda_sem =
0.5, lambda_cyc = 10: unverified weights, see methods/uda/seuda.py); at test time every target
image is translated to the source appearance and segmented by the frozen source model.

    python -m medgen_jax.train --config configs/uda/seuda.py:quick --workdir runs/seuda_mr2ct_quick
    python -m medgen_jax.train --config configs/uda/seuda.py --workdir runs/seuda_mr2ct

Full size (a GPU run): 10k source steps then 10k translation steps, SIFA's translation networks.
`:quick`: 600 source steps (= the source-only run: same seed, schedule and batches), then
QUICK_STEPS - 600 translation steps with CPU-sized networks. Sizes, data, normalization:
config.uda_benchmark and config.image_translation.

Numbers (2-core CPU shared with other jobs, 2026-11-28, 2 seeds, `sweep --uda`, mean Dice % on
the target test volumes, last checkpoint; 8-21 min per run): `:quick` MR -> CT 51.92 ± 6.18, CT -> MR 55.95 ± 3.36 (README: per structure, ASD).
Full size not measured (no GPU was lent).
"""

from medgen_jax.config import base_config, image_translation, uda_benchmark

QUICK_STEPS = 900


def get_config(arg=None):
  quick = bool(arg) and arg.endswith("quick")
  config = uda_benchmark(base_config(), arg, method="seuda", num_steps=20_000, quick_steps=QUICK_STEPS)
  config.seuda.pretrain_steps = 600 if quick else 10_000
  return image_translation(config, arg)
