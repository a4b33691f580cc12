"""SAML: Shape-Aware Meta-Learning (Liu, Dou & Heng, MICCAI 2020), for segmentation.

Per step, source sites split into meta-train D_tr and meta-test D_te (2 + 1 of 5 by default; the
other sources sit the step out, as in the released code):

    θ'  = θ − α · clip(∇_θ L_seg(θ; D_tr))                      (clip 10, per tensor)
    F(θ, φ) = L_seg(θ; D_tr) + L_seg(θ'; D_te) + λ₁ · L_compact(θ'; D_te) + λ₂ · L_smooth(θ', φ)

* L_seg: the task loss (SAML: Dice with the linear denominator; set `loss.*` accordingly).
* L_compact (shape compactness, isoperimetric quotient P²/(4πA) of the soft prediction):
  u = 1 − p_background (the gland for binary prostate; the union of tissues otherwise),
  dx = u[:, 1:, :] − u[:, :-1, :], dy = u[:, :, 1:] − u[:, :, :-1],
  P = s · Σ sqrt(dx[:, :, 1:]² + dy[:, 1:, :]² + 1e-8), A = Σ u, per image; the released code
  uses s = 0.01 and sums over the batch (`saml.perimeter_scale`, `saml.compactness_reduction`).
  `compactness(u)` (s = 1) is ≈ 1 for a disk and 4/π for a square.
* L_smooth (shape smoothness): for every image of the episode at θ', the semantic features (last
  decoder block) averaged over the ground-truth contour (mask − its 1-step erosion) and over the
  background ring around it (5-step dilation − mask), cross-shaped structuring element; the two
  embeddings are labelled contour / ring, mapped by M_φ and pulled apart by the semi-hard triplet
  loss (released code) or the contrastive loss (paper), margin 10. Empty regions are masked out.

Weights λ₁ = 1.0, λ₂ = 0.005 and the learning rates follow the released code; differentiated
exactly (second order unless `meta.first_order`; the released code is first order). The task
gradient ∇_θ L_seg(θ; D_tr) and the meta gradient ∇_θ [everything at θ'](θ'(θ)) go either to one
optimizer as their sum (`meta.optimizers='summed'`: the gradient of F), or as released
(`'released'`, configs/saml_prostate.py) to two Adam states over θ: Adam(1e-4 =
`meta.task_learning_rate`) on the task gradient and Adam(1e-3 = optimizer.learning_rate) on the
meta gradient clipped per tensor at 10 (`meta.outer_clip`), the two updates summed
(methods/episodic.py). φ has its own optimizer (`saml.metric_lr`) on λ₂ ∂L_smooth/∂φ.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from medgen_jax import losses
from medgen_jax.methods import deepall, episodic
from medgen_jax.methods.deepall import segmentation_terms
from medgen_jax.methods.episodic import make_metric_step
from medgen_jax.methods.masf import metric_loss
from medgen_jax.parallel import gather_global

LABEL = "SAML"
SAMPLER = episodic.SAMPLER
validate = episodic.validate
eval_network = deepall.eval_network


def init_state(key, config, info):
  return episodic.init_state(key, config, info, with_metric=True)


def make_step(config, info):
  return episodic.make_step(make_train_step, config, info)


def label(config, sources):
  """"SAML"; the talk's ablation rows without a shape term are named by what they keep."""
  compact, smooth = config.saml.compactness_weight > 0, config.saml.smoothness_weight > 0
  name = LABEL if compact and smooth else {
      (False, False): "Meta-learning (SAML's loss, no shape terms)",
      (True, False): "Meta-learning + L_compact",
      (False, True): "Meta-learning + L_smooth"}.get((compact, smooth), LABEL)
  return episodic.label(name, config)


def perimeter_and_area(u, *, perimeter_scale: float = 1.0, eps: float = 1e-8):
  """Per image [B]: P from the forward-difference gradient magnitude of u [B, H, W], A = Σ u."""
  dx = u[:, 1:, :] - u[:, :-1, :]
  dy = u[:, :, 1:] - u[:, :, :-1]
  perimeter = perimeter_scale * jnp.sum(jnp.sqrt(dx[:, :, 1:] ** 2 + dy[:, 1:, :] ** 2 + eps), axis=(1, 2))
  return perimeter, jnp.sum(u, axis=(1, 2))


def compactness(u, *, perimeter_scale: float = 1.0):
  """Isoperimetric quotient P² / (4π A) per image: 1 for a disk, larger for any other shape."""
  perimeter, area = perimeter_and_area(u, perimeter_scale=perimeter_scale)
  return perimeter ** 2 / (4.0 * math.pi * jnp.maximum(area, 1e-6))


