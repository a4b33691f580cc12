"""SAML on the six-site prostate collection (Liu, Dou & Heng, MICCAI 2020), leave-one-site-out.

    python -m medgen_jax.train --config configs/saml_prostate.py --workdir runs/saml_prostate \
        --config.data.root=/path/to/Processed_data_nii --config.data.held_out='("BIDMC",)'

Released-code defaults: 2 meta-train + 1 meta-test of the 5 sources, 5 slices per domain, Dice-B
only as the segmentation loss, inner lr 1e-4 with per-tensor clip 10, outer Adam 1e-3, metric
Adam 1e-3, compactness weight 1.0 (perimeter × 0.01, summed over the batch), smoothness weight
0.005 (semi-hard triplet, margin 10), 10k steps. Exact second-order meta-gradient (the released
code is first order: `--config.meta.first_order=True`).

Numbers: none (the prostate data cannot be downloaded here; exercised by the test suite).
"""

from medgen_jax.config import base_config, prostate6


def get_config():
  config = prostate6(base_config())
  config.method = "saml"
  config.batch_size = 15
  config.loss.ce_weight = 0.0
  config.loss.dice_variant = "linear"
  config.loss.weight_decay = 0.0
  config.meta.inner_lr = 1e-4
  config.meta.clip = 10.0
  config.optimizer.learning_rate = 1e-3
  config.saml.metric_lr = 1e-3
  return config
