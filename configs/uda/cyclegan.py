"""CycleGAN pixel-level adaptation (Zhu et al., ICCV 2017) on the cross-modality benchmarks, MR -> CT
by default: source images translated to the target appearance (ResNet generators, PatchGANs,
LSGAN, L1 cycle lambda = 10, image pools of 50), and the U-Net trained on the translations with
the source labels, evaluated on the real target test volumes at the last step
(methods/uda/cyclegan.py).

    python -m medgen_jax.train --config configs/uda/cyclegan.py:quick --workdir runs/cyclegan_mr2ct_quick
    python -m medgen_jax.train --config configs/uda/cyclegan.py --workdir runs/cyclegan_mr2ct

Full size (default, a GPU run): 256x256 slices, SIFA's translation networks (generator 32
features, 9 blocks; PatchGAN 64), Adam 2e-4 (b1 0.5) for them, U-Net 16-..-256 with Adam 1e-3
(cosine), batch 8 + 8, 20k steps. `:quick`: 64x64 slices at 3 mm, generator 8 features / 3
blocks, PatchGAN 16, U-Net 8-..-128, QUICK_STEPS steps on the 2-core CPU. `brain` /
`brain_quick`: brain-modalities T1 -> T2. Intensities: each modality's training range mapped to
[-1, 1] (data.normalization.name='site_range'). Data and split: config.uda_benchmark.

Numbers (2-core CPU shared with other jobs, 2026-11-28, 2 seeds, `sweep --uda`, mean Dice % on
the target test volumes, last checkpoint; 4.5-19 min per run): `:quick` MR -> CT 45.98 ± 1.88, CT -> MR 53.44 ± 2.50 (README: per structure, ASD).
Full size not measured (no GPU was lent).
"""

from medgen_jax.config import base_config, image_translation, uda_benchmark

QUICK_STEPS = 600


def get_config(arg=None):
  config = uda_benchmark(base_config(), arg, method="cyclegan", num_steps=20_000, quick_steps=QUICK_STEPS)
  return image_translation(config, arg)
