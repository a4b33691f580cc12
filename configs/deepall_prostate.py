"""DeepAll on the six-site prostate MRI collection (prostate6 layout), one site held out.

    python -m medgen_jax.train --config configs/deepall_prostate.py --workdir runs/deepall_prostate \
        --config.data.root=/path/to/Processed_data_nii --config.data.held_out='("BIDMC",)'

Data: `ROOT/{BIDMC,BMC,HK,I2CVB,RUNMC,UCL}/CaseNN.nii.gz` + `CaseNN_segmentation.nii.gz`
(check it first: `python -m medgen_jax.data.check ROOT --layout prostate6`). As in SAML/MS-Net:
whole-volume z-score, 2.5-D input of 3 slices, 384x384 in-plane, slices drawn within the gland,
Dice-B (linear denominator) + CE, Adam 1e-3.

Numbers: none yet. The prostate data cannot be downloaded on the project's machines (no
network at run time); the config is exercised by the test suite on a synthetic prostate6 folder.
"""

from medgen_jax.config import base_config


def get_config():
  config = base_config()
  config.method = "deepall"
  config.data.root = "data/prostate6"
  config.data.layout = "prostate6"
  config.data.held_out = ("BIDMC",)
  config.data.in_plane_shape = (384, 384)
  config.data.context_slices = 3
  config.data.slices = "foreground"
  config.loss.dice_variant = "linear"
  config.batch_size = 10
  config.num_steps = 10_000
  config.log_every = 100
  config.eval_every = 500
  config.checkpoint.every = 500
  return config
