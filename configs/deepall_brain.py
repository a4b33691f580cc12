"""DeepAll on brain-sites at full size, for a GPU: sites A, B, C train; D held out.

    python -m medgen_jax.train --config configs/deepall_brain.py --workdir runs/deepall_brain

Native 2 mm grid (99x117 slices padded to 128x128), U-Net 16-32-64-128-256, 20k steps of batch 24.
Leave-one-site-out: `--config.data.held_out='("A",)'` etc. (medgen_jax.sweep comes with the
meta-learning issue).

Numbers: not measured yet (no GPU was lent to this project's sessions so far; on the 2-core CPU a
step of batch 24 at 128x128 takes ~0.8 s, i.e. ~4.5 h). configs/quickstart.py is the CPU-sized run.
"""

from medgen_jax.config import base_config


def get_config():
  config = base_config()
  config.method = "deepall"
  config.data.held_out = ("D",)
  config.data.in_plane_shape = (128, 128)
  config.data.synthesize.cases_per_site = 10
  config.model.base_features = 16
  config.batch_size = 24
  config.num_steps = 20_000
  config.optimizer.schedule = "cosine"
  config.log_every = 100
  config.eval_every = 1000
  config.checkpoint.every = 1000
  return config
