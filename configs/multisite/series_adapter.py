"""Series residual adapters (Rebuffi et al., NeurIPS 2017): the Joint U-Net with, after every
3x3 convolution, a per-site adapter y = x' + W_site · BN_site(x') (1x1 conv, zero-initialized;
models/adapters.py) and every BatchNorm per site (model.norm='dsbn', as Rebuffi et al. keep all
BN layers domain-specific); each test volume goes through its own site's adapters and BN.
The "Series-Adapter" row of the talk's MS-Net method table.

    python -m medgen_jax.train --config configs/multisite/series_adapter.py:quick --workdir runs/multisite/series_adapter

`:quick` = CPU size (300 steps); no argument = GPU size; `:prostate6` = the real six-site
prostate collection (add --config.data.root=/path/to/prostate6).

Numbers (`:quick`, 2 seeds, 2026-11-28, the README's method table; 300 steps, about 3 min per model on the 2-core CPU):
Series-Adapter 57.19 ± 3.52 %.
"""

from medgen_jax.config import base_config, multisite


def get_config(arg=None):
  config = base_config()
  config.method = "deepall"
  config.model.norm = "dsbn"
  config.model.adapter = "series"
  return multisite(config, arg)
