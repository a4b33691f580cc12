"""Intra-site on brain-sites: the upper reference of the talk's DG table — DeepAll trained and
tested on one site's own cases (the held-out site's labels: "[target labels]").

    python -m medgen_jax.train --config configs/intra_site_brain.py:quick --workdir runs/intra_site_D
    python -m medgen_jax.sweep --config configs/intra_site_brain.py:quick --config configs/deepall_brain.py:quick \
        --held-out all --seeds 3 --workdir runs/sweep_brain

The sweep trains it once per held-out site on that site's train cases (data.sites=(site,),
data.held_out=()). Full size (default) = configs/deepall_brain.py's GPU size; `:quick` = its CPU
size (300 steps). Numbers (`:quick`, site D's own test volume, 3 seeds, 2026-11-29, runs/dg_brain):
Dice 56.51 ± 4.55 %, ASD 6.83 ± 5.61 mm.
"""

from medgen_jax.config import base_config, cpu_sized_brain, gpu_sized_brain

QUICK_STEPS = 300


def get_config(arg=None):
  config = base_config()
  config.method = "intra_site"
  config.data.sites = ("D",)
  config.data.held_out = ()
  if arg == "quick":
    return cpu_sized_brain(config, num_steps=QUICK_STEPS)
  return gpu_sized_brain(config)
