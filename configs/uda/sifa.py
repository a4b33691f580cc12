"""SIFA (Chen et al., IEEE TMI 2020; cchen-cc/SIFA master) on the cross-modality benchmarks, MR -> CT
by default: g_A translates MR to CT appearance, the shared encoder e_B (+ s_B, s_B_ll: deep
supervision) segments translated MR with its labels and real CT, the decoder de_B maps features
back to MR appearance; discriminators d_A (+ auxiliary head), d_B, d_P, d_P_ll; the seven updates
per iteration in the released order (methods/uda/sifa.py). The CT test volumes are scored with
e_B + s_B at the last iteration (no target labels select anything).

    python -m medgen_jax.train --config configs/uda/sifa.py:quick --workdir runs/sifa_mr2ct_quick
    python -m medgen_jax.train --config configs/uda/sifa.py --workdir runs/sifa_mr2ct

Full size (default, a GPU run) = the released config_param.json: 256x256 single slices, batch
8 + 8, 20k iterations, Adam 2e-4 (b1 0.5) for g_A, de_B and the discriminators, Adam 2e-4 for
the segmenter (TF's curr_lr is fed to the seg optimizer), no decay, no dropout, pools of 50,
lambda_cyc 10, encoder 16-..-512, decoder 32, generator 32 / 9 blocks, PatchGAN 64.
`:quick` (2-core CPU): 64x64 slices at 3 mm, encoder 4-..-128, decoder 8 / 2 blocks, generator
8 / 3 blocks, PatchGAN 16, QUICK_STEPS iterations, segmenter Adam 1e-3 (cosine) as every quick
row of the table. `brain` / `brain_quick`: brain-modalities T1 -> T2.

`nods[_quick|_brain|_brain_quick]`: the same without deep supervision (no s_B_ll, d_P_ll): the
table's "SIFA w/o deep supervision" row (SIFA-v1's other changes: configs/uda/sifa_v1.py).

Numbers (2-core CPU shared with other jobs, 2026-11-28, 2 seeds, `sweep --uda`, mean Dice % on
the target test volumes, last iteration; about 9 min per run): `:quick` MR -> CT 44.15 ± 2.20,
CT -> MR 59.59 ± 0.90; `:nods_quick` (w/o deep supervision) MR -> CT 44.18 ± 3.53, CT -> MR
62.69 ± 1.91 (README: per structure, ASD). Full size not measured (no GPU was lent).
"""

from medgen_jax.config import base_config, image_translation, uda_benchmark

QUICK_STEPS = 400


def get_config(arg=None):
  no_deep_supervision = bool(arg) and arg.startswith("nods")
  if no_deep_supervision:
    arg = arg[len("nods"):].lstrip("_") or None
  config = uda_benchmark(base_config(), arg, method="sifa", num_steps=20_000, quick_steps=QUICK_STEPS)
  config = image_translation(config, arg)
  config.sifa.deep_supervision = not no_deep_supervision
  if arg and arg.endswith("quick"):
    config.sifa.encoder_features = 4
    config.sifa.decoder_features = 8
    config.sifa.decoder_blocks = 2
    return config
  config.optimizer.learning_rate = 2e-4     # released: Adam(2e-4) for the segmenter, constant
  config.optimizer.schedule = "constant"
  return config
