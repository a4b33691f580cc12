"""DeepAll on the six-site prostate MRI collection (prostate6 layout), one site held out.

    python -m medgen_jax.train --config configs/deepall_prostate.py --workdir runs/deepall_prostate \
        --config.data.root=/path/to/Processed_data_nii --config.data.held_out='("BIDMC",)'
    python -m medgen_jax.sweep --config configs/deepall_prostate.py --config configs/saml_prostate.py \
        --held-out all --seeds 3 --workdir runs/sweep_prostate --set data.root=/path/to/Processed_data_nii

Data: `ROOT/{BIDMC,BMC,HK,I2CVB,RUNMC,UCL}/CaseNN.nii.gz` + `CaseNN_segmentation.nii.gz`
(check it first: `python -m medgen_jax.data.check ROOT --layout prostate6`). As in SAML/MS-Net:
whole-volume z-score, 2.5-D input of 3 slices, 384x384 in-plane, slices drawn within the gland,
Dice-B (linear denominator) + CE, Adam 1e-3.

Numbers: none yet. The prostate data cannot be downloaded on the project's machines (no
network at run time); the config is exercised by the test suite on a synthetic prostate6 folder.
"""

from medgen_jax.config import base_config, prostate6


def get_config():
  config = prostate6(base_config())
  config.method = "deepall"
  config.batch_size = 10
  return config
