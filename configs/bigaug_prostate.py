"""DeepAll + BigAug on the six-site prostate collection (prostate6 layout), one site held out:
the "BigAug [35]" row of the SAML prostate table (Zhang et al., TMI 2020; every transform with
probability 0.5, medgen_jax/augment.py).

    python -m medgen_jax.train --config configs/bigaug_prostate.py --workdir runs/bigaug_prostate \
        --config.data.root=/path/to/Processed_data_nii

Settings as configs/deepall_prostate.py plus `augment.enabled=True`.

Numbers: none yet (the prostate data cannot be downloaded on the project's machines).
"""

from medgen_jax.config import base_config, prostate6


def get_config():
  config = prostate6(base_config())
  config.method = "deepall"
  config.batch_size = 10
  config.augment.enabled = True
  return config
