"""X-shaped (Valindria et al., WACV 2018; a baseline of UMMKD): encoder and decoder (upconvs,
decoder blocks, head) per modality, each run on its own modality's slices only; only the
bottleneck is shared (one BatchNorm for all modalities, model.norm='batch'); no KD
(models/multimodal.py, ummkd.shared='middle', ummkd.kd_weight=0).

    python -m medgen_jax.train --config configs/multimodal/x_shaped.py:cardiac_quick --workdir runs/multimodal/x_shaped

Arguments as configs/multimodal/ummkd.py. Numbers (`:cardiac_quick` with --set num_steps=300, seed 0, 2026-11-28, the README's UMMKD table; mean foreground Dice % over each modality's test volumes): X-shaped 59.80 ± 4.71 (MR 55.47, CT 64.12).
`:brain_quick` with --set num_steps=300, seed 0, same day: X-shaped 57.87 ± 9.42.
"""

from medgen_jax.config import base_config, multimodal


def get_config(arg=None):
  config = base_config()
  config.method = "ummkd"
  config.model.norm = "batch"
  config.ummkd.shared = "middle"
  config.ummkd.kd_weight = 0.0
  return multimodal(config, arg)
