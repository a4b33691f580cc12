"""Joint (= DeepAll): one U-Net on all six brain-sites sites pooled, tested on each site's own
test cases — the "Joint" rows of the talk's MS-Net tables.

    python -m medgen_jax.train --config configs/multisite/joint.py:quick --workdir runs/multisite/joint

`:quick` = CPU size (300 steps); no argument = GPU size; `:prostate6` = the real six-site
prostate collection (add --config.data.root=/path/to/prostate6).
"""

from medgen_jax.config import base_config, multisite


def get_config(arg=None):
  config = base_config()
  config.method = "deepall"
  return multisite(config, arg)
