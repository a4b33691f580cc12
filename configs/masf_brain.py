"""MASF on brain-sites (the talk's brain-tissue DG experiment): task loss + global class
alignment + local sample clustering, 2 meta-train + 1 meta-test of the 3 source sites.

    python -m medgen_jax.train --config configs/masf_brain.py --workdir runs/masf_brain
    python -m medgen_jax.sweep --config configs/deepall_brain.py:quick --config configs/masf_brain.py:quick \
        --held-out all --seeds 3 --workdir runs/sweep_brain

β1 = 1 (global, τ = 2), β2 = 0.005 (semi-hard triplet, margin 10) as the released code; exact
second-order meta-gradient. Optimizers as released (`meta.optimizers='released'`, methods.md
§3.7): Adam(outer_lr = optimizer.learning_rate) on the meta-train task loss plus a second
Adam(outer_lr) on the meta objective with each gradient tensor clipped at norm 2.0
(`meta.outer_clip`), the two updates summed; inner gradient clipped per tensor at 2.0
(`meta.clip`). Sizes as configs/deepall_brain.py (full / `:quick`). Not as released: the inner
gradient is that of the *mean* task loss (TF's tf.gradients of the per-sample loss vector sums
over the batch, so its clip of 2.0 bites far more often), the task loss is one loss over the pooled
meta-train batch, and every parameter (BN scale/offset included) is adapted.

Numbers: full size not measured (GPU). `:quick` in the sweep with configs/deepall_brain.py:quick
(3 seeds, 26 min 33 s for both methods on the 2-core CPU, 2026-11-27), measured BEFORE the
released optimizers became the default, i.e. with `--config.meta.optimizers=summed
--config.meta.outer_clip=0 --config.meta.clip=0` (one Adam on the summed objective): held-out Dice
A 58.20 ± 4.72, B 59.22 ± 6.02, C 58.96 ± 5.52, D 57.38 ± 4.70, average 58.44 ± 5.22 %.
With the released optimizers (the default now), held-out D, 3 seeds (2026-11-29, README "The
talk's DG table"): Dice 58.66 ± 4.79 %, ASD 41.66 ± 56.26 mm (one seed never segments CSF).
"""

from medgen_jax.config import base_config, cpu_sized_brain, gpu_sized_brain

QUICK_STEPS = 300


def get_config(arg=None):
  config = base_config()
  config.method = "masf"
  config.data.held_out = ("D",)
  config.meta.inner_lr = 1e-3
  config.masf.global_weight = 1.0
  config.masf.local_weight = 0.005
  config.masf.temperature = 2.0
  config.masf.margin = 10.0
  config.meta.clip = 2.0                  # inner gradient, per tensor (released value; see above)
  config.meta.optimizers = "released"     # task Adam + meta Adam, both at optimizer.learning_rate
  config.meta.outer_clip = 2.0            # meta gradient, per tensor, as released
  if arg == "quick":
    return cpu_sized_brain(config, num_steps=QUICK_STEPS)
  return gpu_sized_brain(config)
