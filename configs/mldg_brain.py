"""MLDG on brain-sites: episodic meta-learning, 2 meta-train + 1 meta-test of the 3 source sites.

    python -m medgen_jax.train --config configs/mldg_brain.py --workdir runs/mldg_brain
    python -m medgen_jax.sweep --config configs/mldg_brain.py:quick --held-out all --seeds 3 --workdir runs/sweep_brain

Exact second-order meta-gradient (nested jax.grad); `--config.meta.first_order=True` for the
first-order variant. Sizes as configs/deepall_brain.py (full / `:quick`).

Numbers: not measured yet (full size needs a GPU; `:quick` was not part of the CPU sweep).
"""

from medgen_jax.config import base_config, cpu_sized_brain, gpu_sized_brain

QUICK_STEPS = 300


def get_config(arg=None):
  config = base_config()
  config.method = "mldg"
  config.data.held_out = ("D",)
  config.meta.inner_lr = 1e-3
  config.meta.beta = 1.0
  if arg == "quick":
    return cpu_sized_brain(config, num_steps=QUICK_STEPS)
  return gpu_sized_brain(config)
