"""DeepAll + BigAug on brain-sites: stacked image-quality, appearance and spatial transforms,
each with probability 0.5 (Zhang et al., TMI 2020), on the pooled source sites.

    python -m medgen_jax.train --config configs/bigaug_brain.py --workdir runs/bigaug_brain

Sizes as configs/deepall_brain.py (full / `:quick`).

Numbers: full size not measured (GPU). `:quick`, held-out D, 3 seeds (2026-11-29, README "The
talk's DG table"): Dice 54.95 ± 1.97 %, ASD 43.34 ± 55.13 mm (one seed never segments CSF).
"""

from medgen_jax.config import base_config, cpu_sized_brain, gpu_sized_brain

QUICK_STEPS = 300


def get_config(arg=None):
  config = base_config()
  config.method = "deepall"
  config.augment.enabled = True
  config.data.held_out = ("D",)
  if arg == "quick":
    return cpu_sized_brain(config, num_steps=QUICK_STEPS)
  return gpu_sized_brain(config)
