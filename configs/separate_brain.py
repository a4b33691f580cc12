"""Separate: one model per brain-sites site, each evaluated on every site (the cross-site
matrix of the talk's first prostate table). CPU-sized like the quick start.

    python -m medgen_jax.train --config configs/separate_brain.py --workdir runs/separate_brain

Numbers: see README "Results".
"""

from medgen_jax.config import base_config


def get_config():
  config = base_config()
  config.method = "separate"
  config.data.held_out = ()
  config.data.in_plane_spacing = (3.0, 3.0)
  config.data.in_plane_shape = (80, 80)
  config.model.base_features = 8
  config.batch_size = 12
  config.num_steps = 1200
  config.optimizer.schedule = "cosine"
  config.log_every = 50
  config.eval_every = 300
  config.checkpoint.every = 300
  return config
