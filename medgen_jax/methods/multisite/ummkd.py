"""UMMKD — unpaired multi-modal segmentation via knowledge distillation (Dou, Liu, Heng, Glocker,
IEEE TMI 2020; released code carrenD/ummkd `network.py`, `train_combine.py`; methods.md §1.5,
§3.2), and the multi-modal baselines it is compared with.

One segmentation network for two (or more) modalities, trained on labelled but unpaired images of
each: every convolution kernel is shared and only the normalization is modality-specific (the
"Chilopod" net). Here: the project U-Net with `model.norm='dsbn'` and the modalities as its
domains (models/domains.DomainBatchNorm: each modality's slices are normalized with that
modality's BN, as the released code's per-modality `bn_scope`; at test time a volume is
normalized with its own modality's BN).

Loss, per training step on a domain-balanced pooled batch (B/K slices of each of K modalities,
grouped with models/domains.group_by_domain):

    L = Σ_m [ WCE(logits_m, y_m) + Dice_A(logits_m, y_m) ]          (batch-level per modality;
        + kd_weight · L_kd                                           §1.1 squared Dice, §1.2
        + weight_decay · Σ_kernels ‖w‖² / 2                          class-balanced CE, clip 0.005)

with L_kd (`losses.distillation.unmasked_kd_loss`, the released `_get_kd_cost`): for each class c
the mean logit vector z̄_c^m of modality m's class-c pixels over the batch (ε = 1e-6),
q_c^m = softmax(z̄_c^m / T), T = 2, and L_kd = (1/C) Σ_c ½ [KL(q_c^a‖q_c^b) + KL(q_c^b‖q_c^a)],
C = all classes incl. background, no class mask (a class absent from one modality's batch has a
uniform q_c there — the released behaviour; `ummkd.kd_class_mask=True` zeroes such classes, MASF's
mask, via `losses.class_alignment_loss(variant='talk')`). The talk writes L_kd without the ½;
the released code (followed here) divides the two KLs' sum by 2. With K > 2 modalities (brain
T1/T2/CT) L_kd is the mean over the K(K−1)/2 modality pairs (ours: the paper has two). Released
weights: kd 0.5, L2 1e-4 on kernels (every "Variable", i.e. no BN γ/β), Dice/CE weights 1. The
released Dice-A loss is −mean_c dice_c; ours is 1 − mean_c dice_c (same gradient). One Adam
(1e-3, ×0.95 every 1000 steps in the released code: optimizer.schedule='exponential').

Differences from the released code: the backbone is the project U-Net, not the dilated residual
FCN with the sub-pixel head (§3.2); dropout only after the bottleneck (model.dropout; released:
keep 0.75 after every conv); one forward pass on the pooled batch with per-modality BN instead of
one call per modality (the same statistics: convolutions are per-sample, DSBN's are per domain).
The 3-D variant (3d_implementation/, whose release has the KD switched off) is this method with
model.name='unet3d' and data.patch_size (configs/ummkd3d_abdomen.py, KD on): the Chilopod network
is `make_model(config.model, ...)` and every loss term reduces over any number of spatial axes.

Baselines (configs/multimodal/): Separate (method 'separate': one network per modality), Joint
(method 'deepall': one network, shared BN), and through `ummkd.shared` (models/multimodal.py)
the shared-stream networks of Valindria et al. (WACV 2018): 'decoder' = Y-shaped (an encoder per
modality, shared decoder), 'middle' = X-shaped (encoder and decoder per modality, shared
bottleneck), 'encoder' = inverse-Y (shared encoder, a decoder per modality); per-modality blocks
see their own modality's slices only. Chilopod = this method with kd_weight 0 (the paper's
ablation: same per-modality loss, no KD).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp

from medgen_jax import losses
from medgen_jax.losses.distillation import unmasked_kd_loss
from medgen_jax.methods import deepall
from medgen_jax.methods.base import segmenter_variables
from medgen_jax.models.domains import group_by_domain
from medgen_jax.models.multimodal import SHARED, MultiModalUNet
from medgen_jax.train_state import TrainState, compute_dtype, create_train_state, make_model, make_optimizer

LABEL = "UMMKD"
SAMPLER = "pooled"
GROUPS_BY_DOMAIN = True   # per-modality losses split each device shard (trainer checks balance)
NETWORKS = {"all": "Chilopod", "encoder": "Inverse-Y", "decoder": "Y-shaped", "middle": "X-shaped"}


def kd_loss(logits_by_modality, onehot_by_modality, *, temperature: float, class_mask: bool = False,
            axis_name: str | None = None):
  """L_kd between every pair of modalities, averaged over the pairs (one pair: the released
  two-modality loss); 0 with one modality. Inputs: [K, n, ..., C] logits and one-hot labels."""
  k = logits_by_modality.shape[0]
  pairs = list(itertools.combinations(range(k), 2))
  if not pairs:
    return jnp.zeros((), jnp.float32)

  def one(a, b):
    if class_mask:
      return losses.class_alignment_loss(logits_by_modality[a], onehot_by_modality[a], logits_by_modality[b],
                                         onehot_by_modality[b], temperature=temperature, variant="talk",
                                         axis_name=axis_name)
    return unmasked_kd_loss(logits_by_modality[a], onehot_by_modality[a], logits_by_modality[b],
                            onehot_by_modality[b], temperature=temperature, axis_name=axis_name)

  return sum(one(a, b) for a, b in pairs) / len(pairs)


def objective(logits, labels, domain, params, config, *, num_classes: int, num_modalities: int,
              axis_name: str | None = None, names=None):
  """The UMMKD loss of a pooled batch's logits (module docstring). Returns (loss, metrics)."""
  if logits.shape[0] % num_modalities:
    raise ValueError(f"a batch (or device shard) of {logits.shape[0]} slices cannot hold the "
                     f"{num_modalities} modalities equally. Fix: make config.batch_size / devices a "
                     f"multiple of {num_modalities}")
  names = names or [f"m{k}" for k in range(num_modalities)]
  lc = config.loss
  logits_k, labels_k = group_by_domain((logits, labels), domain, num_modalities)
  seg, metrics = 0.0, {}
  per_modality = []
  for k in range(num_modalities):
    seg_k, m = deepall.config_segmentation_loss(logits_k[k], labels_k[k], lc, num_classes=num_classes,
                                                axis_name=axis_name)
    seg = seg + seg_k
    metrics[f"loss_seg_{names[k]}"] = seg_k
    per_modality.append(m)
  onehot_k = jax.nn.one_hot(labels_k, num_classes, dtype=jnp.float32)
  kd = kd_loss(logits_k.astype(jnp.float32), onehot_k, temperature=config.ummkd.temperature,
               class_mask=config.ummkd.kd_class_mask, axis_name=axis_name)
  l2 = losses.l2_kernel_loss(params, coefficient=lc.weight_decay)
  loss = seg + config.ummkd.kd_weight * kd + l2
  mean = lambda key: sum(m[key] for m in per_modality) / num_modalities
  metrics.update(loss=loss, loss_seg=seg, loss_kd=kd, loss_l2=l2, loss_ce=mean("loss_ce"),
                 loss_dice=mean("loss_dice"), dice=mean("dice"))
  return loss, metrics


