"""CyCADA: cycle-consistent adversarial domain adaptation (Hoffman et al., ICML 2018), on a U-Net.

Phase 0 (steps [0, P), P = `cycada.pretrain_steps`): the source model f_S trained on the
labelled source (DeepAll's step, adda.source_step); its frozen copy is `nets['source']`, and
the task model f_T (the top-level segmenter, what is evaluated on real target images) starts as
that copy. Phase 1, each step on one source + target batch (the paper's eq. 7 objective, its
terms updated in this order):
1. generators (cyclegan.generator_update): LSGAN both ways + λ_cyc cycle (translation.py) +
   the semantic consistency loss (eq. 5) with the frozen f_S in inference mode:
     λ_sem · [CE(f_S(G_st(x_s)), argmax f_S(x_s)) + CE(f_S(G_ts(x_t)), argmax f_S(x_t))]
   (losses.semantic_consistency_loss: mean pixel cross-entropy against the argmax labels);
2. the image discriminators D_t, D_s (LSD, image pools);
3. the feature discriminator D_f (eq. 6, models.FeatureDiscriminator on f_T's U-Net block
   `cycada.feature_level`, Adam `cycada.disc_lr`): non-saturating GAN with the translated
   source G_st(x_s) as real and the target x_t as fake (losses.gan_discriminator_loss);
4. the task model f_T: the task loss (weighted CE + Dice + L2) on (G_st(x_s), y_s) (eq. 1 on
   translated images) + λ_f · gan_generator_loss(D_f(f_T(x_t))) (`cycada.feature_weight`, 0 =
   pixel-level CyCADA only).
The translated images in 3 and 4 are update 1's (pre-update generators, gradient stopped).

The semantic loss is the paper's eq. 5 (argmax f_S on both directions). The release
(jhoffman/cycada_release, cycle_gan_semantic_model.py) differs: its S→T term uses the source
ground truth y_s, its G_A loss is weighted ×2, and its labelling network is trained jointly
(semantic loss off while that network's loss is > 1). Not reproduced.
Differences from the paper, on purpose: LSGAN (SIFA's translation networks) instead of the
paper's standard GAN for the image discriminators; U-Net f_S/f_T (the paper: FCN8s/DRN); the
feature GAN reads a U-Net block, and the translation and the task model train together in one
phase (the paper trains the CycleGAN first, then f_T on its fixed translations).
BatchNorm: f_S in inference mode (frozen); f_T's passes in train mode (source-like translated
batch, then target batch, statistics threaded). Selection: eval.selection='val' is refused
(a phase-0 checkpoint would report f_S as CyCADA).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from medgen_jax import losses
from medgen_jax.methods import deepall
from medgen_jax.methods.base import device_mean, flag_non_finite, fold_device, init_net, update_net
from medgen_jax.methods.uda import common, cyclegan, translation
from medgen_jax.methods.uda.adda import check_pretrain_steps, check_selection, init_two_stage, pretrain_then
from medgen_jax.models.gan import FeatureDiscriminator
from medgen_jax.train_state import TrainState, make_optimizer

LABEL = "CyCADA"
SAMPLER = "source_target"
eval_network = deepall.eval_network


def label(config, sources) -> str:
  return LABEL


def validate(config) -> None:
  c = config.cycada
  common.validate_target(config)
  translation.validate(config, LABEL)
  check_selection(config, LABEL)
  check_pretrain_steps(c.pretrain_steps, config.num_steps, "cycada.pretrain_steps")
  common.check_level(c.feature_level, config.model.depth, "cycada.feature_level")
  for key in ("semantic_weight", "feature_weight"):
    if c[key] < 0:
      raise ValueError(f"config.cycada.{key}={c[key]}: must be >= 0")


def feature_discriminator(config):
  c = config.cycada
  return FeatureDiscriminator(features=c.disc_features, num_layers=c.disc_layers), optax.adam(c.disc_lr)


def init_state(key, config, info) -> TrainState:
  # Phase 1 trains the task model f_T with a fresh config.optimizer (opt_state['target']), its
  # schedule over phase 1's steps.
  state = init_two_stage(key, config, info, lambda p: task_tx(config))
  nets = dict(state.nets, **cyclegan.init_translation_nets(jax.random.fold_in(key, 7), config, info))
  _, levels = jax.eval_shape(
      lambda p: deepall.segmenter(config, info, train=False).apply(
          {"params": p, "batch_stats": state.batch_stats}, jnp.zeros((1, *info.input_shape)),
          return_levels=True), state.params)
  disc, disc_tx = feature_discriminator(config)
  feature = jnp.zeros(levels[config.cycada.feature_level].shape, jnp.float32)
  psi = jax.jit(lambda k: disc.init(k, feature))(jax.random.fold_in(key, 8))["params"]
  nets["d_feat"] = init_net(psi, {}, disc_tx)
  return state.replace(nets=nets)


def source_logits(config, info, state, images):
  model = deepall.segmenter(config, info, train=False)
  src = state.nets["source"]
  return model.apply({"params": src.params, "batch_stats": src.batch_stats}, images, train=False)


def task_features(config, info, params, batch_stats, images, key):
  model = deepall.segmenter(config, info, train=True)
  _, levels, stats = common.forward(model, params, batch_stats, images, key)
  return levels[config.cycada.feature_level].astype(jnp.float32), stats


def adapt_step(state: TrainState, batch, key, config, info):
  c = config.cycada
  x_s, x_t = batch["source"]["image"], batch["target"]["image"]
  labels_s = jax.lax.stop_gradient(jnp.argmax(source_logits(config, info, state, x_s), axis=-1))
  labels_t = jax.lax.stop_gradient(jnp.argmax(source_logits(config, info, state, x_t), axis=-1))

  def semantic(p_st, p_ts, fake_t, fake_s):
    term = (losses.semantic_consistency_loss(source_logits(config, info, state, fake_t), labels_s)
            + losses.semantic_consistency_loss(source_logits(config, info, state, fake_s), labels_t))
    return c.semantic_weight * term, {"loss_semantic": term}

  new, metrics, fake_t = cyclegan.translation_updates(state, batch, key, config, info, extra_loss=semantic)
  fake_t = jax.lax.stop_gradient(fake_t)
  local_key = fold_device(jax.random.fold_in(key, 3), info.axis_name)
  key_f, key_s, key_t = jax.random.split(local_key, 3)
  disc, disc_tx = feature_discriminator(config)
  if c.feature_weight > 0:
    f_s, _ = task_features(config, info, new.params, new.batch_stats, fake_t, key_s)
    f_t, _ = task_features(config, info, new.params, new.batch_stats, x_t, key_t)
    f_s, f_t = jax.lax.stop_gradient((f_s, f_t))

    def disc_objective(psi):
      return losses.gan_discriminator_loss(disc.apply({"params": psi}, f_s), disc.apply({"params": psi}, f_t))

    loss_f, grads = jax.value_and_grad(disc_objective)(new.nets["d_feat"].params)
    grads = device_mean(grads, info.axis_name)
    metrics["loss_d_feat"] = device_mean(loss_f, info.axis_name)
    new = new.replace(nets=dict(new.nets, d_feat=update_net(new.nets["d_feat"], disc_tx, grads)))
  psi = new.nets["d_feat"].params

  def feature_gan(params, stats, _):
    f_t, stats = task_features(config, info, params, stats, x_t, key_t)
    term = losses.gan_generator_loss(disc.apply({"params": psi}, f_t))
    return c.feature_weight * term, {"loss_feat_adv": term}, stats

  seg_key = fold_device(jax.random.fold_in(key, 2), info.axis_name)
  new, seg_metrics = segmenter_step(new, fake_t, batch["source"]["label"], seg_key, config, info,
                                    extra=feature_gan if c.feature_weight > 0 else None)
  metrics = dict(metrics, **seg_metrics)
  return flag_non_finite(state, new, cyclegan.gan_checked(metrics, new)), metrics


def task_tx(config):
  return make_optimizer(config.optimizer, num_steps=config.num_steps - config.cycada.pretrain_steps)


def segmenter_step(state, images, labels, key, config, info, *, extra=None):
  """cyclegan.segmenter_update of the task model with its own optimizer state opt_state['target']
  (fresh at the switch; config.optimizer's schedule over phase 1's steps)."""
  inner = state.replace(opt_state=state.opt_state["target"])
  new, metrics = cyclegan.segmenter_update(inner, images, labels, key, config, info, extra=extra, tx=task_tx(config))
  return new.replace(opt_state=dict(state.opt_state, target=new.opt_state)), metrics


def make_step(config, info):
  return pretrain_then(config, info, pretrain_steps=config.cycada.pretrain_steps,
                       adapt=lambda state, batch, key: adapt_step(state, batch, key, config, info))


def write_figures(config, data, state, out_dir):
  return cyclegan.write_preview(config, data, state, out_dir, eval_network)
