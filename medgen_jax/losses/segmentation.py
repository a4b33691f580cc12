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
