"""UMMKD (Dou, Liu et al., IEEE TMI 2020): the Chilopod U-Net (every kernel shared, BatchNorm per
modality: model.norm='dsbn') trained on labelled, unpaired modalities with a per-modality
CE + Dice loss and 0.5 x the class-wise knowledge-distillation loss (T = 2, symmetric KL, /C,
no class mask: the released `_get_kd_cost`); each modality tested on its own test volumes with its
own BN (methods/multisite/ummkd.py).

    python -m medgen_jax.train --config configs/multimodal/ummkd.py:cardiac_quick --workdir runs/multimodal/ummkd

Arguments: `cardiac_quick` (cardiac-phantom MR + CT, 64x64, 600 steps, CPU), `brain_quick`
(brain-modalities T1 + T2 + CT, 80x80; KD = mean over the 3 modality pairs), `cardiac` / `brain`
(full size, 20k steps, Adam 1e-3 x0.95 every 1000 steps as released: a GPU run). Settings:
medgen_jax/config.multimodal. Numbers (`:cardiac_quick` with --set num_steps=300, seed 0, 2026-11-28, the README's UMMKD table; mean foreground Dice % over each modality's test volumes): UMMKD 73.67 ± 3.16 (MR 72.67, CT 74.67).
`:brain_quick` with --set num_steps=300, seed 0, same day: UMMKD 50.06 ± 3.05 (T1 52.76, T2 51.09, CT 46.33).
"""

from medgen_jax.config import base_config, multimodal


def get_config(arg=None):
  config = base_config()
  config.method = "ummkd"
  config.model.norm = "dsbn"
  config.ummkd.shared = "all"
  config.ummkd.kd_weight = 0.5
  return multimodal(config, arg)
