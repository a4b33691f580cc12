"""Y-shaped (Valindria et al., WACV 2018; a baseline of UMMKD): an encoder per modality
(down0..down{depth-1}, each run on its own modality's slices only), a shared bottleneck and
decoder (one BatchNorm for all modalities, model.norm='batch'), no KD
(models/multimodal.py, ummkd.shared='decoder', ummkd.kd_weight=0).

    python -m medgen_jax.train --config configs/multimodal/y_shaped.py:cardiac_quick --workdir runs/multimodal/y_shaped

Arguments as configs/multimodal/ummkd.py. Numbers (`:cardiac_quick` with --set num_steps=300, seed 0, 2026-11-28, the README's UMMKD table; mean foreground Dice % over each modality's test volumes): Y-shaped 58.98 ± 17.62 (MR 41.85, CT 76.10).
`:brain_quick` with --set num_steps=300, seed 0, same day: Y-shaped 51.37 ± 5.47.
"""

from medgen_jax.config import base_config, multimodal


def get_config(arg=None):
  config = base_config()
  config.method = "ummkd"
  config.model.norm = "batch"
  config.ummkd.shared = "decoder"
  config.ummkd.kd_weight = 0.0
  return multimodal(config, arg)
