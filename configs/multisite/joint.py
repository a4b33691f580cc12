"""Joint (= DeepAll): one U-Net on all six brain-sites sites pooled, tested on each site's own
test cases — the "Joint" rows of the talk's MS-Net tables.

    python -m medgen_jax.train --config configs/multisite/joint.py:quick --workdir runs/multisite/joint

`:quick` = CPU size (300 steps); no argument = GPU size; `:prostate6` = the real six-site
prostate collection (add --config.data.root=/path/to/prostate6).

Numbers (`:quick`, 2 seeds, 2026-11-28, the README's method table; 300 steps, about 3 min per model on the 2-core CPU):
Joint 57.08 ± 3.36 % (seed 0: 54.00, seed 1: 60.17).
"""

from medgen_jax.config import base_config, multisite


def get_config(arg=None):
  config = base_config()
  config.method = "deepall"
  return multisite(config, arg)