def make_loss_fn(model, config, *, num_classes: int, num_modalities: int, axis_name: str | None = None,
                 names=None):
  """loss_fn(params, batch_stats, batch, key) -> (loss, (metrics, new_batch_stats))."""

  def loss_fn(params, batch_stats, batch, key):
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"],
                                  train=True, domain=batch["domain"], mutable=["batch_stats"],
                                  rngs={"dropout": key})
    loss, metrics = objective(logits, batch["label"], batch["domain"], params, config,
                              num_classes=num_classes, num_modalities=num_modalities,
                              axis_name=axis_name, names=names)
    return loss, (metrics, updates.get("batch_stats", batch_stats))

  return loss_fn


def make_train_step(model, tx, config, *, num_classes: int, num_modalities: int,
                    axis_name: str | None = None, bn_sync: bool = True, names=None, **unused):
  """step(state, batch, key) -> (state, metrics): one Adam step on the whole UMMKD loss (one
  optimizer over every parameter, as train_combine.py), with deepall's shared tail (device
  averaging, divergence flag)."""
  loss_fn = make_loss_fn(model, config, num_classes=num_classes, num_modalities=num_modalities,
                         axis_name=axis_name, names=names)
  return deepall.step_from_loss(loss_fn, tx, config, axis_name=axis_name, bn_sync=bn_sync)


