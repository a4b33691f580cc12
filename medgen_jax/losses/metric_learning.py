"""Metric-learning losses on embeddings (MASF, SAML).

* `semi_hard_triplet_loss` (methods.md §1.6): tf.contrib's triplet_semihard_loss, on SQUARED
  Euclidean distances by default (`squared=False`: Euclidean), hinge summed over all positive
  pairs a ≠ p and divided by their number; `valid` drops padding rows.
* `contrastive_loss` (Hadsell): d² for same-label pairs, max(0, m − d)² otherwise, Euclidean d,
  mean over valid pairs.
* `pairwise_distances`: the [N, N] (squared) Euclidean distances both use.
"""

from __future__ import annotations

import jax.numpy as jnp


def pairwise_distances(embeddings, *, squared: bool = False):
  """Pairwise distances [N, N]: squared Euclidean ‖x_i − x_j‖², or Euclidean with a zero-safe
  square root (finite gradients at d = 0). Computed from the differences, not from
  ‖x‖² + ‖y‖² − 2x·y, so there is no cancellation and d(i, i) = 0 exactly."""
  diff = embeddings[:, None, :] - embeddings[None, :, :]
  squared_distances = jnp.sum(diff * diff, axis=-1)
  if squared:
    return squared_distances
  positive = squared_distances > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared_distances, 1.0)), 0.0)


def semi_hard_triplet_loss(embeddings, labels, *, margin: float, valid=None, squared: bool = True):
  """Semi-hard triplet loss (Schroff et al., CVPR 2015) as tf.contrib's
  `metric_learning.triplet_semihard_loss` (MASF, SAML; methods.md §1.6), on the `valid` rows:

  d = pairwise distances, SQUARED Euclidean by default as tf.contrib's
  `pairwise_distance(embeddings, squared=True)` (`squared=False`: Euclidean). For every positive
  pair (a, p), a ≠ p, same label, the negative distance is
      d(a, n*) = min { d(a, n) : n negative, d(a, n) > d(a, p) }   (`negatives_outside`), or, if
                 that set is empty, max over the negatives n of d(a, n)  (`negatives_inside`);
      L = Σ_(a,p) max(margin + d(a, p) − d(a, n*), 0) / (number of positive pairs).
  As in TF, `negatives_inside` is `masked_maximum`: max_n (d(a, n) − min_k d(a, k)) · [n negative]
  + min_k d(a, k). For an anchor without any negative (only when all valid rows share one label)
  that is min_k d(a, k) = d(a, a) = 0, so each such pair costs margin + d(a, p), and it counts in
  the denominator, which is every positive pair. We follow TF there. Deviations: no positive pair
  gives 0, not TF's 0/0 = NaN; `valid` [N] (default all) drops padding rows, i.e. the loss is TF's
  on embeddings[valid], labels[valid]. An anchor without a positive contributes nothing.
  """
  n = embeddings.shape[0]
  valid = jnp.ones(n, bool) if valid is None else valid.astype(bool)
  d = pairwise_distances(embeddings, squared=squared)
  both = valid[:, None] & valid[None, :]
  same = (labels[:, None] == labels[None, :]) & both
  positive = same & ~jnp.eye(n, dtype=bool)                    # TF's mask_positives
  negative = ~same & both                                       # TF's adjacency_not
  d_ap = d[:, :, None]                                          # [a, p, 1]
  d_an = d[:, None, :]                                          # [a, 1, n]
  harder = negative[:, None, :] & (d_an > d_ap)                 # [a, p, n], TF's mask
  row_max = jnp.max(jnp.where(both, d, 0.0), axis=-1)[:, None, None]
  outside = jnp.min(jnp.where(harder, d_an, row_max), axis=-1)  # masked_minimum
  inside = jnp.max(jnp.where(negative, d, 0.0), axis=-1)        # masked_maximum; row min d(a,a) = 0
  chosen = jnp.where(jnp.any(harder, axis=-1), outside, inside[:, None])
  per_pair = jnp.maximum(margin + d - chosen, 0.0)
  return jnp.sum(jnp.where(positive, per_pair, 0.0)) / jnp.maximum(jnp.sum(positive), 1)


def contrastive_loss(embeddings, labels, *, margin: float, valid=None):
  """Contrastive loss (Hadsell et al., CVPR 2006) over all pairs n < m:
  d² if y_n = y_m, else max(0, ξ − d)²; mean over valid pairs."""
  n = embeddings.shape[0]
  valid = jnp.ones(n, bool) if valid is None else valid.astype(bool)
  d = pairwise_distances(embeddings)
  pairs = jnp.triu(valid[:, None] & valid[None, :], k=1)
  same = labels[:, None] == labels[None, :]
  per_pair = jnp.where(same, d ** 2, jnp.maximum(margin - d, 0.0) ** 2)
  return jnp.sum(jnp.where(pairs, per_pair, 0.0)) / jnp.maximum(jnp.sum(pairs), 1)
