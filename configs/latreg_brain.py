"""LatReg on brain-sites: DeepAll's U-Net plus a regularization network on the bottleneck whose
site prediction is pushed towards uniform (Aslani et al., ISBI 2020; methods/latreg.py).

    python -m medgen_jax.train --config configs/latreg_brain.py --workdir runs/latreg_brain
    python -m medgen_jax.train --config configs/latreg_brain.py:quick --workdir runs/latreg_brain_quick
    python -m medgen_jax.sweep --config configs/latreg_brain.py:quick --held-out all --seeds 3 --workdir runs/sweep_brain

The released "uniform entropy" variant: L_seg + 0.3 · CE(uniform, softmax(C_ψ(bottleneck))), the
classifier Flatten → 2 × Dense(1024) + ReLU → Dense(sites) trained with the segmenter (same
optimizer kind). Other released variants: `--config.latreg.loss=randomized
--config.latreg.weight=0.1`, `--config.latreg.loss=correlation --config.latreg.weight=0.2`; a
DANN-style site classifier through gradient reversal (not released): `latreg.loss=adversarial`.
Sizes as configs/deepall_brain.py (full / `:quick`; quick flattens a 5x5x128 bottleneck).

Numbers: full size not measured (GPU). `:quick`, held-out D, 3 seeds (2026-11-29, README "The
talk's DG table"): Dice 57.35 ± 3.80 %, ASD 5.21 ± 4.01 mm.
"""

from medgen_jax.config import base_config, cpu_sized_brain, gpu_sized_brain

QUICK_STEPS = 300


def get_config(arg=None):
  config = base_config()
  config.method = "latreg"
  config.data.held_out = ("D",)
  config.latreg.loss = "uniform"
  config.latreg.weight = 0.3      # entropy_uniform_net.py: loss_weights=[1, 0.3]
  if arg == "quick":
    return cpu_sized_brain(config, num_steps=QUICK_STEPS)
  return gpu_sized_brain(config)
