"""Segmentation losses: pure, keyword-only, batch-level, data-parallel exact.

Notation: p = softmax(logits) [B, H, W, C], g = one-hot labels, sums Σ over the batch and all
pixels (batch-level, as in every original repository), per class c, C classes.

* Soft Dice, squared denominator (PnP-AdaNet, SIFA, UMMKD; methods.md §1.1 "Dice-A"):
    dice_c = 2 Σ p_c g_c / (Σ p_c² + Σ g_c + ε),     L = 1 − mean_c dice_c
* Soft Dice, linear denominator (MS-Net, SAML; "Dice-B"):
    dice_c = 2 Σ p_c g_c / (Σ p_c + Σ g_c + ε),      L = 1 − mean_c dice_c
  (PnP/UMMKD log −mean_c dice_c instead: same gradient, offset 1.) `include_background=False`
  averages over classes 1..C−1 only.
* Class-weighted cross-entropy (PnP, SIFA, UMMKD; §1.2), weights from the batch:
    w_c = 1 − Σ g_c / Σ_c' Σ g_c',   CE = mean_pixels Σ_c −w_c g_c log(clip(p_c, 0.005, 1))
  The 0.005 clip bounds a pixel's loss at −log 0.005 ≈ 5.3.
* `segmentation_loss` = ce_weight · CE + dice_weight · Dice.
* `l2_kernel_loss` = coefficient · Σ_kernels Σ w² / 2 (tf.nn.l2_loss; §1.7): an explicit loss term,
  not optax's decoupled weight decay, which is applied after Adam's normalization.

Domain generalization (MASF, SAML) and multi-modal KD:

* `class_alignment_loss` (§1.5): q_c = softmax(z̄_c / τ) of the class-wise mean logits of each
  domain, L = (1/C) Σ_c [c present in both] · ½ (KL(q_c^a ‖ q_c^b) + KL(q_c^b ‖ q_c^a)). Classes
  absent from either domain contribute 0 (still divided by C), in both variants; the KL is
  computed from log_softmax, finite for any logit gap. 'masf_code' clips q to [1e-8, 1].
* `semi_hard_triplet_loss` (§1.6): tf.contrib's triplet_semihard_loss, on SQUARED Euclidean
  distances by default (`squared=False`: Euclidean), hinge summed over all positive pairs a ≠ p
  and divided by their number; `valid` drops padding rows.
* `contrastive_loss` (Hadsell): d² for same-label pairs, max(0, m − d)² otherwise, Euclidean d,
  mean over valid pairs.

Data parallelism: with `axis_name`, batch-level sums run over the global batch (`global_sum`), so
a step pmapped over N devices computes the same loss and, after averaging gradients over
devices, the same gradient as one device on the whole batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def global_sum(x, axis_name: str | None = None):
  """Σ over the data-parallel axis of every device's `x` (identity without an axis).

  Written as the sum of an `all_gather`, not as `psum`: every device then holds the global value
  as an ordinary per-device ("varying") array, and each operation on the way is a linear
  collective whose transpose is the true one (all_gather ↔ psum_scatter). Differentiating the
  per-device losses therefore differentiates their sum over devices exactly, to every order: the
  mean over devices of the local gradients — and of gradients of gradients, as in MLDG/MASF/SAML's
  second-order meta-gradient — equals the one-device derivative on the global batch. (A value
  `stop_gradient(psum x) + N·x − stop_gradient(N·x)` has the right first derivative only: its
  cross-device second-order terms collapse onto the local one.)
  """
  if axis_name is None:
    return x
  return jnp.sum(jax.lax.all_gather(x, axis_name), axis=0)


def soft_dice_loss(probs, onehot, *, variant: str = "squared", include_background: bool = True,
                   eps: float = 1e-7, axis_name: str | None = None):
  """1 − mean_c dice_c with batch-level sums (see the module docstring). Returns (loss, dice_c)."""
  reduce_axes = tuple(range(probs.ndim - 1))
  intersection = global_sum(jnp.sum(probs * onehot, axis=reduce_axes), axis_name)
  if variant == "squared":
    pred = jnp.sum(probs * probs, axis=reduce_axes)
  elif variant == "linear":
    pred = jnp.sum(probs, axis=reduce_axes)
  else:
    raise ValueError(f"unknown Dice variant {variant!r} (config loss.dice_variant): squared | linear")
  pred = global_sum(pred, axis_name)
  ref = global_sum(jnp.sum(onehot, axis=reduce_axes), axis_name)
  dice = 2.0 * intersection / (pred + ref + eps)
  classes = dice if include_background else dice[1:]
  return 1.0 - jnp.mean(classes), dice


def class_balance_weights(onehot, *, axis_name: str | None = None):
  """w_c = 1 − (pixels of class c) / (all pixels) over the (global) batch; constant in θ."""
  counts = jax.lax.stop_gradient(global_sum(jnp.sum(onehot, axis=tuple(range(onehot.ndim - 1))), axis_name))
  return 1.0 - counts / jnp.maximum(jnp.sum(counts), 1.0)


def weighted_cross_entropy(probs, onehot, *, class_weights="batch", clip: float = 0.005,
                           axis_name: str | None = None):
  """mean_pixels Σ_c −w_c g_c log(clip(p_c, clip, 1)); class_weights 'batch', 'none' or [C]."""
  if isinstance(class_weights, str):
    if class_weights == "batch":
      weights = class_balance_weights(onehot, axis_name=axis_name)
    elif class_weights == "none":
      weights = jnp.ones(onehot.shape[-1], probs.dtype)
    else:
      raise ValueError(f"unknown class_weights {class_weights!r} (config loss.class_weights): "
                       "batch | none | a list of C floats")
  else:
    weights = jnp.asarray(class_weights, probs.dtype)
  per_pixel = -jnp.sum(weights * onehot * jnp.log(jnp.clip(probs, clip, 1.0)), axis=-1)
  return jnp.mean(per_pixel)


def segmentation_loss(logits, labels, *, num_classes: int, ce_weight: float = 1.0,
                      dice_weight: float = 1.0, dice_variant: str = "squared",
                      include_background: bool = True, class_weights="batch", ce_clip: float = 0.005,
                      axis_name: str | None = None):
  """ce_weight · weighted CE + dice_weight · soft Dice loss. Returns (loss, metrics dict)."""
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  ce = weighted_cross_entropy(probs, onehot, class_weights=class_weights, clip=ce_clip,
                              axis_name=axis_name)
  dice_loss, dice = soft_dice_loss(probs, onehot, variant=dice_variant,
                                   include_background=include_background, axis_name=axis_name)
  loss = ce_weight * ce + dice_weight * dice_loss
  return loss, {"loss_ce": ce, "loss_dice": dice_loss, "dice": dice}


def l2_kernel_loss(params, *, coefficient: float):
  """coefficient · Σ w²/2 over every leaf named 'kernel' (convolution and dense weights)."""
  leaves = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)
            if getattr(path[-1], "key", None) == "kernel"]
  if not leaves or coefficient == 0:
    return jnp.zeros((), jnp.float32)
  return coefficient * sum(jnp.sum(jnp.square(w.astype(jnp.float32))) for w in leaves) / 2.0


# --- Shared by the domain-generalization methods (MASF, SAML) and multi-modal KD (UMMKD) ------


def classwise_mean_logits(logits, onehot, *, eps: float = 1e-6, axis_name: str | None = None):
  """z̄_c = Σ_i y_ic z_i / (Σ_i y_ic + ε): the mean logit vector of class-c pixels, [C, C].
  Computed in float32 at least (bfloat16 logits are promoted; float64 stays float64)."""
  dtype = jnp.promote_types(logits.dtype, jnp.float32)
  z = logits.reshape(-1, logits.shape[-1]).astype(dtype)
  y = onehot.reshape(-1, onehot.shape[-1]).astype(dtype)
  sums = global_sum(y.T @ z, axis_name)
  counts = global_sum(jnp.sum(y, axis=0), axis_name)
  return sums / (counts[:, None] + eps), counts


def class_alignment_loss(logits_a, onehot_a, logits_b, onehot_b, *, temperature: float = 2.0,
                         variant: str = "talk", axis_name: str | None = None):
  """Global class alignment (MASF; UMMKD's knowledge distillation), methods.md §1.5:

      q_c^(k) = softmax(z̄_c^(k) / τ),
      L = (1/C) Σ_c [c present in a and b] · ½ [KL(q_c^(a) ‖ q_c^(b)) + KL(q_c^(b) ‖ q_c^(a))]

  A class absent from either batch contributes exactly 0 (its z̄_c = 0 would be a uniform q_c that
  the KL pulls the other domain towards) and the sum is still divided by C, all classes, as the
  talk's (1/C) Σ_c and the released code's `kd_loss / n_class`.
  variant 'talk': ε = 1e-6 in z̄_c, no clipping of q (UMMKD's code has the same ε and no mask;
  the mask is ours there).
  variant 'masf_code': ε = 1e-16, q clipped to [1e-8, 1] (biomedia-mira/masf utils.kd, whose
  `bool_indicator` is the same presence mask).
  Both compute log q with log_softmax, KL = Σ q (log q − log q'), so that class-mean logit gaps of
  any size give a finite loss and gradient (softmax then log underflows to q = 0 from gaps of
  ≈ 100 τ in float32, ≈ 200 at τ = 2: log(q/0) = inf, 0 · log(0/0) = NaN); 'masf_code' clips
  log q to [log 1e-8, 0], which is log clip(q, 1e-8, 1).
  """
  if variant not in ("talk", "masf_code"):
    raise ValueError(f"unknown alignment variant {variant!r}: talk | masf_code")
  eps = 1e-6 if variant == "talk" else 1e-16
  zbar_a, count_a = classwise_mean_logits(logits_a, onehot_a, eps=eps, axis_name=axis_name)
  zbar_b, count_b = classwise_mean_logits(logits_b, onehot_b, eps=eps, axis_name=axis_name)
  log_q_a = jax.nn.log_softmax(zbar_a / temperature, axis=-1)
  log_q_b = jax.nn.log_softmax(zbar_b / temperature, axis=-1)
  if variant == "masf_code":
    floor = jnp.log(jnp.asarray(1e-8, log_q_a.dtype))
    log_q_a, log_q_b = jnp.clip(log_q_a, floor, 0.0), jnp.clip(log_q_b, floor, 0.0)
  q_a, q_b = jnp.exp(log_q_a), jnp.exp(log_q_b)
  kl_ab = jnp.sum(q_a * (log_q_a - log_q_b), axis=-1)
  kl_ba = jnp.sum(q_b * (log_q_b - log_q_a), axis=-1)
  present = (count_a > 0) & (count_b > 0)
  per_class = jnp.where(present, 0.5 * (kl_ab + kl_ba), 0.0)
  return jnp.sum(per_class) / per_class.shape[0]


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
