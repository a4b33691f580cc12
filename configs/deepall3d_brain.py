"""DeepAll 3-D on brain-sites: a 3-D U-Net on patches (nnU-Net's foreground oversampling), every
test volume segmented by sliding-window inference (Gaussian-weighted, overlap 0.5, a few patches
per forward: the device never holds a whole volume). Sources A, B, C; D held out.

    python -m medgen_jax.train --config configs/deepall3d_brain.py:quick --workdir runs/deepall3d_brain_quick
    python -m medgen_jax.train --config configs/deepall3d_brain.py --workdir runs/deepall3d_brain

Brain-sites volumes are 99x117x95 voxels of 2 mm; patches are (D, H, W) with D along the slice
axis (Z), which keeps the data's own spacing (only the in-plane axes are resampled).

`:quick` (CPU): in-plane resampled to 4 mm (volumes [95, 50, 58] at (2, 4, 4) mm), patches
(24, 32, 32) = 48 x 128 x 128 mm, U-Net3D 8-16-32 + 64 with nnU-Net's pooling plan for that
spacing (models/unet3d.plan_pooling: level 0 pools and convolves along D only, (2, 1, 1) with
(3, 1, 1) kernels, until the voxels are isotropic), batch 6 (2 patches per site, the last 2
forced onto foreground), 300 steps, cosine schedule, selection on the sources' validation cases.
Full size (default, a GPU run): the native 2 mm grid, patches (64, 96, 96), U-Net3D 16-...-128 +
256 with 2x2x2 pooling, batch 6, 20k steps.

Numbers: `:quick`, seed 0, 2026-11-29: held-out D Dice 45.06 ± 1.01 % (CSF 0.00, GM 65.50,
WM 69.68), in-domain A 49.39, B 46.44, C 43.13 % (one test volume each), step 150 selected;
28.6 min on the 2-core CPU shared with other jobs (README "3-D patches"). Full size not measured
(no GPU was lent to this session).
"""

from medgen_jax.config import base_config, cpu_sized_brain, gpu_sized_brain
from medgen_jax.models.unet3d import plan_pooling

QUICK_STEPS = 300
QUICK_SPACING = (2.0, 4.0, 4.0)   # (D, H, W) mm: brain-sites' 2 mm slices, in-plane resampled to 4 mm


def get_config(arg=None):
  if arg not in (None, "quick"):
    raise ValueError(f"config argument {arg!r}: use quick or nothing (the GPU size)")
  config = base_config()
  config.method = "deepall"
  config.data.held_out = ("D",)
  config.model.name = "unet3d"
  if arg == "quick":
    cpu_sized_brain(config, num_steps=QUICK_STEPS)
    config.data.in_plane_spacing = QUICK_SPACING[1:]
    config.data.patch_size = (24, 32, 32)
    config.model.depth = 3
    config.model.pool_sizes, config.model.kernel_sizes = plan_pooling(config.data.patch_size, QUICK_SPACING,
                                                                      config.model.depth)
    config.eval_every = config.checkpoint.every = QUICK_STEPS // 2
    config.log_every = 25
    config.eval.batch_size = 8
  else:
    gpu_sized_brain(config)
    config.data.patch_size = (64, 96, 96)
    config.eval.batch_size = 4
  config.data.in_plane_shape = ()   # whole volumes: patches are cut from them, no crop/pad
  config.batch_size = 6             # 2 patches per source site
  return config
