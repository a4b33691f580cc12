"""PnP-AdaNet (Dou et al., IJCAI 2018, "Unsupervised cross-modality domain adaptation of ConvNets
for biomedical image segmentations with adversarial loss"), on a U-Net.
Released code: carrenD/Medical-Cross-Modality-Domain-Adaptation (methods.md §1.4, §3.4).

Every trainer step is ONE sub-iteration on a fresh batch; `schedule(step)` says which:

1. Stage 1, steps [0, P) with P = `pnp.pretrain_steps`: the source segmenter, trained on the
   labelled source slices as DeepAll (config.optimizer, its schedule over the P steps); the frozen copy `nets['source']`
   follows it, so at step P it IS the pre-trained source model (adda.source_step).
2. Stage 2, the adversarial adaptation. The target network (the top-level params, what is
   evaluated) = the DAM — the target copy of the first `pnp.adapt_levels` encoder blocks
   down0 .. down{k−1}, initialised from the source model at the switch — followed by every other
   block of the source model, frozen (the released `joint_trainable=False`). The source path is
   the frozen source model `nets['source']`.
   * critic step: the feature critic D_f and the mask critic D_m (RMSProp) minimise (§3.4)
       L_D = −μ·mean(D_f(F_s) − D_f(F_t)) + λ_m·(−μ)·mean(D_m(M_s) − D_m(M_t))
             + (1/K)·[w·μ·Σ½‖W_f‖² + λ_m·w·μ·Σ½‖W_m‖²]
     (losses.wgan_critic_loss; source = MR = "real"), then every critic kernel is clipped to
     ±`pnp.clip` (losses.apply_updates_and_clip(..., names=("kernel",))).
   * DAM step: the DAM (RMSProp, all other blocks frozen) minimises
       L_G = −μ·mean(D_f(F_t)) + λ_m·(−μ)·mean(D_m(M_t)) + w·μ·Σ½‖W_DAM‖²   (wgan_generator_loss).
   μ = `pnp.mu` (0.002), w = `pnp.weight_decay` (1e-4), K = `pnp.critic_steps`, λ_m =
   `pnp.mask_weight` (0.3) and 0 during the critic warm-up, Σ½‖W‖² = TF's l2_loss over kernels.
   * F = the feature critic's input: the U-Net blocks `pnp.levels` (default down1, down2,
     bottleneck) each brought to the SMALLEST resolution among them by average pooling over
     non-overlapping windows (U-Net sizes differ by powers of 2), concatenated with the softmax
     of the logits pooled the same way. M = the softmax of the logits at full resolution (the
     mask critic's input).
   * Schedule from step P: `pnp.critic_warmup_steps` critic steps (the released `pre-train`
     phase: generator frozen, λ_m = 0); then cycles of K critic steps followed by 1 DAM step;
     with `pnp.critic_steps_growth_every` = G > 0 the n-th cycle has K + ⌊n/G⌋ critic steps
     (the release: +1 every 300 iterations); G = 0 keeps K.
   * Optimiser: RMSProp(`pnp.learning_rate`) for the critics and the DAM, TF1's RMSProp (decay
     0.9, no momentum, ε = 1e-10 inside the square root, mean square initialised to
     `pnp.rmsprop_initial_scale` = 1 as TF1's slot; 0 = optax's/PyTorch's default).

Differences from the released code, on purpose:
* The networks: a U-Net replaces the dilated residual FCN (DRN); "groups 1–6" become the
  encoder blocks down0 .. down{k−1}; the critics are models.FeatureDiscriminator (strided 3×3
  convs, leaky ReLU, no BatchNorm, pooled linear head; `pnp.critic_features` / `critic_layers`,
  the mask critic `pnp.mask_critic_features`), not the released residual DCM / mask critic with
  BN. The feature stack is pooled DOWN to the coarsest level instead of the release's periodic
  shuffling UP to 256² of groups 4/6/7/9 (6+4+8+8 channels) + logits + argmax map; we feed the
  softmax instead of raw logits and leave out the (non-differentiable) argmax map.
* BatchNorm: every stage-2 pass runs in inference mode (running statistics), as the release's
  critic steps; the release puts the DAM's BN in training mode during DAM steps (one train flag
  per U-Net here), so the DAM keeps the source statistics it was copied with and adapts its
  kernels and BN scales/offsets. Dropout is off in stage 2 (inference mode).
* Not reproduced: the learning-rate decays (×0.98 every 2000 warm-up / 100 adversarial
  iterations, with checkpoint re-restores) and the stage-1 decay (config.optimizer's schedule
  applies to stage 1); the released iteration counts (50k stage 1, ~20k warm-up, 120k
  adversarial iterations of 20+ critic steps) are scaled down by the configs.
* The critics' L2 factor is 1/`pnp.critic_steps` (the release's 1/dis_sub_iter) even when the
  cycles grow.
* BigAug (config.augment), when enabled, applies in stage 1 only (stage 2 has no task loss).

Metrics: `phase` (0 source, 1 critic, 2 DAM); `loss` = the stage-1 segmentation loss, L_D in a
critic step, L_G in a DAM step; metrics a sub-update does not compute are NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medgen_jax import losses
from medgen_jax.methods import deepall
from medgen_jax.methods.base import Phases, device_mean, flag_non_finite, fold_device, init_net, state_norms
from medgen_jax.methods.uda import common
from medgen_jax.methods.uda.adda import (check_pretrain_steps, check_selection, init_two_stage, keep_frozen,
                                         source_step)
from medgen_jax.models.gan import FeatureDiscriminator
from medgen_jax.train_state import TrainState

LABEL = "PnP-AdaNet"
SAMPLER = "source_target"
eval_network = deepall.eval_network
SOURCE, CRITIC, DAM = 0, 1, 2   # the sub-update of a step (schedule)


def label(config, sources) -> str:
  return LABEL


def validate(config) -> None:
  c = config.pnp
  common.validate_target(config)
  check_selection(config, LABEL)
  if not c.levels:
    raise ValueError("config.pnp.levels: name at least one U-Net block for the feature critic")
  for name in c.levels:
    common.check_level(name, config.model.depth, "pnp.levels")
  if not 1 <= c.adapt_levels <= config.model.depth:
    raise ValueError(f"config.pnp.adapt_levels={c.adapt_levels}: the DAM is the first k encoder blocks, "
                     f"1 <= k <= model.depth ({config.model.depth})")
  check_pretrain_steps(c.pretrain_steps, config.num_steps, "pnp.pretrain_steps")
  for key in ("critic_steps",):
    if c[key] < 1:
      raise ValueError(f"config.pnp.{key}={c[key]}: must be >= 1")
  for key in ("critic_warmup_steps", "critic_steps_growth_every"):
    if c[key] < 0:
      raise ValueError(f"config.pnp.{key}={c[key]}: must be >= 0")
  if c.clip <= 0:
    raise ValueError(f"config.pnp.clip={c.clip}: the critics' weight clipping bound must be > 0")
  first_dam = c.pretrain_steps + c.critic_warmup_steps + c.critic_steps   # 0-based step of the first DAM step
  if first_dam >= config.num_steps:
    raise ValueError(f"config.pnp: pretrain_steps + critic_warmup_steps + critic_steps = {first_dam} >= "
                     f"num_steps ({config.num_steps}): no DAM step would run (the target network would be the "
                     f"source model); lower them or raise num_steps")


# --- Schedule ------------------------------------------------------------------------------------


def schedule(step, *, pretrain_steps: int, warmup_steps: int, critic_steps: int, growth_every: int = 0):
  """SOURCE / CRITIC / DAM for the 0-based trainer step(s) `step` (an int or an int array; the
  trainer calls it on the host every step, so concrete steps are computed with numpy: no device
  work; a traced step inside a step function with jax.numpy)."""
  xp = jnp if isinstance(step, jax.core.Tracer) else np
  step = xp.asarray(step, xp.int32)
  t = step - (pretrain_steps + warmup_steps)          # position in the adversarial cycles
  t_safe = xp.maximum(t, 0)
  k = critic_steps
  if growth_every:
    g = growth_every
    # Block b = cycles [b·g, (b+1)·g), each of k + b + 1 steps; it starts at g·(b(k+1) + b(b−1)/2).
    start = lambda b: g * (b * (k + 1) + b * (b - 1) // 2)
    root = (-(2 * k + 1) + xp.sqrt(xp.float32((2 * k + 1) ** 2) + 8.0 * t_safe.astype(xp.float32) / g)) / 2
    b = xp.maximum(xp.floor(root).astype(xp.int32), 0)
    b = xp.where(start(b) > t_safe, b - 1, b)          # float rounding: fix by ±1
    b = xp.where(start(b + 1) <= t_safe, b + 1, b)
    length = k + b + 1
    is_dam = (t_safe - start(b)) % length == length - 1
  else:
    is_dam = t_safe % (k + 1) == k
  stage2 = xp.where((t >= 0) & is_dam, DAM, CRITIC)
  return xp.where(step < pretrain_steps, SOURCE, stage2).astype(xp.int32)


def schedule_of(config, step):
  c = config.pnp
  return schedule(step, pretrain_steps=c.pretrain_steps, warmup_steps=c.critic_warmup_steps,
                  critic_steps=c.critic_steps, growth_every=c.critic_steps_growth_every)


# --- Networks and inputs -------------------------------------------------------------------------


def critics(config):
  c = config.pnp
  return (FeatureDiscriminator(features=c.critic_features, num_layers=c.critic_layers),
          FeatureDiscriminator(features=c.mask_critic_features, num_layers=c.critic_layers))


def rmsprop(config):
  """TF1's RMSPropOptimizer(lr): decay 0.9, ε 1e-10 under the root, mean square starting at
  `pnp.rmsprop_initial_scale` (TF1: 1)."""
  return optax.rmsprop(config.pnp.learning_rate, decay=0.9, eps=1e-10,
                       initial_scale=config.pnp.rmsprop_initial_scale, eps_in_sqrt=True)


def dam(config):
  """is_trainable of the DAM steps: the encoder blocks down0 .. down{k−1}."""
  return common.encoder_blocks(config.pnp.adapt_levels)


def dam_tx(config, params):
  return common.partial_optimizer(rmsprop(config), params, dam(config))


def pool_to(x, size: int):
  """[B, H, W, C] → [B, size, size', C] by the mean over non-overlapping f×f windows, f = H / size."""
  b, h, w, c = x.shape
  f = h // size
  if f * size != h or w % f:
    raise ValueError(f"cannot pool a {h}x{w} map to {size} rows by whole windows")
  return x.reshape(b, h // f, f, w // f, f, c).mean(axis=(2, 4))


def critic_inputs(logits, levels, names):
  """(feature stack F, mask input M) of one pass: see the module docstring."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  maps = [levels[n].astype(jnp.float32) for n in names]
  size = min(m.shape[1] for m in maps)
  stack = jnp.concatenate([pool_to(m, size) for m in maps] + [pool_to(probs, size)], axis=-1)
  return stack, probs


def _pass(config, info, params, batch_stats, images):
  """The critics' inputs from an inference-mode pass of a U-Net with these variables."""
  model = deepall.segmenter(config, info, train=False)
  logits, levels = model.apply({"params": params, "batch_stats": batch_stats}, images, train=False,
                               return_levels=True)
  return critic_inputs(logits, levels, config.pnp.levels)


def init_state(key, config, info):
  state = init_two_stage(key, config, info, lambda p: dam_tx(config, p))
  stack, probs = jax.eval_shape(lambda p: _pass(config, info, p, state.batch_stats,
                                                jnp.zeros((1, *info.input_shape))), state.params)
  feature_critic, mask_critic = critics(config)
  psi_f = feature_critic.init(jax.random.fold_in(key, 1), jnp.zeros(stack.shape, jnp.float32))["params"]
  psi_m = mask_critic.init(jax.random.fold_in(key, 2), jnp.zeros(probs.shape, jnp.float32))["params"]
  tx = rmsprop(config)
  return state.replace(nets=dict(state.nets, critic=init_net(psi_f, {}, tx), mask_critic=init_net(psi_m, {}, tx)))


# --- Losses (hand-checkable) ---------------------------------------------------------------------


def critic_loss(df_s, df_t, dm_s, dm_t, *, mu: float, mask_weight, l2_f=0.0, l2_m=0.0):
  """−μ·mean(D_f(s) − D_f(t)) + λ_m·(−μ)·mean(D_m(s) − D_m(t)) + l2_f + λ_m·l2_m."""
  return (mu * losses.wgan_critic_loss(df_s, df_t) + mask_weight * mu * losses.wgan_critic_loss(dm_s, dm_t)
          + l2_f + mask_weight * l2_m)


def generator_loss(df_t, dm_t, *, mu: float, mask_weight, l2=0.0):
  """−μ·mean(D_f(t)) + λ_m·(−μ)·mean(D_m(t)) + l2."""
  return mu * losses.wgan_generator_loss(df_t) + mask_weight * mu * losses.wgan_generator_loss(dm_t) + l2


# --- The two stage-2 sub-updates -----------------------------------------------------------------


def mask_weight_at(config, step):
  """λ_m: 0 during the critic warm-up, `pnp.mask_weight` after it."""
  c = config.pnp
  return jnp.where(jnp.asarray(step) < c.pretrain_steps + c.critic_warmup_steps, 0.0, c.mask_weight)


def critic_update(state: TrainState, batch, key, config, info):
  """One RMSProp step of both critics, then their kernels clipped to ±pnp.clip; changes
  nets['critic'] and nets['mask_critic'] only. Returns (state, metrics)."""
  c = config.pnp
  src = state.nets["source"]
  f_s, m_s = _pass(config, info, src.params, src.batch_stats, batch["source"]["image"])
  f_t, m_t = _pass(config, info, state.params, state.batch_stats, batch["target"]["image"])
  f_s, m_s, f_t, m_t = jax.lax.stop_gradient((f_s, m_s, f_t, m_t))
  feature_critic, mask_critic = critics(config)
  weight = mask_weight_at(config, state.step)
  l2_coefficient = c.weight_decay * c.mu / c.critic_steps

  def objective(psi_f, psi_m):
    df_s, df_t = feature_critic.apply({"params": psi_f}, f_s), feature_critic.apply({"params": psi_f}, f_t)
    dm_s, dm_t = mask_critic.apply({"params": psi_m}, m_s), mask_critic.apply({"params": psi_m}, m_t)
    loss = critic_loss(df_s, df_t, dm_s, dm_t, mu=c.mu, mask_weight=weight,
                       l2_f=losses.l2_kernel_loss(psi_f, coefficient=l2_coefficient),
                       l2_m=losses.l2_kernel_loss(psi_m, coefficient=l2_coefficient))
    return loss, {"wasserstein": jnp.mean(df_s) - jnp.mean(df_t),
                  "mask_wasserstein": jnp.mean(dm_s) - jnp.mean(dm_t)}

  (loss, aux), grads = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
      state.nets["critic"].params, state.nets["mask_critic"].params)
  grads = device_mean(grads, info.axis_name)
  metrics = device_mean(dict(aux, loss_critic=loss), info.axis_name)
  tx = rmsprop(config)
  nets = dict(state.nets)
  for name, g in zip(("critic", "mask_critic"), grads):
    net = nets[name]
    updates, opt_state = tx.update(g, net.opt_state, net.params)
    nets[name] = net.replace(params=losses.apply_updates_and_clip(net.params, updates, c.clip, names=("kernel",)),
                             opt_state=opt_state)
  metrics.update(critic_grad_norm=optax.tree.norm(grads[0]), mask_critic_grad_norm=optax.tree.norm(grads[1]),
                 mask_weight=weight)
  return state.replace(nets=nets), metrics


def dam_update(state: TrainState, batch, key, config, info):
  """One RMSProp step of the DAM (encoder blocks down0 .. down{k−1} of the top-level params) on
  L_G; every other block, the BatchNorm statistics, the source model and the critics are left
  bit-identical. Returns (state, metrics)."""
  c = config.pnp
  feature_critic, mask_critic = critics(config)
  psi_f, psi_m = state.nets["critic"].params, state.nets["mask_critic"].params
  trainable = dam(config)
  weight = mask_weight_at(config, state.step)

  def objective(params):
    f_t, m_t = _pass(config, info, params, state.batch_stats, batch["target"]["image"])
    blocks = {name: p for name, p in params.items() if trainable(name)}
    return generator_loss(feature_critic.apply({"params": psi_f}, f_t), mask_critic.apply({"params": psi_m}, m_t),
                          mu=c.mu, mask_weight=weight,
                          l2=losses.l2_kernel_loss(blocks, coefficient=c.weight_decay * c.mu))

  loss, grads = jax.value_and_grad(objective)(state.params)
  grads = device_mean(grads, info.axis_name)
  loss = device_mean(loss, info.axis_name)
  tx = dam_tx(config, state.params)
  updates, opt_target = tx.update(grads, state.opt_state["target"], state.params)
  params = keep_frozen(state.params, optax.apply_updates(state.params, updates), trainable)
  new = state.replace(params=params, opt_state=dict(state.opt_state, target=opt_target))
  # The norm of the trainable part (the DAM): the frozen blocks' gradients are not applied.
  grad_norm = optax.tree.norm({name: g for name, g in grads.items() if trainable(name)})
  return new, {"loss_dam": loss, "dam_grad_norm": grad_norm}


def make_step(config, info):
  def finish(state, new, metrics, phase, loss, checked):
    new = new.replace(step=state.step + 1)
    return (flag_non_finite(state, new, checked + state_norms(new)),
            dict(metrics, loss=loss, phase=jnp.asarray(phase, jnp.float32)))

  def source(state, batch, key):
    key = fold_device(key, info.axis_name)
    new, metrics = source_step(state, batch, key, config, info, pretrain_steps=config.pnp.pretrain_steps)
    return new, dict(metrics, phase=jnp.asarray(SOURCE, jnp.float32))

  def critic(state, batch, key):
    key = fold_device(key, info.axis_name)
    new, metrics = critic_update(state, batch, key, config, info)
    return finish(state, new, metrics, CRITIC, metrics["loss_critic"],
                  [metrics["loss_critic"], metrics["critic_grad_norm"], metrics["mask_critic_grad_norm"]])

  def adapt(state, batch, key):
    key = fold_device(key, info.axis_name)
    new, metrics = dam_update(state, batch, key, config, info)
    return finish(state, new, metrics, DAM, metrics["loss_dam"], [metrics["loss_dam"], metrics["dam_grad_norm"]])

  return Phases(steps=(source, critic, adapt), schedule=lambda step: schedule_of(config, step))
