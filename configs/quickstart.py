"""Quick start: DeepAll on brain-sites sites A, B, C; site D held out. Small, for a 2-core CPU.

    python -m medgen_jax.train --config configs/quickstart.py --workdir runs/quickstart

Generates data/brain-sites on first use. 3 mm in-plane slices (80x80), U-Net 8-16-32-64 + 128,
1,200 steps of batch 12, cosine schedule.

Produced (2-core CPU, 3 min 04 s wall with the data already generated (generating it first takes
about 30 s more), 1.37 GB peak RSS, 2026-11-28; selected step 900):
  held-out site D (6 volumes): mean Dice 68.53 ± 0.37 % (CSF 43.47, GM 81.43, WM 80.69),
  ASSD 1.34 mm, HD95 3.99 mm; in-domain test volumes A/B/C: 73.56 / 73.32 / 69.33 %.
(2026-11-27, before UpConv2x2 read its kernel as nn.ConvTranspose does — which changes what a
given random initialization computes —: 68.05 ± 0.59 %.)
"""

from medgen_jax.config import base_config, cpu_sized_brain


def get_config():
  config = cpu_sized_brain(base_config(), num_steps=1200)
  config.method = "deepall"
  config.data.held_out = ("D",)
  config.eval_every = 300
  config.checkpoint.every = 300
  return config
