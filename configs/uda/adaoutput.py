"""AdaOutput / AdaptSegNet (Tsai et al., CVPR 2018) on the cardiac-phantom benchmark, MR -> CT:
an output-space discriminator on the softmax maps, multi-level (a 1x1 auxiliary head on the U-Net
block `up1` with its own discriminator); the CT train+val slices are seen without labels, the CT
test cases are scored at the last step (no target labels select anything).

    python -m medgen_jax.train --config configs/uda/adaoutput.py:quick --workdir runs/adaoutput_mr2ct_quick
    python -m medgen_jax.train --config configs/uda/adaoutput.py --workdir runs/adaoutput_mr2ct

Full size (default): 256x256 slices at 0.75 mm (the MM-WHS-like crop), U-Net 16-32-64-128 + 256,
batch 8 source + 8 target, 20k steps — a GPU run. The paper's loss weights L_seg + 0.1 L_seg_aux
+ 0.001 L_adv + 0.0002 L_adv_aux and its discriminators (4x4 stride-2 convs 64-128-256-512-1,
leaky 0.2, Adam 1e-4, betas (0.9, 0.99), constant rate here).
Segmenter: config.optimizer (Adam 1e-3, cosine), as every segmenter of the adaptation configs
trained from scratch; the paper's SGD (from an ImageNet-initialised DeepLab) with the code's poly
decay of both rates is
    --config.optimizer.name=sgd --config.optimizer.learning_rate=2.5e-4 --config.optimizer.momentum=0.9
    --config.optimizer.schedule=constant --config.loss.weight_decay=5e-4 --config.adaoutput.poly_power=0.9
`:quick` = 64x64 slices at 3 mm, U-Net 8-16-32-64 + 128, discriminators of 16-32-64-128-1
channels (the paper's 64 base width triples the CPU step), 600 steps: ~0.3 s per step on the
shared 2-core CPU (measured), about 3 minutes plus data generation and evaluation.

Data, split, sizes and the segmenter's optimizer come from config.uda_benchmark, shared with
configs/uda/*.py (10 cases per modality, 10 % validation, 30 % test; `brain` / `brain_quick` give
brain-modalities T1 -> T2 instead).

Numbers (2-core CPU, 2026-11-28, 2 seeds, `sweep --uda`, mean Dice % on the target test volumes,
last checkpoint): `:quick` MR -> CT 35.23 ± 7.29, CT -> MR 62.06 ± 1.14;
`:brain_quick` T1 -> T2 24.50 ± 1.38, T1 -> CT 27.31 ± 2.87 (README: per structure, ASD).
Full size not measured (no GPU was lent).
"""

from medgen_jax.config import base_config, uda_benchmark

QUICK_STEPS = 600


def get_config(arg=None):
  config = uda_benchmark(base_config(), arg, method="adaoutput", num_steps=20_000, quick_steps=QUICK_STEPS)
  config.adaoutput.multi_level = True
  config.adaoutput.aux_level = "up1"
  if arg and arg.endswith("quick"):
    config.adaoutput.disc_features = 16
  return config
