"""USE-Net (Rundo et al., Neurocomputing 2019): the Joint U-Net with a squeeze-and-excitation
block (Hu et al., CVPR 2018: global average pool -> FC C/8 -> ReLU -> FC C -> sigmoid -> channel
scale; models/adapters.py) after every encoder and decoder block (Enc-Dec USE-Net; the
bottleneck counts as an encoder block), one SE per site (model.se='domain', the talk's
multi-site baseline); BatchNorm and convolutions shared. Each test volume uses its own site's
SE weights. The "USE-Net" row of the talk's MS-Net method table. model.se='shared' is USE-Net as
Rundo et al. train it on pooled data (row "USE-Net (shared SE)"); model.se_blocks='encoder' is
Enc USE-Net.

    python -m medgen_jax.train --config configs/multisite/usenet.py:quick --workdir runs/multisite/usenet

`:quick` = CPU size (300 steps); no argument = GPU size; `:prostate6` = the real six-site
prostate collection (add --config.data.root=/path/to/prostate6).

Numbers (`:quick`, 2 seeds, 2026-11-28, the README's method table; 300 steps, about 3 min per model on the 2-core CPU):
USE-Net 54.98 ± 1.42 %.
"""

from medgen_jax.config import base_config, multisite


def get_config(arg=None):
  config = base_config()
  config.method = "deepall"
  config.model.se = "domain"
  config.model.se_blocks = "encoder_decoder"
  config.model.se_reduction = 8
  return multisite(config, arg)
