"""MASF: Model-Agnostic learning of Semantic Features (Dou et al., NeurIPS 2019), for segmentation.

Per step, source sites split into meta-train D_tr and meta-test D_te (2 + 1 of 3 by default):

    θ'  = θ − α · clip(∇_θ L_task(θ; D_tr))
    F(θ, φ) = L_task(θ; D_tr) + β₁ · L_global(θ'; D_tr, D_te) + β₂ · L_local(θ', φ; D_tr ∪ D_te)

* L_task: weighted CE + Dice (+ L2), as DeepAll.
* L_global (global class alignment, the talk's formula): per domain, the class-wise mean of the
  logits over that domain's pixels of each class, softened with temperature τ; symmetric KL for
  every (meta-train, meta-test) domain pair, averaged over classes, then over pairs
  (losses.class_alignment_loss; `masf.alignment_variant='masf_code'` gives the released code's
  class mask and clipping).
* L_local (local sample clustering): for segmentation, one class-wise feature vector per image and
  class present in it — the mean of the semantic features (last decoder block at θ') over that
  class's pixels — embedded by M_φ (models/metric.py); labels are the class ids; semi-hard
  triplet (Schroff) or contrastive (Hadsell) loss, `masf.metric_loss`. Images of all domains of the
  episode (meta-train and meta-test) take part.

The objective is differentiated exactly with nested jax.grad (second order unless
`meta.first_order`; the released TF code is first order). Its two parts, the task gradient
∇_θ L_task(θ) and the meta gradient ∇_θ [β₁ L_global + β₂ L_local](θ'(θ)), go either to one
optimizer as their sum (`meta.optimizers='summed'`: the gradient of F) or, as in the released
code (`'released'`), to two Adam states over θ with the same rate (outer_lr; `meta.task_learning_rate`
0 = optimizer.learning_rate), the meta gradient clipped per tensor at 2.0 (`meta.outer_clip`),
the two updates summed (methods/episodic.py). φ is updated by its own optimizer
(`masf.metric_lr`) with ∂F/∂φ = β₂ ∂L_local/∂φ, as the code's metric_train_op.
BatchNorm: see medgen_jax/meta.py.

Differences from the released code (biomedia-mira/masf), kept on purpose: the inner gradient is
that of the mean task loss over the pooled meta-train batch (TF differentiates the per-sample loss
vector, i.e. the sum over the batch, so the same per-tensor clip bites far more often there);
every parameter is adapted, BN included; φ is not also updated by the meta optimizer (the code's
variable-filter quirk).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from medgen_jax import losses
from medgen_jax.methods import deepall, episodic
from medgen_jax.methods.episodic import make_metric_step
from medgen_jax.parallel import gather_global

LABEL = "MASF"
SAMPLER = episodic.SAMPLER
validate = episodic.validate
eval_network = deepall.eval_network


def init_state(key, config, info):
  return episodic.init_state(key, config, info, with_metric=True)


def make_step(config, info):
  return episodic.make_step(make_train_step, config, info)


def label(config, sources):
  return episodic.label(LABEL, config)


def class_mean_features(features, onehot, *, eps: float = 1e-6):
  """Per image and class: mean feature over that class's pixels. Returns ([B·C, F], class ids
  [B·C], valid [B·C] = class present in the image)."""
  b, c = onehot.shape[0], onehot.shape[-1]
  features = features.astype(jnp.promote_types(features.dtype, jnp.float32))
  sums = jnp.einsum("bhwc,bhwf->bcf", onehot.astype(features.dtype), features)
  counts = jnp.sum(onehot, axis=(1, 2))
  means = sums / (counts[..., None] + eps)
  labels = jnp.broadcast_to(jnp.arange(c), (b, c))
  return means.reshape(b * c, -1), labels.reshape(-1), (counts > 0).reshape(-1)


def metric_loss(name: str, embeddings, labels, valid, *, margin: float):
  if name == "triplet":
    return losses.semi_hard_triplet_loss(embeddings, labels, margin=margin, valid=valid)
  if name == "contrastive":
    return losses.contrastive_loss(embeddings, labels, margin=margin, valid=valid)
  raise ValueError(f"unknown metric loss {name!r}: triplet | contrastive")


def global_alignment(logits_tr, onehot_tr, logits_te, onehot_te, *, n_tr: int, n_te: int,
                     temperature: float, variant: str, axis_name=None):
  """Mean over (meta-train domain i, meta-test domain j) pairs of the class alignment loss.
  Episode batches interleave their domains, so domain i of a group is rows i::n."""
  pairs = [losses.class_alignment_loss(logits_tr[i::n_tr], onehot_tr[i::n_tr], logits_te[j::n_te],
                                       onehot_te[j::n_te], temperature=temperature, variant=variant,
                                       axis_name=axis_name)
           for i in range(n_tr) for j in range(n_te)]
  return sum(pairs) / len(pairs)


def make_outer(model, config, *, num_classes: int, axis_name: str | None = None, metric_model=None):
  """outer(adapted, phi, episode) -> (β₁ · L_global + β₂ · L_local at θ', metrics)."""
  m, c = config.meta, config.masf

  def outer(adapted, phi, episode):
    meta_train, meta_test = episode["meta_train"], episode["meta_test"]
    logits_tr, feats_tr = episode["forward"](adapted, "meta_train")
    logits_te, feats_te = episode["forward"](adapted, "meta_test")
    onehot_tr = jax.nn.one_hot(meta_train["label"], num_classes)
    onehot_te = jax.nn.one_hot(meta_test["label"], num_classes)
    loss_global = global_alignment(logits_tr, onehot_tr, logits_te, onehot_te,
                                   n_tr=m.meta_train_domains, n_te=m.meta_test_domains,
                                   temperature=c.temperature, variant=c.alignment_variant,
                                   axis_name=axis_name)
    vectors, labels, valid = class_mean_features(jnp.concatenate([feats_tr, feats_te]),
                                                 jnp.concatenate([onehot_tr, onehot_te]))
    embeddings = metric_model.apply({"params": phi}, vectors)
    loss_local = metric_loss(c.metric_loss, gather_global(embeddings, axis_name),
                             gather_global(labels, axis_name), gather_global(valid, axis_name),
                             margin=c.margin)
    return (c.global_weight * loss_global + c.local_weight * loss_local,
            {"loss_global": loss_global, "loss_local": loss_local})

  return outer


def make_train_step(model, tx, config, *, num_classes: int, axis_name: str | None = None,
                    bn_sync: bool = True, metric_model=None, metric_tx=None, task_tx=None):
  outer = make_outer(model, config, num_classes=num_classes, axis_name=axis_name,
                     metric_model=metric_model)
  return make_metric_step(outer, model, tx, config, num_classes=num_classes, axis_name=axis_name,
                          bn_sync=bn_sync, metric_tx=metric_tx, task_tx=task_tx)
