"""Epi-FCR on brain-sites: domain-specific U-Nets per source site, the aggregated U-Net trained
with the episodic feature / classifier / random-classifier terms (methods/epi_fcr.py).

    python -m medgen_jax.train --config configs/epi_fcr_brain.py --workdir runs/epi_fcr_brain
    python -m medgen_jax.sweep --config configs/epi_fcr_brain.py:quick --held-out all --seeds 3 --workdir runs/sweep_brain

Released weights (HAHA-DL/Episodic-DG PACS/run_main_epi_fcr.sh): epif 2.0, epic 0.05, epir 0.1, an
aggregation warm-up of 501 iterations (`ite <= 500`) of 3001. Full size (gpu_sized_brain, 20k
steps): the released 501 warm-up steps. `:quick` (300 steps): the warm-up scaled by the run length,
501 · 300 / 3001 = 50 steps (the same sixth of the run). Sizes, optimizer (Adam 1e-3, cosine) and
explicit L2 as configs/deepall_brain.py; the released SGD (lr 1e-3, momentum 0.9, constant) is
--config.optimizer.name=sgd --config.optimizer.schedule=constant.

Numbers: full size not measured (GPU). `:quick`, held-out D, 3 seeds (2026-11-29, README "The
talk's DG table"): Dice 64.71 ± 0.52 %, ASD 1.67 ± 0.06 mm.
"""

from medgen_jax.config import base_config, cpu_sized_brain, gpu_sized_brain

QUICK_STEPS = 300
RELEASED_WARMUP, RELEASED_STEPS = 501, 3001


def get_config(arg=None):
  config = base_config()
  config.method = "epi_fcr"
  config.data.held_out = ("D",)
  config.epi_fcr.epif_weight = 2.0
  config.epi_fcr.epic_weight = 0.05
  config.epi_fcr.epir_weight = 0.1
  if arg == "quick":
    config = cpu_sized_brain(config, num_steps=QUICK_STEPS)
    config.epi_fcr.warmup_steps = round(RELEASED_WARMUP * QUICK_STEPS / RELEASED_STEPS)   # 50
    return config
  config = gpu_sized_brain(config)
  config.epi_fcr.warmup_steps = RELEASED_WARMUP
  return config
