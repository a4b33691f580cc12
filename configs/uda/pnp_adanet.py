"""PnP-AdaNet (Dou et al., IJCAI 2018) on the cross-modality benchmarks, MR -> CT by default (the
paper's MM-WHS setting on the embedded cardiac phantom). Stage 1 (`pnp.pretrain_steps`): the U-Net
on the labelled source; stage 2: `pnp.critic_warmup_steps` WGAN critic steps, then cycles of
`pnp.critic_steps` critic steps + 1 step of the DAM (the target copy of encoder blocks down0,
down1), everything else frozen; every trainer step is ONE sub-iteration on a fresh batch
(methods/uda/pnp_adanet.py). The target's test cases are scored at the last step.

    python -m medgen_jax.train --config configs/uda/pnp_adanet.py:quick --workdir runs/pnp_mr2ct_quick
    python -m medgen_jax.train --config configs/uda/pnp_adanet.py --workdir runs/pnp_mr2ct
    python -m medgen_jax.sweep --uda --config configs/uda/source_only.py:quick --config configs/uda/pnp_adanet.py:quick \
        --directions MR:CT,CT:MR --seeds 2 --workdir runs/uda_cardiac

Full size (default, a GPU run): 256x256 slices, U-Net 16-..-256, batch 6 + 6 and the released
stage-2 hyper-parameters (RMSProp 3e-4 with TF1's initial mean square 1, mu 0.002, clip 0.03,
mask weight 0.3, 20 critic steps per DAM step, +1 every 300 cycles), with scaled-down step
counts: 20k source steps (released 50k), 5k warm-up critic steps (released ~20k), then 42k
sub-steps, ~2000 DAM steps (released 120k cycles of 20+ critic steps).
`:quick` (64x64, U-Net 8-..-128, the 2-core CPU, a few minutes): 600 source steps (exactly the
source-only run), 100 warm-up steps, cycles of 5 critic steps + 1 DAM step to step 1200 (~83 DAM steps), RMSProp from a zero
mean square so that so few DAM steps move at all: a smoke test of the schedule, not a result
(a 40-step run of it: 18 slices/s in stage 1 on the shared CPU, finite losses). `brain` /
`brain_quick`: brain-modalities T1 -> T2. Data, split and sizes: config.uda_benchmark.

Numbers (2-core CPU, 2026-11-28, 2 seeds, `sweep --uda`, mean Dice % on the target test volumes,
last checkpoint): `:quick` MR -> CT 18.61 ± 5.02, CT -> MR 29.45 ± 11.31;
`:brain_quick` T1 -> T2 22.20 ± 1.32, T1 -> CT 27.38 ± 0.30 (README: per structure, ASD).
Full size not measured (no GPU was lent).
"""

from medgen_jax.config import base_config, uda_benchmark

QUICK_STEPS = 1200


def get_config(arg=None):
  config = uda_benchmark(base_config(), arg, method="pnp_adanet", num_steps=67_000, quick_steps=QUICK_STEPS)
  if arg and arg.endswith("quick"):
    config.pnp.pretrain_steps = 600           # = the source-only run (same schedule, seed, batches)
    config.pnp.critic_warmup_steps = 100
    config.pnp.critic_steps = 5
    config.pnp.critic_steps_growth_every = 0
    config.pnp.rmsprop_initial_scale = 0.0
    return config
  config.batch_size = 6                       # released: 6 MR + 6 CT
  config.pnp.pretrain_steps = 20_000
  config.pnp.critic_warmup_steps = 5_000
  return config
