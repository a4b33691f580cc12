"""MS-Net (Liu, Dou et al., IEEE TMI 2020): shared encoder with DSBN, one auxiliary decoder per
site and a universal DSBN decoder trained with knowledge transfer from the auxiliary argmax, the
released two-optimizer order and teacher warm-up (methods/multisite/msnet.py) — the MS-Net row
of the talk's tables, on the same U-Net, data and protocol as the Joint / DSBN rows.

    python -m medgen_jax.train --config configs/multisite/msnet.py:quick --workdir runs/multisite/msnet

`:quick` = CPU size (300 steps, teacher warm-up 100: the released 500 of 50k scaled to the short
run); no argument = GPU size (warm-up 500); `:prostate6` = the real six-site prostate collection
(add --config.data.root=/path/to/prostate6). results.md scores the universal branch ("MS-Net");
every run also writes the auxiliary branch's table of the same checkpoint
(<workdir>/msnet/results_auxiliary.md, "MS-Net (auxiliary)", Dice only: methods/multisite/msnet.py);
--config.msnet.eval_branch=auxiliary swaps the two.
One :quick run (seed 0, 4.5 min on the shared 2-core CPU): mean Dice 55.4 % universal, 53.0 %
auxiliary (same checkpoint, step 300).

From the released code: the loss (Dice with the linear denominator alone: loss.ce_weight=0,
loss.dice_variant='linear'), the 0.5/0.5 knowledge-transfer weights, the warm-up, Adam_T then
Adam_S. From the shared multisite protocol (for comparable rows): the learning-rate schedule
(cosine at :quick and at the GPU size, the brain-sites sizes of config.multisite; constant, Adam
1e-3 throughout, at :prostate6, SAML's setting of config.prostate6; released: x0.95 every 500
steps, --config.optimizer.schedule=exponential with the default decay_steps=500, decay_rate=0.95),
the L2 on kernels (loss.weight_decay 1e-4; released: none, --config.loss.weight_decay=0), batch,
steps, U-Net widths.

Numbers (`:quick`, 2 seeds, 2026-11-28, the README's method table; 300 steps, about 3 min per model on the 2-core CPU):
MS-Net 41.83 ± 13.81 % universal (seed 0: 55.40, seed 1: 28.25: the universal decoder had not learned in its 200 post-warm-up steps), 55.10 ± 8.21 % auxiliary.
"""

from medgen_jax.config import base_config, multisite


def get_config(arg=None):
  config = base_config()
  config.method = "msnet"
  config.model.norm = "dsbn"
  config.loss.ce_weight = 0.0
  config.loss.dice_variant = "linear"
  config = multisite(config, arg)
  config.msnet.warmup_steps = 100 if arg == "quick" else 500
  return config
