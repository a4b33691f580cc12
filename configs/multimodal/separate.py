"""Separate: one U-Net per modality, each trained on its modality only (batches of 8 slices, the
per-modality share of UMMKD's batch; brain_quick 4) and tested on every modality's test volumes
(its own: the "Separate" baseline of UMMKD; the others: the cross-modality gap).

    python -m medgen_jax.train --config configs/multimodal/separate.py:cardiac_quick --workdir runs/multimodal/separate

Arguments as configs/multimodal/ummkd.py. Numbers (`:cardiac_quick` with --set num_steps=300, seed 0, 2026-11-28, the README's UMMKD table; mean foreground Dice % over each modality's test volumes): Separate 70.44 ± 2.91 (MR model: MR 69.28, CT 14.21; CT model: CT 71.59, MR 41.83).
`:brain_quick` with --set num_steps=300, seed 0, same day: Separate 53.75 ± 5.53 (T1 54.96, T2 56.39, CT 49.89).
"""

from medgen_jax.config import base_config, multimodal


def get_config(arg=None):
  config = base_config()
  config.method = "separate"
  return multimodal(config, arg)
