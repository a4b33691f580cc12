"""DeepAll (= "Joint"): one model trained on all source sites pooled.

Loss: segmentation_loss (weighted CE + soft Dice, losses.py) + an explicit L2 term on kernels.
Used per site, the same step gives the "Separate" baseline (one model per site); with
`config.augment.enabled` it is the DeepAll + BigAug baseline.

`make_train_step` returns the pure `step(state, batch, key) -> (state, metrics)`. With
`axis_name` (pmap over the data-parallel axis) the Dice/CE batch sums are global, gradients,
metrics and (unsynchronized) BatchNorm statistics are averaged over devices; without it the same
function runs on one device unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from medgen_jax import augment, losses
from medgen_jax.train_state import TrainState


def segmentation_terms(logits, labels, params, loss_config, *, num_classes: int,
                       axis_name: str | None = None):
  """The task loss on logits: weighted CE + Dice (+ L2 on kernels). Returns (loss, metrics)."""
  seg, metrics = losses.segmentation_loss(
      logits, labels, num_classes=num_classes, ce_weight=loss_config.ce_weight,
      dice_weight=loss_config.dice_weight, dice_variant=loss_config.dice_variant,
      include_background=loss_config.include_background, class_weights=loss_config.class_weights,
      ce_clip=loss_config.ce_clip, axis_name=axis_name)
  l2 = losses.l2_kernel_loss(params, coefficient=loss_config.weight_decay)
  return seg + l2, dict(metrics, loss=seg + l2, loss_l2=l2)


def make_loss_fn(model, loss_config, *, num_classes: int, axis_name: str | None = None):
  """loss_fn(params, batch_stats, batch, key) -> (loss, (metrics, new_batch_stats))."""

  def loss_fn(params, batch_stats, batch, key):
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"],
                                  train=True, mutable=["batch_stats"], rngs={"dropout": key})
    loss, metrics = segmentation_terms(logits, batch["label"], params, loss_config,
                                       num_classes=num_classes, axis_name=axis_name)
    return loss, (metrics, updates.get("batch_stats", batch_stats))

  return loss_fn


def finish_step(state: TrainState, tx, grads, metrics, batch_stats, *, axis_name, bn_sync,
                metric_tx=None, metric_grads=None, task_tx=None, task_grads=None):
  """Shared tail of every method's step: average over devices, apply the optimizer(s).

  `tx` applies `grads`; with `task_tx`, a second optimizer (state `task_opt_state`) applies
  `task_grads` to the same parameters and the two updates are summed, as when TF ran two train
  ops in one `session.run` (MASF/SAML as released). `metric_tx` updates the metric network.
  The step also records in `first_bad_step` the first step whose loss, gradient norm, new
  parameters or BatchNorm statistics are not finite (the trainer's divergence guard; nothing is
  skipped here).
  """
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    metrics = jax.lax.pmean(metrics, axis_name)
    if metric_grads is not None:
      metric_grads = jax.lax.pmean(metric_grads, axis_name)
    if task_grads is not None:
      task_grads = jax.lax.pmean(task_grads, axis_name)
    if not bn_sync:  # keep the replicated state identical: average per-device statistics
      batch_stats = jax.lax.pmean(batch_stats, axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new = state.replace(opt_state=opt_state)
  grad_norm = optax.tree.norm(grads)
  if task_tx is not None:
    task_updates, task_opt_state = task_tx.update(task_grads, state.task_opt_state, state.params)
    updates = jax.tree.map(lambda a, b: a + b, updates, task_updates)
    new = new.replace(task_opt_state=task_opt_state)
    metrics = dict(metrics, task_grad_norm=optax.tree.norm(task_grads))
  params = optax.apply_updates(state.params, updates)
  metrics = dict(metrics, grad_norm=grad_norm)
  dice = metrics.pop("dice", None)
  if dice is not None:
    metrics.update({f"dice_{c}": dice[c] for c in range(dice.shape[0])})
  new = new.replace(step=state.step + 1, params=params, batch_stats=batch_stats)
  checked = [metrics["loss"], grad_norm, optax.tree.norm(params), optax.tree.norm(batch_stats)]
  if metric_grads is not None:
    metric_updates, metric_opt_state = metric_tx.update(metric_grads, state.metric_opt_state,
                                                        state.metric_params)
    metric_params = optax.apply_updates(state.metric_params, metric_updates)
    new = new.replace(metric_params=metric_params, metric_opt_state=metric_opt_state)
    checked.append(optax.tree.norm(metric_params))
  if task_grads is not None:
    checked.append(metrics["task_grad_norm"])
  finite = jnp.all(jnp.isfinite(jnp.stack([jnp.asarray(v, jnp.float32) for v in checked])))
  first_bad = jnp.where((state.first_bad_step == 0) & ~finite, state.step + 1, state.first_bad_step)
  return new.replace(first_bad_step=first_bad.astype(jnp.int32)), metrics


def make_train_step(model, tx: optax.GradientTransformation, config, *, num_classes: int,
                    axis_name: str | None = None, bn_sync: bool = True, **unused):
  loss_fn = make_loss_fn(model, config.loss, num_classes=num_classes, axis_name=axis_name)
  augment_config = config.get("augment")

  def step(state: TrainState, batch, key):
    if axis_name is not None:
      key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    augment_key, dropout_key = jax.random.split(key)
    batch = augment.maybe_augment(augment_key, batch, augment_config)
    (_, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, batch, dropout_key)
    return finish_step(state, tx, grads, metrics, batch_stats, axis_name=axis_name, bn_sync=bn_sync)

  return step
