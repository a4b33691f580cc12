"""The talk's MS-Net normalization table on brain-sites (six sites): Joint (one U-Net on every
site pooled) under each intensity normalization, with and without N4 bias-field correction.

`arg` = SIZE,INTENSITIES[,n4]: SIZE quick | full | prostate6; INTENSITIES none | histogram |
scaled | whitening; `n4` switches data.bias_correction='n4' on (needs `medgen_jax[n4]`).

    python -m medgen_jax.sweep --multisite --seeds 1 --workdir runs/multisite_norm \
        --config configs/multisite/normalization.py:quick,none \
        --config configs/multisite/normalization.py:quick,histogram \
        --config configs/multisite/normalization.py:quick,scaled \
        --config configs/multisite/normalization.py:quick,whitening \
        --config configs/multisite/normalization.py:quick,histogram,n4 \
        --config configs/multisite/normalization.py:quick,scaled,n4 \
        --config configs/multisite/normalization.py:quick,whitening,n4

Numbers (`:quick`, seed 0, 2026-11-28, 9 min 44 s for the six new runs): overall mean Dice %
none 51.39, histogram 53.77, scaled 54.17, whitening 54.00; with N4: histogram 53.47, scaled
53.74, whitening 53.75 (the same whitening config with seed 1: 60.17).
"""

from medgen_jax.config import base_config, multisite

SIZES = {"quick": "quick", "full": None, "prostate6": "prostate6"}
INTENSITIES = ("none", "histogram", "scaled", "whitening")


def get_config(arg=None):
  parts = [a.strip() for a in (arg or "quick,whitening").split(",")]
  size, intensities, extra = parts[0], (parts[1:2] or [""])[0], parts[2:]
  if size not in SIZES or intensities not in INTENSITIES or extra not in ([], ["n4"]):
    raise ValueError(f"argument {arg!r}: use SIZE,INTENSITIES[,n4] with SIZE one of {', '.join(SIZES)} "
                     f"and INTENSITIES one of {', '.join(INTENSITIES)}, e.g. quick,histogram,n4")
  config = multisite(base_config(), SIZES[size])
  config.method = "deepall"
  config.data.normalization.name = intensities
  if extra:
    config.data.bias_correction = "n4"
  return config
