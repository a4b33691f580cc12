"""Joint: one U-Net (kernels and BatchNorm shared) trained on all modalities pooled (DeepAll),
each modality tested on its own test volumes — the "Joint training" baseline of UMMKD.

    python -m medgen_jax.train --config configs/multimodal/joint.py:cardiac_quick --workdir runs/multimodal/joint

Arguments as configs/multimodal/ummkd.py. Numbers (`:cardiac_quick` with --set num_steps=300, seed 0, 2026-11-28, the README's UMMKD table; mean foreground Dice % over each modality's test volumes): Joint 73.81 ± 5.01 (MR 74.20, CT 73.43).
`:brain_quick` with --set num_steps=300, seed 0, same day: Joint 47.61 ± 1.43.
"""

from medgen_jax.config import base_config, multimodal


def get_config(arg=None):
  config = base_config()
  config.method = "deepall"
  return multimodal(config, arg)
