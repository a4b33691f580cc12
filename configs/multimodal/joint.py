"""Joint: one U-Net (kernels and BatchNorm shared) trained on all modalities pooled (DeepAll),
each modality tested on its own test volumes — the "Joint training" baseline of UMMKD.

    python -m medgen_jax.train --config configs/multimodal/joint.py:cardiac_quick --workdir runs/multimodal/joint

Arguments as configs/multimodal/ummkd.py. Numbers: not measured yet.
"""

from medgen_jax.config import base_config, multimodal


def get_config(arg=None):
  config = base_config()
  config.method = "deepall"
  return multimodal(config, arg)
