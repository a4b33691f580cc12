"""Intra-site on the six-site prostate collection: the upper reference of the SAML prostate table
("Intra-site", trained and tested on one site's own cases, i.e. with that site's labels).

    python -m medgen_jax.train --config configs/intra_site_prostate.py --workdir runs/intra_site_prostate \
        --config.data.root=/path/to/Processed_data_nii --config.data.sites='("BIDMC",)'

The sweep trains it once per held-out site on that site's train cases and scores its test split
(`--held-out all` = every site of the dataset). Settings as configs/deepall_prostate.py.

Numbers: none yet (the prostate data cannot be downloaded on the project's machines).
"""

from medgen_jax.config import base_config, prostate6


def get_config():
  config = prostate6(base_config())
  config.method = "intra_site"
  config.data.sites = ("BIDMC",)
  config.data.held_out = ()
  config.batch_size = 10
  return config
