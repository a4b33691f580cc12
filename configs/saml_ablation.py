"""The SAML ablation rows of the talk's prostate DG table (Liu, Dou & Heng, MICCAI 2020):
plain meta-learning, + L_compact, + L_compact + L_smooth (= SAML), one config with
`arg` = SIZE,ROW:

* SIZE: `quick` (brain-sites, CPU size, 300 steps), `full` (brain-sites, GPU size) or
  `prostate6` (the six-site prostate collection as configs/saml_prostate.py; give
  --config.data.root).
* ROW: `meta` = SAML with λ_compact = λ_smooth = 0, i.e. MLDG's objective (β = 1) with SAML's
  Dice loss, episodes, inner clip and released optimizers; `compact` = + the compactness loss
  (λ_smooth = 0); `full` = SAML as configs/saml_prostate.py (both terms). Only the two weights
  differ between the rows, so the ablation changes nothing else.

Optimizers as released (`meta.optimizers='released'`): Adam 1e-4 on the meta-train task loss
plus Adam 1e-3 on the meta objective with each gradient tensor clipped at norm 10
(`meta.outer_clip`), inner lr 1e-4 with per-tensor clip 10, Dice-B only, no L2 — the settings of
configs/saml_prostate.py (whose docstring lists what is not as released).

    python -m medgen_jax.sweep --held-out all --seeds 3 --workdir runs/saml_ablation \
        --config configs/saml_ablation.py:quick,meta --config configs/saml_ablation.py:quick,compact \
        --config configs/saml_ablation.py:quick,full --metrics dice,asd

Numbers: not measured yet.
"""

import runpy
from pathlib import Path

from medgen_jax.config import base_config, cpu_sized_brain, gpu_sized_brain, saml_released

SIZES = ("quick", "full", "prostate6")
ROWS = {"meta": (0.0, 0.0), "compact": (1.0, 0.0), "full": (1.0, 0.005)}   # (λ_compact, λ_smooth)


def get_config(arg=None):
  parts = [a.strip() for a in (arg or "quick,full").split(",")]
  if len(parts) != 2 or parts[0] not in SIZES or parts[1] not in ROWS:
    raise ValueError(f"argument {arg!r}: use SIZE,ROW with SIZE one of {', '.join(SIZES)} and ROW one of "
                     f"{', '.join(ROWS)}, e.g. quick,compact")
  size, row = parts
  if size == "prostate6":
    config = runpy.run_path(str(Path(__file__).with_name("saml_prostate.py")))["get_config"]()
  else:
    config = saml_released(base_config())   # SAML's released loss and optimizers, on brain-sites
    config.data.held_out = ("D",)
    config = cpu_sized_brain(config, num_steps=300) if size == "quick" else gpu_sized_brain(config)
  config.saml.compactness_weight, config.saml.smoothness_weight = ROWS[row]
  return config
