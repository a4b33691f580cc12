"""MLDG on the six-site prostate collection: 2 meta-train + 1 meta-test of the 5 source sites
per step, exact second-order meta-gradient.

    python -m medgen_jax.train --config configs/mldg_prostate.py --workdir runs/mldg_prostate \
        --config.data.root=/path/to/Processed_data_nii --config.data.held_out='("BIDMC",)'

Data and preprocessing as configs/deepall_prostate.py. Numbers: none (the prostate data cannot be
downloaded here; exercised by the test suite on a synthetic prostate6 folder).
"""

from medgen_jax.config import base_config, prostate6


def get_config():
  config = prostate6(base_config())
  config.method = "mldg"
  config.batch_size = 15          # 5 slices per domain, as SAML
  config.meta.inner_lr = 1e-4
  config.meta.clip = 10.0
  return config
