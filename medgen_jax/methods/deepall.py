"""DeepAll (= "Joint"): one model trained on all source sites pooled; with `model.norm='dsbn'`,
DSBN (Chang et al., CVPR 2019; the DSBN row of MS-Net, Liu et al., IEEE TMI 2020): the same
network and step, but every BatchNorm keeps statistics, scale and bias per training site and
each slice is normalized with its own site's (models/domains.DomainBatchNorm); evaluation
applies the test site's BN (an unseen site: model.unseen_domain).

Loss: segmentation_loss (weighted CE + soft Dice, losses/segmentation.py) + an explicit L2 term on kernels.
Used per site, the same step gives the "Separate" baseline (one model per site); with
`config.augment.enabled` it is the DeepAll + BigAug baseline.

`make_train_step` returns the pure `step(state, batch, key) -> (state, metrics)`. With
`axis_name` (pmap over the data-parallel axis) the Dice/CE batch sums are global, gradients,
metrics and (unsynchronized) BatchNorm statistics are averaged over devices; without it the same
function runs on one device unchanged.
"""

from __future__ import annotations

import jax
import optax

from medgen_jax import augment, losses
from medgen_jax.methods.base import (device_mean, flag_non_finite, fold_device, segmenter_variables, split_dice,
                                     state_norms, update_net)
from medgen_jax.train_state import TrainState, create_train_state, make_model, make_optimizer

LABEL = "DeepAll"
SAMPLER = "pooled"


def config_segmentation_loss(logits, labels, loss_config, *, num_classes: int, axis_name: str | None = None):
  """losses.segmentation_loss (weighted CE + Dice) with config.loss's settings. Returns (loss,
  metrics); sums over `logits`' samples only (and over devices with `axis_name`)."""
  return losses.segmentation_loss(
      logits, labels, num_classes=num_classes, ce_weight=loss_config.ce_weight,
      dice_weight=loss_config.dice_weight, dice_variant=loss_config.dice_variant,
      include_background=loss_config.include_background, class_weights=loss_config.class_weights,
      ce_clip=loss_config.ce_clip, axis_name=axis_name)


def segmentation_terms(logits, labels, params, loss_config, *, num_classes: int,
                       axis_name: str | None = None):
  """The task loss on logits: weighted CE + Dice (+ L2 on kernels). Returns (loss, metrics)."""
  seg, metrics = config_segmentation_loss(logits, labels, loss_config, num_classes=num_classes,
                                          axis_name=axis_name)
  l2 = losses.l2_kernel_loss(params, coefficient=loss_config.weight_decay)
  return seg + l2, dict(metrics, loss=seg + l2, loss_l2=l2)


def domain_specific(model) -> bool:
  """True for a network with several domains' parameter sets (models/domains.py)."""
  return getattr(model, "num_domains", 1) > 1


def make_loss_fn(model, loss_config, *, num_classes: int, axis_name: str | None = None):
  """loss_fn(params, batch_stats, batch, key) -> (loss, (metrics, new_batch_stats))."""

  # Domain-specific layers (DSBN, adapters) read each slice's site: the pooled batch's ids.
  domain_kw = (lambda batch: {"domain": batch["domain"]}) if domain_specific(model) else (lambda batch: {})

  def loss_fn(params, batch_stats, batch, key):
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"],
                                  train=True, mutable=["batch_stats"], rngs={"dropout": key},
                                  **domain_kw(batch))
    loss, metrics = segmentation_terms(logits, batch["label"], params, loss_config,
                                       num_classes=num_classes, axis_name=axis_name)
    return loss, (metrics, updates.get("batch_stats", batch_stats))

  return loss_fn


