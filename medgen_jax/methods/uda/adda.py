"""ADDA: adversarial discriminative domain adaptation (Tzeng et al., CVPR 2017), on a U-Net.

Two phases, each its own pure step, chosen from the step number (`make_step` returns
methods/base.Phases: the trainer compiles each phase once and picks it on the host):

1. Pre-training (steps 0 .. `adda.pretrain_steps` − 1), eq. 1 of the paper: the source model
   (encoder M_s and classifier C) is trained on the labelled source slices with the task loss
   (weighted CE + Dice + L2, config.optimizer: exactly DeepAll's step). After every update the
   frozen copy `state.nets['source']` is set to the segmenter, so at the switch it IS the
   pre-trained source model and the target model starts as its copy (M_t = M_s, the paper's
   initialisation). config.optimizer's schedule (e.g. cosine) runs over this phase's steps.
2. Adaptation (steps `adda.pretrain_steps` ..): the target encoder M_t (the top-level U-Net's
   encoder blocks down0 .. down{depth−1} and the bottleneck) plays against a discriminator D on
   the U-Net block `adda.level` (the bottleneck by default); the decoder and head (C) stay frozen,
   with their source BatchNorm statistics (common.partial_optimizer / keep_frozen_stats).
   Each step, on one batch:
     a. D update (eq. 9):  min_D  −E_s[log D(M_s(x_s))] − E_t[log(1 − D(M_t(x_t)))]
        = losses.gan_discriminator_loss(D(M_s(x_s)), D(M_t(x_t))), source = 1, target = 0;
        M_s = the frozen source model (`nets['source']`) on the source images;
     b. target-encoder update (eq. 10, the inverted-label GAN loss): min_{M_t} −E_t[log D(M_t(x_t))]
        = losses.gan_generator_loss(D(M_t(x_t))), with the D just updated in (a).
   Both with Adam(`adda.learning_rate`, b1=`adda.b1`) (the paper's digits setting: 2e-4, 0.5).
   The evaluated network is the top-level one: target encoder + frozen source decoder/head
   (M_t followed by C, as the paper tests).

Differences from the paper / released code, on purpose:
* The networks: a U-Net replaces LeNet/the digit encoders; "the encoder" is the U-Net's encoder
  path, D is models.FeatureDiscriminator (strided 3×3 convs + pooled linear head:
  `adda.disc_features`, `adda.disc_layers`) on a feature MAP, not the paper's 3 FC layers
  (500-500-1) on a feature vector. The decoder's skip connections read the target encoder's
  blocks, so every encoder block adapts even when D sees only the bottleneck.
* The D loss is the SUM of the two BCE means (the concatenated-batch BCE of the PyTorch ports
  is half of it; the optimum is the same, Adam is nearly scale-invariant).
* BatchNorm: both M_s and M_t run in train mode (batch statistics), so D cannot tell the
  domains apart by the normalisation mode; the source model's statistics are discarded (it is
  frozen); the target encoder's running statistics follow the target passes (what it is
  evaluated with), the frozen decoder's are the source ones.
* BigAug (config.augment) applies to the source images of both phases when enabled.

Metrics: `phase` (0 pre-training, 1 adaptation); `loss` is the segmentation loss in phase 1 and
the target encoder's adversarial loss in phase 2; each phase logs its own metrics (called as one
function, Phases completes the other phase's names with NaN). The two-phase parts here
(`source_step`, `init_two_stage`) are shared with PnP-AdaNet (pnp_adanet.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medgen_jax import losses
from medgen_jax.methods import deepall
from medgen_jax.methods.base import (Phases, device_mean, flag_non_finite, fold_device, init_net,
                                     state_norms, update_net)
from medgen_jax.methods.deepall import finish_step
from medgen_jax.methods.uda import common
from medgen_jax.models.gan import FeatureDiscriminator
from medgen_jax.train_state import TrainState, make_optimizer

LABEL = "ADDA"
SAMPLER = "source_target"
eval_network = deepall.eval_network


def label(config, sources) -> str:
  return LABEL


def check_pretrain_steps(steps: int, num_steps: int, key: str) -> None:
  if not 1 <= steps < num_steps:
    raise ValueError(f"config.{key}={steps}: the source model must be pre-trained (>= 1 step) and the "
                     f"pre-training must end before num_steps ({num_steps}) so that the adaptation runs: "
                     f"use 1 <= {key} < num_steps")


def check_selection(config, label: str) -> None:
  """A two-phase method refuses eval.selection='val': the best source-validation checkpoint can
  fall in the source pre-training phase, which would report the source-only model as `label`."""
  if config.eval.selection == "val":
    raise ValueError(f"config.eval.selection='val': {label}'s best source-validation checkpoint can be a "
                     f"source pre-training one (the source-only model reported as {label}); use "
                     f"eval.selection='last' (or 'oracle', labelled as such)")


def validate(config) -> None:
  common.validate_target(config)
  check_selection(config, LABEL)
  common.check_level(config.adda.level, config.model.depth, "adda.level")
  check_pretrain_steps(config.adda.pretrain_steps, config.num_steps, "adda.pretrain_steps")


# --- Parts shared with PnP-AdaNet: a supervised source phase, then an adaptation phase ----------


def init_two_stage(key, config, info, target_tx_of) -> TrainState:
  """DeepAll's initial segmenter with two optimizer states, {'source': config.optimizer (phase
  1), 'target': `target_tx_of(params)` (the adaptation's partial optimizer)}, and the frozen
  source model `nets['source']` (a copy of the segmenter, no optimizer state)."""
  state = deepall.init_state(key, config, info)
  opt_state = {"source": state.opt_state, "target": target_tx_of(state.params).init(state.params)}
  return state.replace(opt_state=opt_state,
                       nets={"source": init_net(state.params, state.batch_stats, None)})


def source_step(state: TrainState, batch, key, config, info, *, pretrain_steps: int):
  """Phase 1: DeepAll's step on the labelled source half (config.optimizer, its schedule over
  the `pretrain_steps` steps of the phase; opt_state['source']); then `nets['source']` = the new
  segmenter. Returns (state, metrics), step + 1."""
  augment_key, dropout_key = jax.random.split(key)
  source = common.augment_source(augment_key, batch, config)
  model = deepall.segmenter(config, info, train=True)
  loss_fn = deepall.make_loss_fn(model, config.loss, num_classes=info.num_classes, axis_name=info.axis_name)
  (_, (metrics, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, state.batch_stats, source, dropout_key)
  tx = make_optimizer(config.optimizer, num_steps=pretrain_steps)
  new, metrics = finish_step(state.replace(opt_state=state.opt_state["source"]), tx, grads, metrics, stats,
                             axis_name=info.axis_name, bn_sync=deepall.bn_synced(config, info))
  nets = dict(new.nets, source=new.nets["source"].replace(params=new.params, batch_stats=new.batch_stats))
  return new.replace(opt_state=dict(state.opt_state, source=new.opt_state), nets=nets), metrics


def keep_frozen(old, new, is_trainable):
  """The new parameters of the trainable top-level modules, the old (bit-identical) others."""
  return {name: (new[name] if is_trainable(name) else old[name]) for name in old}


# --- ADDA ----------------------------------------------------------------------------------------


def discriminator(config):
  c = config.adda
  return FeatureDiscriminator(features=c.disc_features, num_layers=c.disc_layers)


def adam(config):
  """Phase 2's optimizer (D and the target encoder): every phase-2 update builds it here, so a
  test can substitute one (e.g. SGD(1) for a hand-gradient check)."""
  return common.adam(config.adda.learning_rate, b1=config.adda.b1)


def target_encoder(config):
  """is_trainable of phase 2: the encoder blocks down* and the bottleneck."""
  return common.whole_encoder(config.model.depth)


def target_tx(config, params):
  return common.partial_optimizer(adam(config), params, target_encoder(config))


def init_state(key, config, info):
  state = init_two_stage(key, config, info, lambda p: target_tx(config, p))
  _, levels = jax.eval_shape(
      lambda p: deepall.segmenter(config, info, train=False).apply(
          {"params": p, "batch_stats": state.batch_stats}, jnp.zeros((1, *info.input_shape)),
          return_levels=True), state.params)
  feature = levels[config.adda.level]
  psi = discriminator(config).init(jax.random.fold_in(key, 1), jnp.zeros(feature.shape, jnp.float32))["params"]
  return state.replace(nets=dict(state.nets, disc=init_net(psi, {}, adam(config))))


def _features(config, info, params, batch_stats, images, key):
  """(block `adda.level` of a train-mode pass, new BatchNorm statistics)."""
  model = deepall.segmenter(config, info, train=True)
  _, levels, stats = common.forward(model, params, batch_stats, images, key)
  return levels[config.adda.level].astype(jnp.float32), stats


def _keys(key, config, batch):
  augment_key, key_s, key_t = jax.random.split(key, 3)
  return common.augment_source(augment_key, batch, config), key_s, key_t


def disc_update(state: TrainState, batch, key, config, info):
  """Phase 2a: one Adam step of D on BCE(source features = 1, target features = 0); changes
  `nets['disc']` only. `key` is the step's (per-device) key. Returns (state, metrics)."""
  source, key_s, key_t = _keys(key, config, batch)
  src = state.nets["source"]
  f_s, _ = _features(config, info, src.params, src.batch_stats, source["image"], key_s)
  f_t, _ = _features(config, info, state.params, state.batch_stats, batch["target"]["image"], key_t)
  f_s, f_t = jax.lax.stop_gradient(f_s), jax.lax.stop_gradient(f_t)
  disc = discriminator(config)

  def objective(psi):
    d_s = disc.apply({"params": psi}, f_s)
    d_t = disc.apply({"params": psi}, f_t)
    accuracy = 0.5 * (jnp.mean(d_s > 0) + jnp.mean(d_t < 0))
    return losses.gan_discriminator_loss(d_s, d_t), accuracy

  (loss, accuracy), grads = jax.value_and_grad(objective, has_aux=True)(state.nets["disc"].params)
  grads = device_mean(grads, info.axis_name)
  metrics = device_mean({"loss_disc": loss, "disc_accuracy": accuracy}, info.axis_name)
  metrics["disc_grad_norm"] = optax.tree.norm(grads)
  nets = dict(state.nets, disc=update_net(state.nets["disc"], adam(config), grads))
  return state.replace(nets=nets), metrics


