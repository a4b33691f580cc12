"""Separate: one U-Net per brain-sites site (six models), each tested on every site — the
"Separate" rows (and the cross-site matrix) of the talk's MS-Net tables.

    python -m medgen_jax.train --config configs/multisite/separate.py:quick --workdir runs/multisite/separate

`:quick` = CPU size (300 steps per model); no argument = GPU size; `:prostate6` = the real
six-site prostate collection (add --config.data.root=/path/to/prostate6).

Numbers (`:quick`, 2 seeds, 2026-11-28, the README's method table; 300 steps, about 3 min per model on the 2-core CPU):
Separate (each site's own model) 57.02 ± 3.92 % mean Dice over the six sites' test volumes.
"""

from medgen_jax.config import base_config, multisite


def get_config(arg=None):
  config = base_config()
  config.method = "separate"
  return multisite(config, arg)
