"""CycleGAN pixel-level adaptation (Zhu et al., ICCV 2017; as the UDA baseline of SIFA, Chen et
al., TMI 2020, and CyCADA, Hoffman et al., ICML 2018): translate the labelled source images to
the target appearance and train the segmenter on them with the source labels.

Networks: generators G_st (source → target, SIFA's g_A) and G_ts, PatchGAN discriminators D_t
(real vs translated target-domain images) and D_s, each with its own Adam (translation.py);
the segmenter θ (config.model, config.optimizer, the top-level params) is what is evaluated, on
real target images.

One step, on one source + target batch, three updates in this order:
1. generators (both, one objective; Zhu et al. eq. 3 with LSGAN):
     L_G = LSG(D_t(G_st(x_s))) + LSG(D_s(G_ts(x_t)))
         + λ·mean|G_ts(G_st(x_s)) − x_s| + λ·mean|G_st(G_ts(x_t)) − x_t|
         + w_idt·(mean|G_st(x_t) − x_t| + mean|G_ts(x_s) − x_s|)
2. discriminators: D_t on (x_t real, pool_t(G_st(x_s)) fake), D_s on (x_s, pool_s(G_ts(x_t))),
   LSD each, the fakes of update 1's forward pass (CycleGAN's `fake.detach()`);
3. segmenter: the task loss (weighted CE + Dice + L2, as DeepAll) on (G_st(x_s), y_s), the
   translated images of update 1 with the gradient stopped.
The published pipeline trains CycleGAN first and the segmenter afterwards on the translated
images; here both train together from step 0 (one run, one schedule), so early segmenter
updates see poor translations; the segmenter's steps are the run's steps.

`make_step` returns a plain pure step; `generator_update`, `discriminator_update` and
`segmenter_update` are the sub-updates (each changes only its own networks; tests run them one
by one). SeUDA and CyCADA reuse them with extra generator terms.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from medgen_jax import losses
from medgen_jax.methods import deepall
from medgen_jax.methods.base import device_mean, flag_non_finite, fold_device, state_norms, update_net
from medgen_jax.methods.uda import common, previews, translation
from medgen_jax.train_state import TrainState, make_optimizer

LABEL = "CycleGAN"
SAMPLER = "source_target"
eval_network = deepall.eval_network
GENERATORS = ("g_st", "g_ts")


def label(config, sources) -> str:
  return LABEL


def validate(config) -> None:
  common.validate_target(config)
  translation.validate(config, LABEL)


def init_translation_nets(key, config, info) -> dict:
  """g_st, g_ts, d_s, d_t (Adam each) and the two image pools."""
  example = jnp.zeros((1, *info.input_shape), jnp.float32)
  gen, disc = translation.generator(config), translation.discriminator(config)
  keys = jax.random.split(key, 4)
  nets = {name: translation.init_gan_net(k, module, example, config)
          for name, module, k in zip(("g_st", "g_ts", "d_s", "d_t"), (gen, gen, disc, disc), keys)}
  pool_shape = (config.batch_size, *info.input_shape)
  nets.update(pool_s=translation.init_pool(config, pool_shape), pool_t=translation.init_pool(config, pool_shape))
  return nets


def init_state(key, config, info) -> TrainState:
  state = deepall.init_state(key, config, info)
  return state.replace(nets=init_translation_nets(jax.random.fold_in(key, 7), config, info))


# --- Sub-updates ---------------------------------------------------------------------------------


def translate(config, params, images):
  return translation.apply_gan(translation.generator(config), params, images)


def judge(config, params, images):
  return translation.apply_gan(translation.discriminator(config), params, images)


def generator_objective(config, nets, x_s, x_t, p_st, p_ts):
  """L_G of the module docstring: (loss, (metrics, fake_t, fake_s))."""
  c = config.gan
  fake_t, fake_s = translate(config, p_st, x_s), translate(config, p_ts, x_t)
  rec_s, rec_t = translate(config, p_ts, fake_t), translate(config, p_st, fake_s)
  adv = (losses.lsgan_generator_loss(judge(config, nets["d_t"].params, fake_t))
         + losses.lsgan_generator_loss(judge(config, nets["d_s"].params, fake_s)))
  cycle = losses.cycle_loss(x_s, rec_s, weight=c.cycle_weight) + losses.cycle_loss(x_t, rec_t, weight=c.cycle_weight)
  loss = adv + cycle
  metrics = {"loss_gen_adv": adv, "loss_cycle": cycle}
  if c.identity_weight > 0:
    same = (translation.identity_loss(x_t, translate(config, p_st, x_t), weight=c.identity_weight)
            + translation.identity_loss(x_s, translate(config, p_ts, x_s), weight=c.identity_weight))
    loss = loss + same
    metrics["loss_identity"] = same
  return loss, (metrics, fake_t, fake_s)


def generator_update(state: TrainState, batch, key, config, info, *, extra_loss=None):
  """Update 1 (g_st and g_ts, Adam each). `extra_loss(p_st, p_ts, fake_t, fake_s)` -> (loss,
  metrics) adds a method's own generator terms (SeUDA, CyCADA). Returns (state, metrics,
  (fake_t, fake_s)) with the fakes of this forward pass (pre-update generators)."""
  x_s, x_t = batch["source"]["image"], batch["target"]["image"]

  def objective(p_st, p_ts):
    loss, (metrics, fake_t, fake_s) = generator_objective(config, state.nets, x_s, x_t, p_st, p_ts)
    if extra_loss is not None:
      extra, extra_metrics = extra_loss(p_st, p_ts, fake_t, fake_s)
      loss = loss + extra
      metrics = dict(metrics, **extra_metrics)
    return loss, (dict(metrics, loss_gen=loss), fake_t, fake_s)

  (_, (metrics, fake_t, fake_s)), grads = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
      state.nets["g_st"].params, state.nets["g_ts"].params)
  grads = device_mean(grads, info.axis_name)
  metrics = device_mean(metrics, info.axis_name)
  tx = translation.gan_adam(config)
  nets = dict(state.nets)
  for name, g in zip(GENERATORS, grads):
    nets[name] = update_net(nets[name], tx, g)
  metrics["gen_grad_norm"] = optax.tree.norm(grads)
  return state.replace(nets=nets), metrics, (fake_t, fake_s)


def discriminator_update(state: TrainState, name: str, pool_name: str, real, fake, key, config, info):
  """One Adam step of discriminator `name` on LSD(D(real), D(pool(fake))); updates the pool.
  `key`: the step's replicated key (the pool's choice must agree across devices)."""
  pool, fake = translation.pool_query(state.nets[pool_name], jax.lax.stop_gradient(fake), key,
                                      size=config.gan.pool_size, axis_name=info.axis_name)

  def objective(psi):
    return losses.lsgan_discriminator_loss(judge(config, psi, real), judge(config, psi, fake))

  loss, grads = jax.value_and_grad(objective)(state.nets[name].params)
  grads = device_mean(grads, info.axis_name)
  loss = device_mean(loss, info.axis_name)
  nets = dict(state.nets, **{pool_name: pool, name: update_net(state.nets[name], translation.gan_adam(config), grads)})
  return state.replace(nets=nets), {f"loss_{name}": loss}


def segmenter_update(state: TrainState, images, labels, key, config, info, *, extra=None, tx=None):
  """The task loss on (images, labels) for the top-level segmenter (config.optimizer); step + 1.
  `extra(params, batch_stats, key)` -> (loss, metrics, batch_stats) adds terms (CyCADA's
  feature-level GAN); the BatchNorm statistics then come from it. `tx`: the optimizer
  (default config.optimizer over the run's steps)."""
  model = deepall.segmenter(config, info, train=True)
  loss_fn = deepall.make_loss_fn(model, config.loss, num_classes=info.num_classes, axis_name=info.axis_name)
  task_key, extra_key = jax.random.split(key)

  def objective(params):
    loss, (metrics, stats) = loss_fn(params, state.batch_stats, {"image": images, "label": labels}, task_key)
    if extra is None:
      return loss, (metrics, stats)
    more, more_metrics, stats = extra(params, stats, extra_key)
    return loss + more, (dict(metrics, **more_metrics, loss_task=loss, loss=loss + more), stats)

  (_, (metrics, stats)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  tx = tx or make_optimizer(config.optimizer, num_steps=config.num_steps)
  return deepall.finish_step(state, tx, grads, metrics, stats, axis_name=info.axis_name,
                             bn_sync=deepall.bn_synced(config, info))


def translation_updates(state, batch, key, config, info, *, extra_loss=None):
  """Updates 1 and 2: generators, then D_t and D_s. Returns (state, metrics, fake_t)."""
  pool_t_key, pool_s_key = jax.random.split(jax.random.fold_in(key, 1))
  new, metrics, (fake_t, fake_s) = generator_update(state, batch, key, config, info, extra_loss=extra_loss)
  new, m_t = discriminator_update(new, "d_t", "pool_t", batch["target"]["image"], fake_t, pool_t_key, config, info)
  new, m_s = discriminator_update(new, "d_s", "pool_s", batch["source"]["image"], fake_s, pool_s_key, config, info)
  return new, dict(metrics, **m_t, **m_s), fake_t


def gan_checked(metrics, new: TrainState) -> list:
  """What the divergence flag checks after a whole step: every loss and gradient norm, and the
  norms of every network's new parameters and statistics (the step's last flag_non_finite call
  decides the flag, so it must see all of them)."""
  return [v for k, v in metrics.items() if k.startswith("loss") or k.endswith("grad_norm")] + state_norms(new)


def make_step(config, info):
  def step(state, batch, key):
    new, metrics, fake_t = translation_updates(state, batch, key, config, info)
    seg_key = fold_device(jax.random.fold_in(key, 2), info.axis_name)
    new, seg_metrics = segmenter_update(new, jax.lax.stop_gradient(fake_t), batch["source"]["label"], seg_key,
                                        config, info)
    metrics = dict(metrics, **seg_metrics)
    return flag_non_finite(state, new, gan_checked(metrics, new)), metrics

  return step


def write_preview(config, data, state, out_dir, evaluated_network):
  """translation_preview.png of a G_st/G_ts method (CycleGAN, SeUDA, CyCADA): source → target
  (g_st), back (g_ts), and the method's evaluated network on the target."""
  return previews.write_translation_preview(
      config, data, out_dir, translate=lambda x: translate(config, state.nets["g_st"].params, x),
      reconstruct=lambda x: translate(config, state.nets["g_ts"].params, x),
      segment=previews.evaluated(evaluated_network, config, data, state))


def write_figures(config, data, state, out_dir):
  return write_preview(config, data, state, out_dir, eval_network)
