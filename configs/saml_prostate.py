"""SAML on the six-site prostate collection (Liu, Dou & Heng, MICCAI 2020), leave-one-site-out.

    python -m medgen_jax.train --config configs/saml_prostate.py --workdir runs/saml_prostate \
        --config.data.root=/path/to/Processed_data_nii --config.data.held_out='("BIDMC",)'

Released-code settings: 2 meta-train + 1 meta-test of the 5 sources, 5 slices per domain, Dice-B
only as the segmentation loss, inner lr 1e-4 with per-tensor clip 10, compactness weight 1.0
(perimeter × 0.01, summed over the batch), smoothness weight 0.005 (semi-hard triplet, margin 10),
10k steps. Optimizers as released (`meta.optimizers='released'`): Adam 1e-4 on the meta-train
task loss (`meta.task_learning_rate`) plus Adam 1e-3 on the meta objective with each gradient
tensor clipped at norm 10 (`meta.outer_clip`), both gradients at the same θ and the two updates
summed; metric net Adam 1e-3. `--config.meta.optimizers=summed --config.meta.outer_clip=0
--config.meta.task_learning_rate=0` gives one Adam on the summed objective. Exact second-order
meta-gradient (the released code is first order: `--config.meta.first_order=True`). BN statistics
over the whole meta-train batch (the released code's are per domain: `--config.meta.per_domain_bn=True`).

Not as released (medgen_jax's shared parts): the U-Net has skip connections (the released network
concatenates a decoder feature with itself), BatchNorm has a scale and momentum 0.9 (released:
no scale, decay 0.999) and evaluates with running statistics (released: training-mode BN at test
time); running statistics come from the meta-train pass at θ only; the meta-train Dice is one Dice
over the pooled meta-train batch (released: the mean of the two domains' Dice); the inner step
adapts every parameter, BN scale/offset included (released: conv/deconv kernels and biases only);
the smoothness term embeds the contour and the ring of every episode image from the last decoder
block (released: 5 images [a0, a1, a1_0, b0, b1], one region each, from 48 channels of two decoder
blocks).

Numbers: none (the prostate data cannot be downloaded here; exercised by the test suite).
"""

from medgen_jax.config import base_config, prostate6, saml_released


def get_config():
  config = saml_released(prostate6(base_config()))
  config.batch_size = 15
  config.optimizer.learning_rate = 1e-3   # Adam on the meta objective
  config.saml.metric_lr = 1e-3
  return config
