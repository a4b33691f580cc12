"""MASF on the six-site prostate collection: 2 meta-train + 1 meta-test of the 5 source sites.

    python -m medgen_jax.train --config configs/masf_prostate.py --workdir runs/masf_prostate \
        --config.data.root=/path/to/Processed_data_nii --config.data.held_out='("BIDMC",)'

β1 = 1 (global alignment, τ = 2), β2 = 0.005 (semi-hard triplet, margin 10). Data as
configs/deepall_prostate.py. Numbers: none (data not downloadable here; exercised by the tests).
"""

from medgen_jax.config import base_config, prostate6


def get_config():
  config = prostate6(base_config())
  config.method = "masf"
  config.batch_size = 15
  config.meta.inner_lr = 1e-4
  config.meta.clip = 10.0
  return config
