"""DSBN (Chang et al., CVPR 2019; the DSBN row of MS-Net, Liu et al., IEEE TMI 2020): the Joint
U-Net with every BatchNorm domain-specific (statistics, scale and bias per site; all kernels
shared), each test volume normalized with its own site's BN.

    python -m medgen_jax.train --config configs/multisite/dsbn.py:quick --workdir runs/multisite/dsbn

`:quick` = CPU size (300 steps); no argument = GPU size; `:prostate6` = the real six-site
prostate collection (add --config.data.root=/path/to/prostate6).

Numbers (`:quick`, 2 seeds, 2026-11-28, the README's method table; 300 steps, about 3 min per model on the 2-core CPU):
DSBN 56.16 ± 2.31 %.
"""

from medgen_jax.config import base_config, multisite


def get_config(arg=None):
  config = base_config()
  config.method = "deepall"
  config.model.norm = "dsbn"
  return multisite(config, arg)
