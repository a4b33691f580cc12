"""UMMKD 3-D (Dou, Liu et al., IEEE TMI 2020, the abdominal experiment of its released
3d_implementation/): one 3-D U-Net for unpaired, labelled MR and CT, every kernel shared and the
BatchNorm per modality (the Chilopod net: model.norm='dsbn'), per-modality CE + Dice plus 0.5 x
the class-wise knowledge-distillation loss (T = 2), which the 3-D release switches off
(miu_kd 0.0) and which is on here; each modality tested on its own test volumes with its own BN,
by sliding-window inference (methods/multisite/ummkd.py, README "3-D patches").

    python -m medgen_jax.data.convert --format chaos CHAOS_Train_Sets --out data/chaos-sites \
        --ct-from-btcv RawData/Training
    python -m medgen_jax.train --config configs/ummkd3d_abdomen.py --workdir runs/ummkd3d_abdomen
    python -m medgen_jax.train --config configs/ummkd3d_abdomen.py:quick --workdir runs/ummkd3d_quick

Full size (default, a GPU run): the abdominal layout of `medgen_jax.data.convert --format chaos
--ct-from-btcv` (sites MR = CHAOS T2-SPIR and CT = BTCV, labels liver, right kidney, left
kidney, spleen), in-plane resampled to 1.5 mm and cropped/padded to 256 x 256, patches
(D, H, W) = (8, 256, 256) as released ([256, 256, 8] in its x, y, z), U-Net3D 16-...-128 + 256
with nnU-Net's pooling plan for (5, 1.5, 1.5) mm voxels (the slice axis is pooled once, at level
1; our assumption of a typical through-plane spacing: CHAOS T2-SPIR 5.5-9 mm, BTCV 2.5-5 mm),
batch 2 patches per modality, Adam 1e-4 x0.95 every 500 steps for 50k steps (released: 100
epochs x 500 iterations). Differences from the release as in the 2-D UMMKD (the project U-Net,
dropout only after the bottleneck), plus nnU-Net's patch sampling (the release draws whole
slabs of 8 slices, half of them within the label's z-extent).

`:quick` (CPU): the same two-site MR + CT layout with the procedural cardiac-phantom volumes
(96 x 96 x 80 at 2 mm, 4 heart structures; data/cardiac-phantom is generated on first use),
in-plane 4 mm, patches (16, 32, 32), U-Net3D 8-16-32 + 64 (pooling planned for (2, 4, 4) mm),
batch 2 per modality, 300 steps, cosine schedule. It shows the 3-D method trains; it is not an
abdominal result.

Numbers: not measured (no abdominal data and no GPU in this session; `:quick` checked to train
and evaluate end to end, see the README section "3-D patches").
"""

from medgen_jax.config import base_config, multimodal
from medgen_jax.models.unet3d import plan_pooling

FULL_SPACING = (5.0, 1.5, 1.5)   # (D, H, W) mm the pooling is planned for (see the docstring)
QUICK_SPACING = (2.0, 4.0, 4.0)


def get_config(arg=None):
  if arg not in (None, "quick"):
    raise ValueError(f"config argument {arg!r}: use quick or nothing (the GPU size)")
  config = base_config()
  config.method = "ummkd"
  config.model.norm = "dsbn"
  config.ummkd.shared = "all"
  config.ummkd.kd_weight = 0.5
  config.model.name = "unet3d"
  if arg == "quick":
    multimodal(config, "cardiac_quick", quick_steps=300)
    config.data.in_plane_spacing = QUICK_SPACING[1:]
    config.data.in_plane_shape = ()
    config.data.patch_size = (16, 32, 32)
    config.model.depth = 3
    spacing = QUICK_SPACING
    config.eval.batch_size = 8
  else:
    multimodal(config, "cardiac")   # the multi-modal protocol: both modalities labelled sources
    config.data.root = "data/chaos-sites"
    config.data.synthesize.if_missing = False
    config.data.sites = ("MR", "CT")
    config.data.in_plane_spacing = FULL_SPACING[1:]
    config.data.in_plane_shape = (256, 256)
    config.data.patch_size = (8, 256, 256)
    config.model.base_features = 16
    config.model.depth = 4
    spacing = FULL_SPACING
    config.optimizer.learning_rate = 1e-4
    config.optimizer.schedule = "exponential"
    config.optimizer.decay_steps = 500
    config.optimizer.decay_rate = 0.95
    config.num_steps = 50_000
    config.eval_every = config.checkpoint.every = 5000
    config.eval.batch_size = 4
  config.model.pool_sizes, config.model.kernel_sizes = plan_pooling(config.data.patch_size, spacing,
                                                                    config.model.depth)
  config.batch_size = 4   # 2 patches per modality
  return config
