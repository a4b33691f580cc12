"""Models: flax.linen modules with no training logic."""

from medgen_jax.models.gan import (FeatureDiscriminator, OutputDiscriminator, PatchGAN,
                                   ResNetGenerator)
from medgen_jax.models.norms import NORMS, make_norm
from medgen_jax.models.unet import UNet

__all__ = ["FeatureDiscriminator", "NORMS", "OutputDiscriminator", "PatchGAN", "ResNetGenerator",
           "UNet", "make_norm"]
