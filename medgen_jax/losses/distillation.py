"""Class-wise alignment / knowledge distillation (MASF's global class alignment, UMMKD's KD).

* `classwise_mean_logits`: z̄_c = Σ_i y_ic z_i / (Σ_i y_ic + ε), the mean logit vector of the
  class-c pixels (or samples), batch-level (global over `axis_name`).
* `class_alignment_loss` (methods.md §1.5): q_c = softmax(z̄_c / τ) of the class-wise mean logits
  of each domain, L = (1/C) Σ_c [c present in both] · ½ (KL(q_c^a ‖ q_c^b) + KL(q_c^b ‖ q_c^a)).
  Classes absent from either domain contribute 0 (still divided by C), in both variants; the KL
  is computed from log_softmax, finite for any logit gap. 'masf_code' clips q to [1e-8, 1].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from medgen_jax.losses.segmentation import global_sum


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


def unmasked_kd_loss(logits_a, onehot_a, logits_b, onehot_b, *, temperature: float = 2.0,
                     eps: float = 1e-6, axis_name: str | None = None):
  """UMMKD's knowledge-distillation loss exactly as released (carrenD/ummkd `network.py::
  _get_kd_cost`, methods.md §1.5): the same construction as `class_alignment_loss` but WITHOUT
  the presence mask,

      L = (1/C) Σ_c ½ [KL(q_c^(a) ‖ q_c^(b)) + KL(q_c^(b) ‖ q_c^(a))],   q_c = softmax(z̄_c / τ),
      z̄_c = Σ_i y_ic z_i / (Σ_i y_ic + ε),  ε = 1e-6,

  every class incl. background, divided by C. A class absent from one batch has z̄_c = 0 there,
  i.e. a uniform q_c, towards which the KL pulls the other batch's class-c distribution (and a
  class absent from both contributes 0): that is what the released code computes. KL from
  log_softmax (finite for any logit gap; the released tf.log(q/q') is the same value where it is
  finite). The talk's formula has no ½ (it writes the plain sum of the two KLs); the code's ½ is
  used here."""
  zbar_a, _ = classwise_mean_logits(logits_a, onehot_a, eps=eps, axis_name=axis_name)
  zbar_b, _ = classwise_mean_logits(logits_b, onehot_b, eps=eps, axis_name=axis_name)
  log_q_a = jax.nn.log_softmax(zbar_a / temperature, axis=-1)
  log_q_b = jax.nn.log_softmax(zbar_b / temperature, axis=-1)
  q_a, q_b = jnp.exp(log_q_a), jnp.exp(log_q_b)
  kl_ab = jnp.sum(q_a * (log_q_a - log_q_b), axis=-1)
  kl_ba = jnp.sum(q_b * (log_q_b - log_q_a), axis=-1)
  return jnp.sum(0.5 * (kl_ab + kl_ba)) / kl_ab.shape[0]
