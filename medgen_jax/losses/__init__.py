"""Losses: pure, keyword-only functions, formulas in each module's docstring.

* `segmentation`     soft Dice (both variants), class-weighted CE, their sum, L2 on kernels,
                     and `global_sum` (batch-level sums over the data-parallel axis).
* `metric_learning`  semi-hard triplet and contrastive losses, pairwise distances (MASF, SAML).
* `distillation`     class-wise mean logits and global class alignment / KD (MASF, UMMKD).
* `adversarial`      gradient reversal + DANN schedule, LSGAN, non-saturating GAN, WGAN with
                     weight clipping, cycle and semantic consistency (DANN, ADDA, PnP-AdaNet, CycleGAN,
                     SeUDA, CyCADA, SIFA).

Every name is re-exported here, so `from medgen_jax import losses; losses.segmentation_loss(...)`
works as it did when this package was a single module.
"""

from __future__ import annotations

import jax  # noqa: F401  (importable from the former single module, as is jnp)
import jax.numpy as jnp  # noqa: F401

from medgen_jax.losses.adversarial import (apply_updates_and_clip, clip_weights, cycle_loss,
                                           dann_lambda, gan_discriminator_loss, gan_generator_loss,
                                           gradient_reversal, lsgan_discriminator_loss,
                                           lsgan_generator_loss, semantic_consistency_loss,
                                           wgan_critic_loss, wgan_generator_loss)
from medgen_jax.losses.distillation import class_alignment_loss, classwise_mean_logits
from medgen_jax.losses.metric_learning import (contrastive_loss, pairwise_distances,
                                               semi_hard_triplet_loss)
from medgen_jax.losses.segmentation import (class_balance_weights, global_sum, l2_kernel_loss,
                                            segmentation_loss, soft_dice_loss,
                                            weighted_cross_entropy)

__all__ = [
    # segmentation
    "global_sum", "soft_dice_loss", "class_balance_weights", "weighted_cross_entropy",
    "segmentation_loss", "l2_kernel_loss",
    # distillation
    "classwise_mean_logits", "class_alignment_loss",
    # metric learning
    "pairwise_distances", "semi_hard_triplet_loss", "contrastive_loss",
    # adversarial
    "gradient_reversal", "dann_lambda", "lsgan_generator_loss", "lsgan_discriminator_loss",
    "gan_generator_loss", "gan_discriminator_loss", "wgan_critic_loss", "wgan_generator_loss",
    "clip_weights", "apply_updates_and_clip", "cycle_loss", "semantic_consistency_loss",
]
