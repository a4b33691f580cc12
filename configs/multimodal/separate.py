"""Separate: one U-Net per modality, each trained on its modality only (batches of 8 slices, the
per-modality share of UMMKD's batch; brain_quick 4) and tested on every modality's test volumes
(its own: the "Separate" baseline of UMMKD; the others: the cross-modality gap).

    python -m medgen_jax.train --config configs/multimodal/separate.py:cardiac_quick --workdir runs/multimodal/separate

Arguments as configs/multimodal/ummkd.py. Numbers: not measured yet.
"""

from medgen_jax.config import base_config, multimodal


def get_config(arg=None):
  config = base_config()
  config.method = "separate"
  return multimodal(config, arg)
