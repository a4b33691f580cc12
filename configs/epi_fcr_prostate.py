"""Epi-FCR on the six-site prostate collection: one domain-specific U-Net per source site (5),
the aggregated U-Net with the episodic terms of a random site pair each step (methods/epi_fcr.py).

    python -m medgen_jax.train --config configs/epi_fcr_prostate.py --workdir runs/epi_fcr_prostate \
        --config.data.root=/path/to/Processed_data_nii --config.data.held_out='("BIDMC",)'

Data and preprocessing as configs/deepall_prostate.py (Adam 1e-3, Dice-B + CE, explicit L2).
Batch 15 = 3 slices of each of the 5 source sites (every site's model trains on its own slices, so
the batch must hold the sites equally). Released weights epif 2.0, epic 0.05, epir 0.1 and warm-up
501 steps (HAHA-DL/Episodic-DG PACS/run_main_epi_fcr.sh; not rescaled to the 10k steps).

Numbers: none (the prostate data cannot be downloaded here; exercised by the test suite on a
synthetic prostate6 folder).
"""

from medgen_jax.config import base_config, prostate6


def get_config():
  config = prostate6(base_config())
  config.method = "epi_fcr"
  config.batch_size = 15          # 3 slices per source site
  config.epi_fcr.epif_weight = 2.0
  config.epi_fcr.epic_weight = 0.05
  config.epi_fcr.epir_weight = 0.1
  config.epi_fcr.warmup_steps = 501
  return config
