"""Multi-site NIfTI data: reading, validation, normalization, the brain-sites benchmark, batches.

Entry points:
  * `load_dataset` / `inspect_dataset` (loading.py): validated volumes from a dataset folder.
  * `make_normalizer` (normalize.py): the one intensity-normalization factory.
  * `prepare_data` (pipeline.py): config -> splits, normalized slice cache, samplers.
  * CLIs: `python -m medgen_jax.data.{check,synthesize,preview}`.
"""

from medgen_jax.data.errors import DataError, DataWarning, Problem

__all__ = ["DataError", "DataWarning", "Problem"]
