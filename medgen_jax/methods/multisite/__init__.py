"""Supervised multi-site / multi-modal methods (the talk's "Tackling data heterogeneity with
supervised learning"): networks that share most weights across sites or modalities and keep a
few domain-specific parts (models/domains.py). DSBN itself is DeepAll with `model.norm='dsbn'`
(methods/deepall.py)."""
