"""Separate: one model per brain-sites site, each evaluated on every site (the cross-site
matrix of the talk's first prostate table). CPU-sized like the quick start.

    python -m medgen_jax.train --config configs/separate_brain.py --workdir runs/separate_brain

Produced (2-core CPU, 7 min 00 s, 1.5 GB peak RSS, 2026-11-27), Dice % on each site's test
volume (diagonal = the model's own site):
  Separate (A): A 73.37  B 72.18  C 67.46  D 67.80
  Separate (B): A 70.22  B 72.01  C 67.38  D 65.87
  Separate (C): A 56.32  B 56.58  C 67.28  D 61.64   (the thick-slice site transfers worst)
  Separate (D): A 70.36  B 71.43  C 66.95  D 66.77
"""

from medgen_jax.config import base_config, cpu_sized_brain


def get_config():
  config = cpu_sized_brain(base_config(), num_steps=1200)
  config.method = "separate"
  config.data.held_out = ()
  return config