def encoder_update(state: TrainState, batch, key, config, info):
  """Phase 2b: one Adam step of the target encoder on gan_generator_loss(D(M_t(x_t))) (inverted
  labels), D fixed; the decoder, head and their BatchNorm statistics are left bit-identical.
  Same key use as disc_update, so the target pass is the same. Returns (state, metrics)."""
  _, _, key_t = _keys(key, config, batch)
  disc, psi = discriminator(config), state.nets["disc"].params
  trainable = target_encoder(config)

  def objective(params):
    f_t, stats = _features(config, info, params, state.batch_stats, batch["target"]["image"], key_t)
    return losses.gan_generator_loss(disc.apply({"params": psi}, f_t)), stats

  (loss, stats), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  grads = device_mean(grads, info.axis_name)
  loss = device_mean(loss, info.axis_name)
  if info.axis_name is not None and not deepall.bn_synced(config, info):
    stats = jax.lax.pmean(stats, info.axis_name)   # keep the replicas identical
  tx = target_tx(config, state.params)
  updates, opt_target = tx.update(grads, state.opt_state["target"], state.params)
  params = keep_frozen(state.params, optax.apply_updates(state.params, updates), trainable)
  stats = common.keep_frozen_stats(state.batch_stats, stats, trainable)
  new = state.replace(params=params, batch_stats=stats, opt_state=dict(state.opt_state, target=opt_target))
  # The norm of the trainable (encoder) part: the frozen blocks' gradients are not applied.
  grad_norm = optax.tree.norm({name: g for name, g in grads.items() if trainable(name)})
  return new, {"loss_adv": loss, "encoder_grad_norm": grad_norm}


