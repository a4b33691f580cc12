"""DeepAll on brain-sites (the talk's brain-tissue experiment: four domains, one held out).

    python -m medgen_jax.train --config configs/deepall_brain.py --workdir runs/deepall_brain
    python -m medgen_jax.sweep --config configs/deepall_brain.py:quick --config configs/masf_brain.py:quick \
        --held-out all --seeds 3 --workdir runs/sweep_brain

Full size (default): native 2 mm grid (99x117 slices padded to 128x128), U-Net 16-32-64-128 + 256,
20k steps of batch 24 — a GPU run. `:quick` = the quick start's CPU-sized settings.

Numbers: full size not measured (no GPU was lent to this project's sessions; ~0.8 s per step on
the 2-core CPU, ~4.5 h). `:quick` in the sweep above (3 seeds, 2026-11-27): held-out Dice
A 58.28 ± 3.68, B 58.49 ± 3.46, C 57.14 ± 2.99, D 57.35 ± 3.60, average 57.82 ± 3.39 %.
Re-measured in the DG table (README "The talk's DG table", 2026-11-29): held-out D Dice
59.32 ± 4.87 %, ASD 6.24 ± 5.78 mm.
"""

from medgen_jax.config import base_config, cpu_sized_brain, gpu_sized_brain

QUICK_STEPS = 300


def get_config(arg=None):
  config = base_config()
  config.method = "deepall"
  config.data.held_out = ("D",)
  if arg == "quick":
    return cpu_sized_brain(config, num_steps=QUICK_STEPS)
  return gpu_sized_brain(config)