def compactness_loss(u, *, perimeter_scale: float, reduction: str, axis_name=None):
  per_image = compactness(u, perimeter_scale=perimeter_scale)
  total = losses.global_sum(jnp.sum(per_image), axis_name)
  if reduction == "sum":
    return total
  if reduction == "mean":
    return total / losses.global_sum(jnp.asarray(per_image.shape[0], jnp.float32), axis_name)
  raise ValueError(f"unknown compactness reduction {reduction!r}: sum | mean")


def _shift(mask, dy: int, dx: int):
  """mask shifted by (dy, dx) with zeros entering: [B, H, W] bool."""
  h, w = mask.shape[1:]
  padded = jnp.pad(mask, ((0, 0), (1, 1), (1, 1)))
  return padded[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]


_CROSS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))


def erode(mask):
  out = mask
  for dy, dx in _CROSS[1:]:
    out = out & _shift(mask, dy, dx)
  return out


def dilate(mask, iterations: int = 1):
  for _ in range(iterations):
    grown = mask
    for dy, dx in _CROSS[1:]:
      grown = grown | _shift(mask, dy, dx)
    mask = grown
  return mask


def contour_and_ring(labels, *, ring_iterations: int = 5):
  """Foreground contour (mask − erosion) and background ring (dilation⁵ − mask), [B, H, W]."""
  foreground = labels > 0
  return foreground & ~erode(foreground), dilate(foreground, ring_iterations) & ~foreground


def region_embeddings(features, labels):
  """Per image: the mean feature over its contour and over its ring → ([2B, F], labels [2B]
  (1 contour, 0 ring), valid [2B])."""
  contour, ring = contour_and_ring(labels)
  dtype = jnp.promote_types(features.dtype, jnp.float32)
  masks = jnp.concatenate([contour, ring]).astype(dtype)                  # [2B, H, W]
  feats = jnp.concatenate([features, features]).astype(dtype)             # [2B, H, W, F]
  counts = jnp.sum(masks, axis=(1, 2))
  vectors = jnp.einsum("bhw,bhwf->bf", masks, feats) / jnp.maximum(counts, 1.0)[:, None]
  region = jnp.concatenate([jnp.ones(labels.shape[0], jnp.int32), jnp.zeros(labels.shape[0], jnp.int32)])
  return vectors, region, counts > 0


def make_outer(model, config, *, num_classes: int, axis_name: str | None = None, metric_model=None):
  """outer(adapted, phi, episode) -> (meta-test task loss + λ₁ · compactness + λ₂ · smoothness
  at θ', metrics)."""
  c = config.saml

  def outer(adapted, phi, episode):
    meta_train, meta_test = episode["meta_train"], episode["meta_test"]
    logits_te, feats_te = episode["forward"](adapted, "meta_test")
    _, feats_tr = episode["forward"](adapted, "meta_train")
    loss_target, target_metrics = segmentation_terms(logits_te, meta_test["label"], adapted, config.loss,
                                                     num_classes=num_classes, axis_name=axis_name)
    foreground = 1.0 - jax.nn.softmax(logits_te, axis=-1)[..., 0]
    loss_compact = compactness_loss(foreground, perimeter_scale=c.perimeter_scale,
                                    reduction=c.compactness_reduction, axis_name=axis_name)
    vectors, region, valid = region_embeddings(jnp.concatenate([feats_tr, feats_te]),
                                               jnp.concatenate([meta_train["label"], meta_test["label"]]))
    embeddings = metric_model.apply({"params": phi}, vectors)
    loss_smooth = metric_loss(c.metric_loss, gather_global(embeddings, axis_name),
                              gather_global(region, axis_name), gather_global(valid, axis_name),
                              margin=c.margin)
    loss = loss_target + c.compactness_weight * loss_compact + c.smoothness_weight * loss_smooth
    return loss, {"loss_target": loss_target, "loss_compact": loss_compact, "loss_smooth": loss_smooth,
                  "dice_meta_test": target_metrics["dice"][1:].mean()}

  return outer


def make_train_step(model, tx, config, *, num_classes: int, axis_name: str | None = None,
                    bn_sync: bool = True, metric_model=None, metric_tx=None, task_tx=None):
  outer = make_outer(model, config, num_classes=num_classes, axis_name=axis_name,
                     metric_model=metric_model)
  return make_metric_step(outer, model, tx, config, num_classes=num_classes, axis_name=axis_name,
                          bn_sync=bn_sync, metric_tx=metric_tx, task_tx=task_tx)