def adapt_step(state: TrainState, batch, key, config, info):
  """Phase 2: disc_update, then encoder_update against the updated D (same batch); step + 1."""
  new, disc_metrics = disc_update(state, batch, key, config, info)
  new, enc_metrics = encoder_update(new, batch, key, config, info)
  new = new.replace(step=state.step + 1)
  metrics = dict(disc_metrics, **enc_metrics, loss=enc_metrics["loss_adv"])
  checked = [metrics["loss_disc"], metrics["loss_adv"], metrics["disc_grad_norm"], metrics["encoder_grad_norm"]]
  return flag_non_finite(state, new, checked + state_norms(new)), metrics


def phase_at(step, pretrain_steps: int):
  """0 = source pre-training, 1 = adaptation, at (0-based) step `step` (a traced step inside a
  step function; on the host a plain integer, computed with numpy: no device work)."""
  xp = jnp if isinstance(step, jax.core.Tracer) else np
  return (xp.asarray(step) >= pretrain_steps).astype(xp.int32)


def phase(step, config):
  return phase_at(step, config.adda.pretrain_steps)


def pretrain_then(config, info, *, pretrain_steps: int, adapt):
  """Phases (methods/base.py): `source_step` for steps [0, pretrain_steps), then
  `adapt(state, batch, key)` (given the step's replicated key); metric `phase` 0 / 1. The
  two-phase methods ADDA, SeUDA and CyCADA."""
  def pretrain(state, batch, key):
    key = fold_device(key, info.axis_name)
    new, metrics = source_step(state, batch, key, config, info, pretrain_steps=pretrain_steps)
    return new, dict(metrics, phase=jnp.zeros((), jnp.float32))

  def adaptation(state, batch, key):
    new, metrics = adapt(state, batch, key)
    return new, dict(metrics, phase=jnp.ones((), jnp.float32))

  return Phases(steps=(pretrain, adaptation), schedule=lambda step: phase_at(step, pretrain_steps))


def make_step(config, info):
  """Source pre-training, then adaptation (`pretrain_then`)."""
  return pretrain_then(config, info, pretrain_steps=config.adda.pretrain_steps,
                       adapt=lambda state, batch, key: adapt_step(
                           state, batch, fold_device(key, info.axis_name), config, info))
