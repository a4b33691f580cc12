"""AdaOutput: adversarial adaptation in the output space (AdaptSegNet; Tsai, Hung, Schulter, Sohn,
Yang & Chandraker, "Learning to Adapt Structured Output Space for Semantic Segmentation", CVPR
2018), on a U-Net segmenter.

A discriminator D sees softmax segmentation maps and tells source from target; the segmenter
G is trained to segment the labelled source and to make its target maps look like source maps:

    L(I_s, I_t) = L_seg(I_s) + λ_adv · L_adv(I_t)                                      (eq. 1)
    L_d(P)      = BCE(D(P), z) per discriminator output pixel, z: the domain label      (eq. 2)
    L_adv(I_t)  = BCE(D(P_t), z_source): the target map classified as source           (eq. 4)
    multi-level: L = Σ_i λ_seg^i L_seg^i(I_s) + Σ_i λ_adv^i L_adv^i(I_t)                 (eq. 5)

(equation numbers as in the CVPR paper, §3; eq. 3 is the source cross-entropy). Here:

* L_seg: the library's task loss on the source slices (weighted CE + Dice + L2 on kernels, as
  DeepAll; the paper and its code use plain CE, `loss.*` can reproduce that).
* D = models.OutputDiscriminator (`nets['disc']`): five 4×4 stride-2 convolutions of
  {64, 128, 256, 512, 1} channels (`adaoutput.disc_features` = 64), leaky ReLU 0.2, on the
  softmax of the logits; its output is a [B, H/32, W/32, 1] map of logits, so slices must be at
  least 32×32. Losses are means over that map and the batch.
* Labels: those of the released code (`train_gta2cityscapes_multi.py`: `source_label = 0`,
  `target_label = 1`, BCEWithLogitsLoss). The paper writes z = 1 for source; the two are the
  same model up to the sign of D's logit. So, with BCE(x, y) = softplus(x) − y·x:
      L_adv = mean BCE(D(P_t), 0) = mean softplus(D(P_t)),
      L_D   = ½ mean BCE(D(P_s), 0) + ½ mean BCE(D(P_t), 1)      (the code's two halves).
* Multi-level (`adaoutput.multi_level`): the paper puts a second classifier (ASPP) on DeepLab's
  conv4 features. Here the auxiliary output is a 1×1 head (`nets['aux_head']`, a Dense on the
  channel axis) on the U-Net block `adaoutput.aux_level` (`up1`: half resolution), its logits
  upsampled to the slice size (jax.image.resize, bilinear, as the code's nn.Upsample) for both
  the auxiliary segmentation loss (weight `seg_aux_weight` = λ_seg^aux = 0.1, no L2 of the
  segmenter counted twice; the head's own kernel gets the same L2) and a second discriminator
  `nets['disc_aux']` (weight `aux_weight` = λ_adv^aux = 0.0002). `weight` = λ_adv = 0.001.

One trainer step is one iteration of the released code (iter_size 1):

1. `segmenter_update`: G (+ the aux head) descends
       L_seg + seg_aux_weight·L_seg_aux + weight·L_adv + aux_weight·L_adv_aux
   with D and D_aux fixed (the code sets requires_grad=False on D's parameters for this part),
   by config.optimizer (the aux head: the same optimizer, its own state). BatchNorm statistics:
   the source pass, then the target pass (methods/uda/common.py).
2. `discriminator_update`: D (and D_aux) descend L_D on the source and target logits of step
   1's forward pass, detached (`pred.detach()` in the code), by Adam(`disc_lr`,
   b1=`disc_b1`, b2=`disc_b2`) = Adam(1e-4, β = (0.9, 0.99)).

The code calls `optimizer.step()` for G and both D's after computing all gradients, so both
gradients are taken at the parameters from before the iteration. The same holds here although
the updates are applied one after the other: G's gradient uses the old D, and D's gradient uses
the segmenter outputs computed before G's update, so the order of the two updates does not
change any number.

Learning rates: the code decays both rates as lr·(1 − i/num_steps)^0.9 ("poly"). With
`adaoutput.poly_power` > 0 the segmenter's optimizer (config.optimizer, whose schedule must then
be 'constant' without warm-up) and D's Adam are scaled by (1 − step/num_steps)^power, exactly
PyTorch's per-iteration `lr` on the same optimizer state; 0 keeps config.optimizer's schedule and
a constant D rate. The paper's G optimizer is SGD 2.5e-4, momentum 0.9, weight decay 5e-4 (here:
loss.weight_decay, the L2 on kernels, whose gradient is PyTorch's decay term), with the 10× rate
the code gives DeepLab's classifier layers not reproduced (the aux head uses the segmenter's rate).

Deviations: a U-Net trained from scratch instead of the ImageNet-initialised DeepLab-v2, the
1×1 aux head on a U-Net block instead of a second ASPP classifier, the library's CE + Dice loss,
and a slice batch instead of the code's batch of one image.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from medgen_jax import losses
from medgen_jax.methods import deepall
from medgen_jax.methods.base import device_mean, flag_non_finite, fold_device, init_net, state_norms, update_net
from medgen_jax.methods.deepall import finish_step, segmentation_terms
from medgen_jax.methods.uda import common
from medgen_jax.models.gan import OutputDiscriminator
from medgen_jax.train_state import compute_dtype, make_optimizer

LABEL = "AdaOutput"
SAMPLER = "source_target"
eval_network = deepall.eval_network

SOURCE_LABEL = 0.0   # the released code's domain labels (see the module docstring)
TARGET_LABEL = 1.0
MIN_SIZE = 32        # OutputDiscriminator halves its input five times


def label(config, sources) -> str:
  return LABEL + (" (multi-level)" if config.adaoutput.multi_level else "")


def validate(config) -> None:
  c = config.adaoutput
  common.validate_target(config)
  if c.multi_level:
    common.check_level(c.aux_level, config.model.depth, "adaoutput.aux_level")
  if min(config.data.in_plane_shape) < MIN_SIZE:
    raise ValueError(f"config.data.in_plane_shape={tuple(config.data.in_plane_shape)}: AdaOutput's "
                     f"discriminator halves the slice five times and needs at least {MIN_SIZE}x{MIN_SIZE}")
  if c.poly_power < 0:
    raise ValueError(f"config.adaoutput.poly_power={c.poly_power}: must be >= 0 (0 = off)")
  if c.poly_power > 0 and (config.optimizer.schedule != "constant" or config.optimizer.warmup_steps):
    raise ValueError(f"config.adaoutput.poly_power={c.poly_power} replaces the segmenter's schedule: set "
                     f"optimizer.schedule='constant' and optimizer.warmup_steps=0 (got "
                     f"{config.optimizer.schedule!r}, {config.optimizer.warmup_steps}), or poly_power=0")


# --- losses -------------------------------------------------------------------------------------


def bce_with_logits(logits, target: float):
  """mean BCE(σ(x), y) = mean softplus(x) − y·x (torch.nn.BCEWithLogitsLoss, mean reduction)."""
  x = jnp.asarray(logits).astype(jnp.float32)
  return jnp.mean(jax.nn.softplus(x) - target * x)


def adversarial_loss(d_target):
  """L_adv: D's logits on the target maps, labelled source (eq. 4; the code's `source_label`)."""
  return bce_with_logits(d_target, SOURCE_LABEL)


def discriminator_loss(d_source, d_target):
  """L_D = ½ BCE(D(P_s), source) + ½ BCE(D(P_t), target) (eq. 2; the code halves each part)."""
  return 0.5 * bce_with_logits(d_source, SOURCE_LABEL) + 0.5 * bce_with_logits(d_target, TARGET_LABEL)


def discriminator_accuracy(d_source, d_target):
  """Fraction of D's output pixels on the right side (source: logit < 0, target: > 0)."""
  return 0.5 * (jnp.mean(d_source < 0) + jnp.mean(d_target > 0))


