"""Episodic parts shared by the meta-learning methods: the episode's augmentation and inner clip
(MLDG, MASF, SAML), and the skeleton of MASF and SAML: one inner step on meta-train, an outer
objective at θ' with a metric network M_φ, one optimizer for θ and one for φ.

    θ' = θ − α · clip(∇_θ L_inner(θ; D_tr)),     F(θ, φ) = L_inner(θ; D_tr) + outer(θ', φ; D_tr, D_te)

`outer(adapted, phi, episode) -> (loss, metrics)` is the method's own part; `episode` holds the
(augmented) meta-train and meta-test batches, the BN statistics and the dropout keys of the step.
The forward passes at θ' (`forward`) run in training mode and discard their BN statistics (see
medgen_jax/meta.py).
"""

from __future__ import annotations

import jax

from medgen_jax import augment, meta
from medgen_jax.methods.deepall import finish_step, make_loss_fn


def make_task_optimizer(config):
  """The second optimizer of θ for the task loss when `meta.optimizers` is 'released'
  (MASF/SAML as released), or None (one optimizer on the summed objective)."""
  return None


def inner_clip(meta_config):
  """The per-tensor inner-gradient clip norm, or None when `meta.clip` is 0 (off)."""
  return meta_config.clip if meta_config.clip and meta_config.clip > 0 else None


def augment_episode(key, batch, config):
  """BigAug (when enabled) on both groups of an episode, with independent keys."""
  k_tr, k_te = jax.random.split(key)
  augment_config = config.get("augment")
  return (augment.maybe_augment(k_tr, batch["meta_train"], augment_config),
          augment.maybe_augment(k_te, batch["meta_test"], augment_config))


def forward(model, params, batch_stats, images, key):
  """Train-mode forward at (adapted) params: (logits, features); BN statistics discarded."""
  (logits, features), _ = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                      train=True, return_features=True, mutable=["batch_stats"],
                                      rngs={"dropout": key})
  return logits, features


def make_metric_step(outer, model, tx, config, *, num_classes: int, axis_name: str | None,
                     bn_sync: bool, metric_tx):
  inner_loss = make_loss_fn(model, config.loss, num_classes=num_classes, axis_name=axis_name)
  m = config.meta

  def step(state, batch, key):
    if axis_name is not None:
      key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    augment_key, key_inner, key_tr, key_te = jax.random.split(key, 4)
    meta_train, meta_test = augment_episode(augment_key, batch, config)
    episode = {"meta_train": meta_train, "meta_test": meta_test, "batch_stats": state.batch_stats,
               "key_tr": key_tr, "key_te": key_te}

    def objective(all_params):
      adapted, loss_inner, (inner_metrics, batch_stats) = meta.adapt(
          lambda p, b: inner_loss(p, state.batch_stats, b, key_inner), all_params["model"],
          meta_train, inner_lr=m.inner_lr, first_order=m.first_order, clip=inner_clip(m),
          has_aux=True, axis_name=axis_name)
      loss_outer, outer_metrics = outer(adapted, all_params["metric"], episode)
      total = loss_inner + loss_outer
      # "loss" is the whole objective: the trainer's non-finite guard watches it.
      return total, (dict(inner_metrics, **outer_metrics, loss_inner=loss_inner, loss=total,
                          loss_total=total), batch_stats)

    (_, (metrics, batch_stats)), grads = jax.value_and_grad(objective, has_aux=True)(
        {"model": state.params, "metric": state.metric_params})
    return finish_step(state, tx, grads["model"], metrics, batch_stats, axis_name=axis_name,
                       bn_sync=bn_sync, metric_tx=metric_tx, metric_grads=grads["metric"])

  return step
