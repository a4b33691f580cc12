"""DANN: domain-adversarial training with a gradient reversal layer (Ganin & Lempitsky, ICML 2015;
Ganin et al., JMLR 2016), on a U-Net segmenter.

One objective, minimized over the segmenter θ and the domain classifier ψ at once:

    E(θ, ψ) = L_seg(θ; x_s, y_s) + w · L_d(ψ; R_λ(f_θ(x_s)), R_λ(f_θ(x_t)))

* L_seg: the task loss on the labelled source slices (weighted CE + Dice + L2, as DeepAll);
* f_θ: the U-Net block `dann.level` (the bottleneck by default) of the source and target passes;
* L_d: the domain classifier's sigmoid cross-entropy, source = 1, target = 0
  (losses.gan_discriminator_loss), ψ = models.FeatureDiscriminator;
* R_λ: gradient reversal (losses.gradient_reversal): identity forward, −λ·g backward, so ψ
  descends L_d while θ ascends it (eq. 13 of the JMLR paper); λ_p = 2/(1 + exp(−γp)) − 1 with
  p = step / num_steps and γ = 10 (`dann.gamma`).

Both networks are updated in the same step from the same gradient: θ by config.optimizer, ψ by
Adam(`dann.disc_lr`) on w·∇ψ L_d (the usual gradient-reversal implementation; the reversal scale
λ acts on θ only). The paper's SGD schedule μ_p = 0.01/(1+10p)^0.75 is not the default here
(config.optimizer applies to θ, as for every segmenter); configs say which they use.
BatchNorm: see methods/uda/common.py (separate source and target passes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from medgen_jax import losses
from medgen_jax.methods import deepall
from medgen_jax.methods.base import fold_device, init_net
from medgen_jax.methods.deepall import finish_step, segmentation_terms
from medgen_jax.methods.uda import common
from medgen_jax.models.gan import FeatureDiscriminator
from medgen_jax.train_state import make_optimizer

LABEL = "DANN"
SAMPLER = "source_target"
eval_network = deepall.eval_network


def label(config, sources) -> str:
  return LABEL


def validate(config) -> None:
  common.validate_target(config)
  common.check_level(config.dann.level, config.model.depth, "dann.level")


def discriminator(config):
  c = config.dann
  return FeatureDiscriminator(features=c.disc_features, num_layers=c.disc_layers), optax.adam(c.disc_lr)


def init_state(key, config, info):
  state = deepall.init_state(key, config, info)
  disc, disc_tx = discriminator(config)
  # The classifier's input shape: the chosen block's output for one slice.
  _, levels = jax.eval_shape(
      lambda p: deepall.segmenter(config, info, train=False).apply(
          {"params": p, "batch_stats": state.batch_stats}, jnp.zeros((1, *info.input_shape)),
          return_levels=True), state.params)
  feature = levels[config.dann.level]
  psi = disc.init(jax.random.fold_in(key, 1), jnp.zeros(feature.shape, jnp.float32))["params"]
  return state.replace(nets={"disc": init_net(psi, {}, disc_tx)})


def make_train_step(model, tx, config, *, num_classes: int, axis_name: str | None = None,
                    bn_sync: bool = True, disc=None, disc_tx=None):
  c = config.dann

  def step(state, batch, key):
    key = fold_device(key, axis_name)
    augment_key, key_s, key_t = jax.random.split(key, 3)
    source = common.augment_source(augment_key, batch, config)
    scale = losses.dann_lambda(state.step / config.num_steps, gamma=c.gamma)

    def objective(params, psi):
      logits_s, levels_s, stats = common.forward(model, params, state.batch_stats, source["image"], key_s)
      _, levels_t, stats = common.forward(model, params, stats, batch["target"]["image"], key_t)
      loss_seg, metrics = segmentation_terms(logits_s, source["label"], params, config.loss,
                                             num_classes=num_classes, axis_name=axis_name)
      reversed_s = losses.gradient_reversal(levels_s[c.level], scale)
      reversed_t = losses.gradient_reversal(levels_t[c.level], scale)
      d_s = disc.apply({"params": psi}, reversed_s)
      d_t = disc.apply({"params": psi}, reversed_t)
      loss_domain = losses.gan_discriminator_loss(d_s, d_t)
      accuracy = 0.5 * (jnp.mean(d_s > 0) + jnp.mean(d_t < 0))
      total = loss_seg + c.weight * loss_domain
      return total, (dict(metrics, loss=total, loss_seg=loss_seg, loss_domain=loss_domain,
                          domain_accuracy=accuracy, reversal_scale=scale), stats)

    (_, (metrics, stats)), (g_theta, g_psi) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
        state.params, state.nets["disc"].params)
    return finish_step(state, tx, g_theta, metrics, stats, axis_name=axis_name, bn_sync=bn_sync,
                       net_grads={"disc": g_psi}, net_txs={"disc": disc_tx})

  return step


def make_step(config, info):
  disc, disc_tx = discriminator(config)
  return make_train_step(deepall.segmenter(config, info, train=True),
                         make_optimizer(config.optimizer, num_steps=config.num_steps), config,
                         num_classes=info.num_classes, axis_name=info.axis_name,
                         bn_sync=deepall.bn_synced(config, info), disc=disc, disc_tx=disc_tx)