def finish_step(state: TrainState, tx, grads, metrics, batch_stats, *, axis_name, bn_sync,
                task_tx=None, task_grads=None, net_grads=None, net_txs=None):
  """Shared tail of a segmenter step: average over devices, apply the optimizer(s).

  `tx` applies `grads`; with `task_tx`, a second optimizer (state `task_opt_state`) applies
  `task_grads` to the same parameters and the two updates are summed, as when TF ran two train
  ops in one `session.run` (MASF/SAML as released). `net_grads[name]` updates the named network
  `state.nets[name]` with `net_txs[name]` (MASF/SAML's metric network).
  The step also records in `first_bad_step` the first step whose loss, gradient norm, new
  parameters or BatchNorm statistics are not finite (the trainer's divergence guard; nothing is
  skipped here).
  """
  net_grads = net_grads or {}
  grads = device_mean(grads, axis_name)
  metrics = device_mean(metrics, axis_name)
  net_grads = device_mean(net_grads, axis_name)
  task_grads = device_mean(task_grads, axis_name)
  if axis_name is not None and not bn_sync:  # keep the replicated state identical
    batch_stats = jax.lax.pmean(batch_stats, axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new = state.replace(opt_state=opt_state)
  grad_norm = optax.tree.norm(grads)
  checked = [metrics["loss"], grad_norm]
  if task_tx is not None:
    task_updates, task_opt_state = task_tx.update(task_grads, state.task_opt_state, state.params)
    updates = jax.tree.map(lambda a, b: a + b, updates, task_updates)
    new = new.replace(task_opt_state=task_opt_state)
    metrics = dict(metrics, task_grad_norm=optax.tree.norm(task_grads))
    checked.append(metrics["task_grad_norm"])
  params = optax.apply_updates(state.params, updates)
  metrics = split_dice(dict(metrics, grad_norm=grad_norm))
  nets = dict(state.nets)
  for name, g in net_grads.items():
    nets[name] = update_net(nets[name], net_txs[name], g)
  new = new.replace(step=state.step + 1, params=params, batch_stats=batch_stats, nets=nets)
  return flag_non_finite(state, new, checked + state_norms(new)), metrics


def make_train_step(model, tx: optax.GradientTransformation, config, *, num_classes: int,
                    axis_name: str | None = None, bn_sync: bool = True, **unused):
  loss_fn = make_loss_fn(model, config.loss, num_classes=num_classes, axis_name=axis_name)
  return step_from_loss(loss_fn, tx, config, axis_name=axis_name, bn_sync=bn_sync)


def step_from_loss(loss_fn, tx: optax.GradientTransformation, config, *, axis_name: str | None = None,
                   bn_sync: bool = True):
  """The one-optimizer segmenter step around `loss_fn(params, batch_stats, batch, key) -> (loss,
  (metrics, new_batch_stats))`: per-device key, optional BigAug, one gradient, `finish_step`."""
  augment_config = config.get("augment")

  def step(state: TrainState, batch, key):
    key = fold_device(key, axis_name)
    augment_key, dropout_key = jax.random.split(key)
    batch = augment.maybe_augment(augment_key, batch, augment_config)
    (_, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, batch, dropout_key)
    return finish_step(state, tx, grads, metrics, batch_stats, axis_name=axis_name, bn_sync=bn_sync)

  return step


# --- The method interface (methods/base.py) ------------------------------------------------------


def segmenter(config, info, *, train: bool):
  """The U-Net of config.model; for training, its BatchNorm synchronized over the data-parallel
  axis when `config.bn_sync` (and the trainer pmaps the step). With domain-specific layers
  (model.norm 'dsbn', model.adapter, model.se 'domain'), one parameter set per training site
  (info.domains)."""
  sync = train and bn_synced(config, info)
  return make_model(config.model, num_classes=info.num_classes, dtype=config.dtype,
                    bn_axis_name=info.axis_name if sync else None,
                    num_domains=info.num_domains if uses_domains(config) else 1)


def uses_domains(config) -> bool:
  """The network has per-site layers picked by each slice's site: DSBN (model.norm='dsbn'),
  residual adapters (model.adapter series | parallel) or per-site squeeze-and-excitation
  (model.se='domain', USE-Net) (models/adapters.py)."""
  model = config.model
  return (model.norm == "dsbn" or model.get("adapter", "none") != "none"
          or model.get("se", "none") == "domain")


def bn_synced(config, info) -> bool:
  return config.bn_sync and config.model.norm in ("batch", "dsbn") and info.axis_name is not None


def init_state(key, config, info) -> TrainState:
  tx = make_optimizer(config.optimizer, num_steps=config.num_steps)
  return create_train_state(key, segmenter(config, info, train=False), tx,
                            input_shape=(1, *info.input_shape))


def make_step(config, info):
  return make_train_step(segmenter(config, info, train=True),
                         make_optimizer(config.optimizer, num_steps=config.num_steps), config,
                         num_classes=info.num_classes, axis_name=info.axis_name,
                         bn_sync=bn_synced(config, info))


def eval_network(config, info):
  return segmenter(config, info, train=False), segmenter_variables


def label(config, sources) -> str:
  if config.method == "separate":
    base = f"Separate ({sources[0]})"
  elif architecture_label(config.model):
    base = architecture_label(config.model)
  else:  # the multi-site tables call one model on every site "Joint"; DG tables "DeepAll"
    base = LABEL if config.data.held_out else "Joint"
  return base + (" + BigAug" if config.augment.enabled else "")


def architecture_label(model) -> str:
  """The table name of the domain-specific parts: 'Series-Adapter' / 'Parallel-Adapter' (with
  DSBN, as in Rebuffi et al., where every BN is per domain; ' (shared BN)' otherwise), 'USE-Net'
  (per-site SE; ' (shared SE)' for one SE set), joined by ' + '; 'DSBN' alone; '' for none."""
  adapter, se = model.get("adapter", "none"), model.get("se", "none")
  parts = []
  if adapter != "none":
    parts.append(f"{adapter.capitalize()}-Adapter" + ("" if model.norm == "dsbn" else " (shared BN)"))
  if se != "none":
    parts.append("USE-Net" + (" (shared SE)" if se == "shared" else ""))
  if model.norm == "dsbn" and adapter == "none":
    parts.append("DSBN")
  return " + ".join(parts)


def model_runs(config, sources):
  """Separate trains one model per source site; DeepAll one on all of them."""
  if config.method == "separate":
    return [(f"separate_{site}", [site]) for site in sources]
  return [(config.method, list(sources))]