# --- networks -----------------------------------------------------------------------------------


class AuxHead(nn.Module):
  """The auxiliary classifier: a 1×1 convolution (a Dense on the channel axis) to class logits."""

  num_classes: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name="head")(x)
    return y.astype(jnp.float32)


def upsample(logits, shape):
  """Bilinear resize of [B, h, w, K] logits to the slice size `shape` = (H, W)."""
  return jax.image.resize(logits, (logits.shape[0], *shape, logits.shape[-1]), method="bilinear")


def poly(tx: optax.GradientTransformation, power: float, num_steps: int) -> optax.GradientTransformation:
  """`tx`'s updates scaled by (1 − step/num_steps)^power (the code's lr_poly); `tx` if power is 0."""
  if not power:
    return tx
  factor = lambda count: (1.0 - jnp.minimum(count, num_steps) / num_steps) ** power
  return optax.chain(tx, optax.scale_by_schedule(factor))


def segmenter_optimizer(config) -> optax.GradientTransformation:
  return poly(make_optimizer(config.optimizer, num_steps=config.num_steps), config.adaoutput.poly_power,
              config.num_steps)


def discriminator_optimizer(config) -> optax.GradientTransformation:
  c = config.adaoutput
  return poly(common.adam(c.disc_lr, c.disc_b1, c.disc_b2), c.poly_power, config.num_steps)


