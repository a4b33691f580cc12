"""MetaReg on brain-sites: meta-learned weighted-L1 regularizer of the U-Net decoder (Balaji et al.,
NeurIPS 2018), 3 source sites, held-out D.

    python -m medgen_jax.train --config configs/metareg_brain.py --workdir runs/metareg_brain
    python -m medgen_jax.sweep --config configs/metareg_brain.py:quick --held-out all --seeds 3 --workdir runs/sweep_brain

Two phases (methods/metareg.py): the first half of the steps meta-trains (F = encoder shared, one
decoder per site, φ by the exact second-order ∂L_b/∂φ through the regularized inner steps), the
second half trains the evaluated F + a fresh decoder on L + Σ φ|θ| with φ frozen. `:quick` = 300
steps = 150 meta-training + 150 final-training (metareg.meta_fraction = 0.5); full size = 10k + 10k.
Sizes as configs/deepall_brain.py (full / `:quick`); batch 12 (quick) / 24 = 4 / 8 slices per site.

Numbers: full size not measured (GPU). `:quick`, held-out D, 3 seeds (2026-11-29, README "The
talk's DG table"): Dice 52.90 ± 1.55 %, ASD 43.72 ± 54.82 mm (every seed selected step 300, in
the final phase).
"""

from medgen_jax.config import base_config, cpu_sized_brain, gpu_sized_brain

QUICK_STEPS = 300


def get_config(arg=None):
  config = base_config()
  config.method = "metareg"
  config.data.held_out = ("D",)
  config.metareg.meta_fraction = 0.5
  config.metareg.inner_steps = 1
  config.metareg.inner_lr = 1e-3
  if arg == "quick":
    return cpu_sized_brain(config, num_steps=QUICK_STEPS)
  return gpu_sized_brain(config)
