"""MetaReg on the six-site prostate collection: 5 source sites, meta-learned weighted-L1
regularizer of the U-Net decoder (Balaji et al., NeurIPS 2018; methods/metareg.py).

    python -m medgen_jax.train --config configs/metareg_prostate.py --workdir runs/metareg_prostate \
        --config.data.root=/path/to/Processed_data_nii --config.data.held_out='("BIDMC",)'

Data and preprocessing as configs/deepall_prostate.py (config.prostate6). 10k steps: 5k meta-training
(one decoder per site, every step a random ordered pair a != b of the 5 sites for φ's update)
+ 5k final training of F + a fresh decoder on L + Σ φ|θ|. Batch 15 = 3 slices per source site
(the per-site decoders need equal site groups on every device: batch a multiple of 5 x devices).

Numbers: none (the prostate data cannot be downloaded here; not run).
"""

from medgen_jax.config import base_config, prostate6


def get_config():
  config = prostate6(base_config())
  config.method = "metareg"
  config.batch_size = 15
  config.metareg.meta_fraction = 0.5
  config.metareg.inner_steps = 1
  config.metareg.inner_lr = 1e-4   # as configs/mldg_prostate.py's inner step
  return config
