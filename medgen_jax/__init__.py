"""medgen_jax: multi-site medical image segmentation that generalizes across sites, in JAX."""

__version__ = "0.1.0"
