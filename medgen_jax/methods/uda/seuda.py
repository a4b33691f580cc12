"""SeUDA: semantic-aware generative adversarial networks for unsupervised domain adaptation
(Chen, Dou, Chen, Heng, MLMI 2018; chest X-ray JSRT → Montgomery), here across modalities.

No official code exists (methods.md §3.3). What the paper states, implemented here:
1. the segmenter f_S is trained on the labelled source only (phase 0, steps [0, P), P =
   `seuda.pretrain_steps`: DeepAll's step, adda.source_step) and then frozen;
2. a CycleGAN (translation.py, cyclegan.py) learns target → source (G_ts) and back, with a
   semantic-aware adversarial loss: a mask discriminator D_m (a PatchGAN on the softmax of f_S,
   inference mode) tells f_S's segmentation of real source images (real) from its segmentation
   of translated target images f_S(G_ts(x_t)) (fake); G_ts is trained to fool it THROUGH the
   frozen segmenter:  L_G += λ_sem · LSG(D_m(softmax f_S(G_ts(x_t)))), D_m minimises
   LSD(D_m(softmax f_S(x_s)), D_m(softmax f_S(G_ts(x_t))));
3. at test time every target image is translated to the source appearance and segmented by
   the frozen f_S: the evaluated network is f_S ∘ G_ts ("no new model per target dataset").
Per phase-1 step: generators (LSGAN + λ_cyc cycle + λ_sem mask term), D_t, D_s (image pools,
the generators' pre-update fakes as CycleGAN), then D_m on a fresh translation by the UPDATED
G_ts (no pool), on one batch. `nets['source']` (the two-phase helper's frozen copy) is unused:
f_S is the top-level segmenter, frozen in phase 1.

Unverified (no code): the loss weights. λ_cyc = `gan.cycle_weight` = 10 (CycleGAN) and λ_sem =
`seuda.semantic_weight` = 0.5 follow a third-party PyTorch re-implementation (which also halves
the T→S image adversarial term; we weight both directions 1) — not the paper; the generator and
discriminators are SIFA's (the paper: a CycleGAN ResNet generator and PatchGAN; sizes not
verified). D_m is a PatchGAN on the C-channel softmax (`seuda.mask_disc_features`).
BatchNorm: f_S runs in inference mode in phase 1 (it is frozen; its statistics are the source
ones it is deployed with). Model selection: a two-phase method refuses eval.selection='val'
(the best source-validation checkpoint could be a phase-0 one, where G_ts is untrained).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from medgen_jax import losses
from medgen_jax.methods import deepall
from medgen_jax.methods.base import device_mean, flag_non_finite, init_net, update_net
from medgen_jax.methods.uda import common, cyclegan, translation
from medgen_jax.methods.uda.adda import check_pretrain_steps, check_selection, init_two_stage, pretrain_then
from medgen_jax.models.gan import PatchGAN
from medgen_jax.train_state import TrainState, compute_dtype

LABEL = "SeUDA"
SAMPLER = "source_target"


def label(config, sources) -> str:
  return LABEL


def validate(config) -> None:
  common.validate_target(config)
  translation.validate(config, LABEL)
  check_selection(config, LABEL)
  check_pretrain_steps(config.seuda.pretrain_steps, config.num_steps, "seuda.pretrain_steps")


class TranslateThenSegment(nn.Module):
  """segmenter(translator(x)): SeUDA's test-time network (target → source appearance → f_S)."""

  translator: nn.Module
  segmenter: nn.Module

  def __call__(self, x, *, train: bool = False):
    return self.segmenter(self.translator(x, train=False), train=False)


def eval_network(config, info):
  model = TranslateThenSegment(translator=translation.generator(config),
                               segmenter=deepall.segmenter(config, info, train=False))

  def variables_of(state):
    return {"params": {"translator": state.nets["g_ts"].params, "segmenter": state.params},
            "batch_stats": {"segmenter": state.batch_stats}}

  return model, variables_of


def mask_discriminator(config) -> PatchGAN:
  c = config.gan
  return PatchGAN(features=config.seuda.mask_disc_features, num_layers=c.disc_layers, pad=c.disc_pad,
                  use_bias=False, dtype=compute_dtype(config.dtype))


def init_state(key, config, info) -> TrainState:
  state = init_two_stage(key, config, info, lambda p: optax.set_to_zero())
  nets = dict(state.nets, **cyclegan.init_translation_nets(jax.random.fold_in(key, 7), config, info))
  probs = jnp.zeros((1, *info.input_shape[:2], info.num_classes), jnp.float32)
  psi = jax.jit(lambda k: mask_discriminator(config).init(k, probs, train=False))(jax.random.fold_in(key, 8))
  nets["d_mask"] = init_net(psi["params"], {}, translation.gan_adam(config))
  return state.replace(nets=nets)


def source_probs(config, info, state, images):
  """softmax of the frozen source segmenter (inference mode)."""
  model = deepall.segmenter(config, info, train=False)
  logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, images, train=False)
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def adapt_step(state: TrainState, batch, key, config, info):
  """Phase 1: generators (+ the semantic-aware term), D_t, D_s, then D_m; step + 1."""
  disc_m = mask_discriminator(config)
  weight = config.seuda.semantic_weight

  def semantic(p_st, p_ts, fake_t, fake_s):
    d = disc_m.apply({"params": state.nets["d_mask"].params}, source_probs(config, info, state, fake_s), train=True)
    term = losses.lsgan_generator_loss(d)
    return weight * term, {"loss_gen_mask": term}

  new, metrics, _ = cyclegan.translation_updates(state, batch, key, config, info, extra_loss=semantic)
  # D_m on the translation of the just-updated G_ts (a fresh forward, as a separate update would).
  fake_s = cyclegan.translate(config, new.nets["g_ts"].params, batch["target"]["image"])
  real_m = source_probs(config, info, state, batch["source"]["image"])
  fake_m = jax.lax.stop_gradient(source_probs(config, info, state, fake_s))

  def objective(psi):
    return losses.lsgan_discriminator_loss(disc_m.apply({"params": psi}, real_m, train=True),
                                           disc_m.apply({"params": psi}, fake_m, train=True))

  loss_m, grads = jax.value_and_grad(objective)(new.nets["d_mask"].params)
  grads = device_mean(grads, info.axis_name)
  metrics["loss_d_mask"] = device_mean(loss_m, info.axis_name)
  nets = dict(new.nets, d_mask=update_net(new.nets["d_mask"], translation.gan_adam(config), grads))
  new = new.replace(nets=nets, step=state.step + 1)
  metrics["loss"] = metrics["loss_gen"]
  return flag_non_finite(state, new, cyclegan.gan_checked(metrics, new)), metrics


def make_step(config, info):
  return pretrain_then(config, info, pretrain_steps=config.seuda.pretrain_steps,
                       adapt=lambda state, batch, key: adapt_step(state, batch, key, config, info))


def write_figures(config, data, state, out_dir):
  return cyclegan.write_preview(config, data, state, out_dir, eval_network)
