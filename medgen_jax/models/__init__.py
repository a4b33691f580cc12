"""Models: flax.linen modules with no training logic."""

from medgen_jax.models.norms import NORMS, make_norm
from medgen_jax.models.unet import UNet

__all__ = ["NORMS", "UNet", "make_norm"]