def discriminator(config) -> OutputDiscriminator:
  return OutputDiscriminator(features=config.adaoutput.disc_features, softmax_input=True,
                             dtype=compute_dtype(config.dtype))


def aux_head(config, info) -> AuxHead | None:
  if not config.adaoutput.multi_level:
    return None
  return AuxHead(info.num_classes, dtype=compute_dtype(config.dtype))


def init_state(key, config, info):
  state = deepall.init_state(key, config, info)
  # deepall.init_state used config.optimizer alone: the segmenter's state under the poly scaling.
  seg_tx = segmenter_optimizer(config)
  state = state.replace(opt_state=seg_tx.init(state.params))
  disc, disc_tx = discriminator(config), discriminator_optimizer(config)
  maps = jnp.zeros((1, *info.input_shape[:2], info.num_classes), jnp.float32)
  init_disc = jax.jit(disc.init)   # one compilation for D and D_aux
  nets = {"disc": init_net(init_disc(jax.random.fold_in(key, 1), maps)["params"], {}, disc_tx)}
  head = aux_head(config, info)
  if head is not None:
    _, levels = jax.eval_shape(
        lambda p: deepall.segmenter(config, info, train=False).apply(
            {"params": p, "batch_stats": state.batch_stats}, jnp.zeros((1, *info.input_shape)),
            return_levels=True), state.params)
    feature = levels[config.adaoutput.aux_level]
    nets["aux_head"] = init_net(head.init(jax.random.fold_in(key, 2), jnp.zeros(feature.shape, jnp.float32))["params"],
                                {}, seg_tx)
    nets["disc_aux"] = init_net(init_disc(jax.random.fold_in(key, 3), maps)["params"], {}, disc_tx)
  return state.replace(nets=nets)


# --- the two sub-updates and the step -----------------------------------------------------------


def make_segmenter_update(model, tx, config, *, num_classes: int, axis_name: str | None = None,
                          bn_sync: bool = True, disc=None, head=None):
  """update(state, batch, key) -> (state, metrics, outputs): step 1, D and D_aux fixed.
  `outputs` = the detached logits {'source', 'target'[, 'source_aux', 'target_aux']} (the aux
  ones upsampled) that D's update trains on; `state.step` is advanced here."""
  c = config.adaoutput
  multi = head is not None

  def update(state, batch, key):
    key = fold_device(key, axis_name)
    augment_key, key_s, key_t = jax.random.split(key, 3)
    source = common.augment_source(augment_key, batch, config)
    size = source["image"].shape[1:3]
    disc_params = state.nets["disc"].params
    disc_aux_params = state.nets["disc_aux"].params if multi else None

    def objective(params, head_params):
      logits_s, levels_s, stats = common.forward(model, params, state.batch_stats, source["image"], key_s)
      logits_t, levels_t, stats = common.forward(model, params, stats, batch["target"]["image"], key_t)
      loss_seg, metrics = segmentation_terms(logits_s, source["label"], params, config.loss,
                                             num_classes=num_classes, axis_name=axis_name)
      d_t = disc.apply({"params": disc_params}, logits_t)
      loss_adv = adversarial_loss(d_t)
      total = loss_seg + c.weight * loss_adv
      metrics = dict(metrics, loss_seg=loss_seg, loss_adv=loss_adv)
      outputs = {"source": logits_s, "target": logits_t}
      if multi:
        aux_s = upsample(head.apply({"params": head_params}, levels_s[c.aux_level]), size)
        aux_t = upsample(head.apply({"params": head_params}, levels_t[c.aux_level]), size)
        loss_seg_aux, _ = losses.segmentation_loss(
            aux_s, source["label"], num_classes=num_classes, ce_weight=config.loss.ce_weight,
            dice_weight=config.loss.dice_weight, dice_variant=config.loss.dice_variant,
            include_background=config.loss.include_background, class_weights=config.loss.class_weights,
            ce_clip=config.loss.ce_clip, axis_name=axis_name)
        loss_seg_aux = loss_seg_aux + losses.l2_kernel_loss(head_params, coefficient=config.loss.weight_decay)
        loss_adv_aux = adversarial_loss(disc.apply({"params": disc_aux_params}, aux_t))
        total = total + c.seg_aux_weight * loss_seg_aux + c.aux_weight * loss_adv_aux
        metrics = dict(metrics, loss_seg_aux=loss_seg_aux, loss_adv_aux=loss_adv_aux)
        outputs.update(source_aux=aux_s, target_aux=aux_t)
      metrics = dict(metrics, loss=total)
      return total, (metrics, stats, jax.lax.stop_gradient(outputs))

    head_params = state.nets["aux_head"].params if multi else {}
    (_, (metrics, stats, outputs)), (g_theta, g_head) = jax.value_and_grad(
        objective, argnums=(0, 1), has_aux=True)(state.params, head_params)
    extra = {"net_grads": {"aux_head": g_head}, "net_txs": {"aux_head": tx}} if multi else {}
    new, metrics = finish_step(state, tx, g_theta, metrics, stats, axis_name=axis_name, bn_sync=bn_sync,
                               **extra)
    return new, metrics, outputs

  return update


