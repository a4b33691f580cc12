"""SIFA-v1 (Chen et al., AAAI 2019; cchen-cc/SIFA branch SIFA-v1): SIFA without deep supervision
(no s_B_ll / d_P_ll), 3 adjacent slices as input, dropout 0.25 (keep 0.75), the mask-GAN weight
w_P ramped from 0 to 0.1 (the release: epochs 5 -> 7), the segmenter's Adam 1e-3 x 0.9 every 2
epochs. Everything else as configs/uda/sifa.py (which documents sizes and commands).

    python -m medgen_jax.train --config configs/uda/sifa_v1.py:quick --workdir runs/sifa_v1_mr2ct_quick

Epochs are counted in steps here, assuming 1000 iterations per epoch (the release's epoch is
max(#source, #target slices) / 8 iterations, data-dependent): the ramp runs linearly over steps
4k -> 7k of 20k (the release's staircase 0.1*(epoch - 4)/3: 0 before epoch 5, 1/30 and 2/30 in
epochs 5 and 6, 0.1 from 7), the decay every 2k steps. `:quick`: ramp over 20 % -> 35 % of the run.
The table row is labelled "SIFA w/o deep supervision".

Numbers (2-core CPU, 2026-11-28, ONE seed, `sweep --uda --directions MR:CT --seeds 1`, mean Dice % on
the CT test volumes, last iteration; 7.7 min): `:quick` MR -> CT 23.23 (its results table labels it
"SIFA w/o deep supervision", the label of every SIFA run without deep supervision). Full size not
measured (no GPU was lent).
"""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("sifa_config", pathlib.Path(__file__).with_name("sifa.py"))
sifa_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sifa_config)

QUICK_STEPS = sifa_config.QUICK_STEPS


def get_config(arg=None):
  config = sifa_config.get_config(arg)
  config.sifa.deep_supervision = False
  config.sifa.dropout = 0.25
  config.data.context_slices = 3
  steps = config.num_steps
  config.sifa.mask_ramp_start, config.sifa.mask_ramp_end = steps // 5, steps * 35 // 100
  if not (arg and arg.endswith("quick")):
    config.optimizer.learning_rate = 1e-3
    config.optimizer.schedule = "exponential"
    config.optimizer.decay_rate, config.optimizer.decay_steps = 0.9, 2000
  return config