# --- The method interface (methods/base.py) ------------------------------------------------------


def segmenter(config, info, *, train: bool):
  """shared='all': the project U-Net (model.norm 'dsbn' = the Chilopod net: kernels shared, BN per
  modality); otherwise models/multimodal.MultiModalUNet with per-modality blocks. One domain per
  training modality (info.domains)."""
  axis = info.axis_name if train and deepall.bn_synced(config, info) else None
  if config.ummkd.shared == "all":
    return make_model(config.model, num_classes=info.num_classes, dtype=config.dtype, bn_axis_name=axis,
                      num_domains=info.num_domains)
  m = config.model
  return MultiModalUNet(num_classes=info.num_classes, num_modalities=info.num_domains,
                        shared=config.ummkd.shared, base_features=m.base_features, depth=m.depth,
                        dropout=m.dropout, norm=m.norm, bn_axis_name=axis, dtype=compute_dtype(config.dtype),
                        fast_ops=m.fast_ops)


def uses_domains(config) -> bool:
  """Every variant has modality-specific layers: a test volume is segmented with its modality's."""
  return True


def init_state(key, config, info) -> TrainState:
  tx = make_optimizer(config.optimizer, num_steps=config.num_steps)
  return create_train_state(key, segmenter(config, info, train=False), tx, input_shape=(1, *info.input_shape))


def make_step(config, info):
  return make_train_step(segmenter(config, info, train=True),
                         make_optimizer(config.optimizer, num_steps=config.num_steps), config,
                         num_classes=info.num_classes, num_modalities=info.num_domains,
                         axis_name=info.axis_name, bn_sync=deepall.bn_synced(config, info),
                         names=list(info.domains) or None)


def eval_network(config, info):
  return segmenter(config, info, train=False), segmenter_variables


def label(config, sources) -> str:
  """UMMKD (Chilopod + KD); Chilopod (kd_weight 0); the shared-stream baselines by their shape
  (Y-shaped, X-shaped, Inverse-Y), '+ KD' when they also distil; 'Joint (per-modality loss)'
  for shared='all' with a shared BN."""
  u = config.ummkd
  if u.shared == "all" and config.model.norm != "dsbn":
    base = f"Joint ({config.model.norm} norm, per-modality loss)"
  else:
    base = NETWORKS[u.shared]
  if u.kd_weight > 0:
    base = "UMMKD" if base == "Chilopod" else base + " + KD"
  if u.kd_weight > 0 and u.kd_class_mask:
    base += " [KD class mask]"
  return base + (" + BigAug" if config.augment.enabled else "")


def validate(config) -> None:
  u = config.ummkd
  if u.shared not in SHARED:
    raise ValueError(f"config.ummkd.shared: unknown sharing {u.shared!r}; use one of {', '.join(SHARED)} "
                     "(all = Chilopod, decoder = Y-shaped, middle = X-shaped, encoder = inverse-Y)")
  if u.kd_weight < 0:
    raise ValueError(f"config.ummkd.kd_weight: {u.kd_weight} < 0; use >= 0 (0.5 released, 0 = no KD)")
  if u.temperature <= 0:
    raise ValueError(f"config.ummkd.temperature: {u.temperature} must be > 0 (2 released)")
  extras = {k: config.model.get(k, "none") for k in ("adapter", "se")}
  if u.shared != "all" and any(v != "none" for v in extras.values()):
    raise ValueError(f"config.model: adapters / squeeze-and-excitation ({extras}) exist on the project "
                     "U-Net only, not on the shared-stream networks (ummkd.shared != 'all'): set them to 'none'")
  if u.shared != "all" and not config.model.fast_ops:
    raise ValueError("config.model.fast_ops: the shared-stream networks (ummkd.shared != 'all') are "
                     "written with the fast layers only: set it to True")