def make_discriminator_update(disc_tx, *, axis_name: str | None = None, disc=None, multi_level: bool = False):
  """update(state, outputs) -> (state, metrics): step 2, D (and D_aux) on the detached logits of
  step 1; the segmenter and aux head are untouched. Call it after the segmenter update, which
  already advanced `state.step`: a non-finite value here is recorded for that same step."""
  pairs = [("disc", "source", "target", "")]
  if multi_level:
    pairs.append(("disc_aux", "source_aux", "target_aux", "_aux"))

  def loss_fn(psi, maps_s, maps_t):
    d_s = disc.apply({"params": psi}, maps_s)
    d_t = disc.apply({"params": psi}, maps_t)
    return discriminator_loss(d_s, d_t), discriminator_accuracy(d_s, d_t)

  def update(state, outputs):
    nets, metrics, checked = dict(state.nets), {}, []
    for name, src, tgt, suffix in pairs:
      (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          nets[name].params, outputs[src], outputs[tgt])
      grads = device_mean(grads, axis_name)
      nets[name] = update_net(nets[name], disc_tx, grads)
      grad_norm = optax.tree.norm(grads)
      metrics.update({f"loss_disc{suffix}": loss, f"disc_accuracy{suffix}": accuracy,
                      f"disc_grad_norm{suffix}": grad_norm})
      checked += [loss, grad_norm]
    metrics = device_mean(metrics, axis_name)
    new = state.replace(nets=nets)
    before = state.replace(step=state.step - 1)  # flag_non_finite records before.step + 1
    return flag_non_finite(before, new, checked + state_norms(new)), metrics

  return update


def make_train_step(model, tx, config, *, num_classes: int, axis_name: str | None = None,
                    bn_sync: bool = True, disc=None, disc_tx=None, head=None):
  """step(state, batch, key) -> (state, metrics): the segmenter update, then D's update."""
  segmenter_update = make_segmenter_update(model, tx, config, num_classes=num_classes, axis_name=axis_name,
                                           bn_sync=bn_sync, disc=disc, head=head)
  discriminator_update = make_discriminator_update(disc_tx, axis_name=axis_name, disc=disc,
                                                   multi_level=head is not None)

  def step(state, batch, key):
    state, metrics, outputs = segmenter_update(state, batch, key)
    state, disc_metrics = discriminator_update(state, outputs)
    return state, dict(metrics, **disc_metrics)

  return step


def step_parts(config, info):
  """The networks and optimizers of `make_train_step`, as keyword arguments."""
  return dict(num_classes=info.num_classes, axis_name=info.axis_name, bn_sync=deepall.bn_synced(config, info),
              disc=discriminator(config), disc_tx=discriminator_optimizer(config), head=aux_head(config, info))


def make_step(config, info):
  return make_train_step(deepall.segmenter(config, info, train=True), segmenter_optimizer(config), config,
                         **step_parts(config, info))
