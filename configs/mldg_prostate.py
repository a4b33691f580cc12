"""MLDG on the six-site prostate collection: 2 meta-train + 1 meta-test of the 5 source sites
per step, exact second-order meta-gradient.

    python -m medgen_jax.train --config configs/mldg_prostate.py --workdir runs/mldg_prostate \
        --config.data.root=/path/to/Processed_data_nii --config.data.held_out='("BIDMC",)'

Data and preprocessing as configs/deepall_prostate.py. Numbers: none (the prostate data cannot be
downloaded here; exercised by the test suite on a synthetic prostate6 folder).

Not MLDG's released setting (HAHA-DL/MLDG, PACS): that code uses every non-validation source as
meta-train (here 2 of 5, as SAML's episodes: `--config.meta.meta_train_domains=4`), sums the
meta-train domains' losses (here one loss over the pooled batch, i.e. a mean), has no inner clip
(here 10, as SAML: `--config.meta.clip=0`) and puts weight decay in SGD (here the explicit L2
term, which L(θ') repeats).
"""

from medgen_jax.config import base_config, prostate6


def get_config():
  config = prostate6(base_config())
  config.method = "mldg"
  config.batch_size = 15          # 5 slices per domain, as SAML
  config.meta.inner_lr = 1e-4
  config.meta.clip = 10.0
  return config
