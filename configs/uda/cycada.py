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

Numbers: see the README's cross-modality table (2 seeds, `sweep --uda`).
"""

from medgen_jax.config import base_config, image_translation, uda_benchmark

QUICK_STEPS = 900


def get_config(arg=None):
  quick = bool(arg) and arg.endswith("quick")
  config = uda_benchmark(base_config(), arg, method="cycada", num_steps=20_000, quick_steps=QUICK_STEPS)
  config.cycada.pretrain_steps = 600 if quick else 10_000
  return image_translation(config, arg)
