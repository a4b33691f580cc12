"""Parallel residual adapters (Rebuffi et al., CVPR 2018): the Joint U-Net with a per-site 1x1
convolution in parallel with every shared 3x3 convolution, y = conv3x3(x) + W_site · x
(zero-initialized; models/adapters.py), and every BatchNorm per site (model.norm='dsbn', as in
Rebuffi et al.); each test volume goes through its own site's adapters and BN.
The "Parallel-Adapter" row of the talk's MS-Net method table.

    python -m medgen_jax.train --config configs/multisite/parallel_adapter.py:quick --workdir runs/multisite/parallel_adapter

`:quick` = CPU size (300 steps); no argument = GPU size; `:prostate6` = the real six-site
prostate collection (add --config.data.root=/path/to/prostate6).

Numbers (`:quick`, 2 seeds, 2026-11-28, the README's method table; 300 steps, about 3 min per model on the 2-core CPU):
Parallel-Adapter 56.82 ± 2.97 %.
"""

from medgen_jax.config import base_config, multisite


def get_config(arg=None):
  config = base_config()
  config.method = "deepall"
  config.model.norm = "dsbn"
  config.model.adapter = "parallel"
  return multisite(config, arg)
