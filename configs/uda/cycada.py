"""CyCADA (Hoffman et al., ICML 2018) on the cross-modality benchmarks, MR -> CT by default: the
source U-Net f_S first (`cycada.pretrain_steps`), then a CycleGAN with the semantic consistency
loss through the frozen f_S, and the task model f_T (starting from f_S) trained on the translated
source images plus a feature-level GAN on its bottleneck (methods/uda/cycada.py). The target test
volumes are scored with f_T at the last step.

    python -m medgen_jax.train --config configs/uda/cycada.py:quick --workdir runs/cycada_mr2ct_quick
    python -m medgen_jax.train --config configs/uda/cycada.py --workdir runs/cycada_mr2ct

Full size (a GPU run): 10k source steps then 10k adaptation steps. `:quick`: 600 source steps
(= the source-only run), then QUICK_STEPS - 600 adaptation steps with CPU-sized networks.
Sizes, data, normalization: config.uda_benchmark and config.image_translation.

Numbers (2-core CPU shared with other jobs, 2026-11-28, 2 seeds, `sweep --uda`, mean Dice % on
the target test volumes, last checkpoint; about 6 min per run): `:quick` MR -> CT 30.73 ± 2.82, CT -> MR 51.56 ± 4.96 (README: per structure, ASD).
Full size not measured (no GPU was lent).
"""

from medgen_jax.config import base_config, image_translation, uda_benchmark

QUICK_STEPS = 900


def get_config(arg=None):
  quick = bool(arg) and arg.endswith("quick")
  config = uda_benchmark(base_config(), arg, method="cycada", num_steps=20_000, quick_steps=QUICK_STEPS)
  config.cycada.pretrain_steps = 600 if quick else 10_000
  return image_translation(config, arg)
