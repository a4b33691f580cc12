"""Models: flax.linen modules with no training logic."""

from medgen_jax.models.gan import (FeatureDiscriminator, OutputDiscriminator, PatchGAN,
                                   ResNetGenerator)
from medgen_jax.models.norms import NORMS, make_norm
from medgen_jax.models.unet import UNet
from medgen_jax.models.unet3d import UNet3D

__all__ = ["FeatureDiscriminator", "NORMS", "OutputDiscriminator", "PatchGAN", "ResNetGenerator",
           "UNet", "UNet3D", "make_norm"]
