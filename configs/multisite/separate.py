"""Separate: one U-Net per brain-sites site (six models), each tested on every site — the
"Separate" rows (and the cross-site matrix) of the talk's MS-Net tables.

    python -m medgen_jax.train --config configs/multisite/separate.py:quick --workdir runs/multisite/separate

`:quick` = CPU size (300 steps per model); no argument = GPU size; `:prostate6` = the real
six-site prostate collection (add --config.data.root=/path/to/prostate6).
"""

from medgen_jax.config import base_config, multisite


def get_config(arg=None):
  config = base_config()
  config.method = "separate"
  return multisite(config, arg)
