"""Epi-FCR: episodic training of feature extractor and classifier for domain generalization
(Li, Zhang, Yang, Liu, Song, Hospedales, "Episodic Training for Domain Generalization", ICCV 2019;
released code HAHA-DL/Episodic-DG `PACS/model_resnet.py` (ModelEpiFCR), `PACS/resnet_epi_fcr.py`,
`PACS/run_main_epi_fcr.sh`; ../shared/reference/methods.md §4). `config.method='epi_fcr'`, keys
in `config.epi_fcr`.

Networks. Each network is this project's U-Net (models/unet.UNet) cut into a feature extractor
θ = its encoder (the `down*` blocks and the `bottleneck`: kernels, BatchNorm scale/bias and
statistics) and a classifier ψ = its decoder (`upconv*`, `up*`, `head`). A combination of two
parts is the SAME UNet applied to the merged parameter (and statistics) dicts, so the decoder's
skip connections come from whichever encoder runs. The method trains, on K source sites:

  * a domain-specific model (θ_k, ψ_k) per site k (`state.nets['domain_specific']`, one optimizer
    over all of them, as the released `optimizer_ds_nn` over `ds_nn.parameters()`);
  * the aggregated model (θ, ψ) (the top-level `state.params`, its own optimizer: the released
    `optimizer_agg` over `agg_nn.feature` + `agg_nn.classifier`) — the network evaluated;
  * a random classifier ψ_r (`state.nets['random_decoder']`: a decoder initialized once from
    the key and never updated: the released `classifierrand` is outside every optimizer).

Losses (paper eqs. 1-7; the code's `train_ds_nn` / `train_agg_nn`). S(f, x, y) = the DeepAll
segmentation loss (config.loss: weighted CE + soft Dice, batch sums over the given samples and
over devices) of network f on slices x with labels y; (x_k, y_k) = site k's slices of the batch;
L2 = config.loss.weight_decay · Σ w²/2 over the kernels of the network an optimizer trains (the
released SGD weight decay, written as the project's explicit term):

    domain-specific (eq. 1):  L_ds  = Σ_k S(ψ_k∘θ_k, x_k, y_k) + L2(θ_1..K, ψ_1..K)
    aggregated (eq. 2):       L_agg = Σ_k S(ψ∘θ, x_k, y_k)
    episodic feature (eq. 4): L_epif = S(ψ̄_j∘θ, x_i, y_i)      ψ̄_j = stop_gradient(ψ_j)
    episodic classifier (5):  L_epic = S(ψ∘θ̄_j, x_i, y_i)      θ̄_j = stop_gradient(θ_j)
    random classifier (eq. 6): L_epir = Σ_k S(ψ̄_r∘θ, x_k, y_k)  ψ̄_r fixed random
    aggregated objective (7): L_a = L_agg + epir_weight·L_epir + epic_weight·L_epic
                                        + epif_weight·L_epif + L2(θ, ψ)

minimized w.r.t. (θ, ψ) only. The episode (i, j) is drawn afresh every step: i uniform over the K
sites, j uniform over the other K−1 (the released `index_val`, `index_trn = choice(others)`), and
only site i's slices enter L_epif and L_epic — the code applies them to the one domain
`index == index_val`, with the one other domain's fixed parts, not to every pair (the paper's
sums over i ≠ j). L_agg and L_epir sum over every site.

Step and warm-up (the released `train()`; run_main_epi_fcr.sh: loops_warm = loops_agg_warm = 500,
warm_up_agg = 1, ite_train_epi_c = ite_train_epi_f = 0). Iterations 0 .. 500 (`ite <=
loops_warm`: 501 of them) run `train_ds_nn` then `train_agg_nn_warm`: the domain-specific update
and the aggregated model on L_agg + L2 alone (no L_epir, no episodic term: it is the aggregation's
episodic terms that wait, the domain-specific models train from step 0). Every later iteration
runs `train_ds_nn` then `train_agg_nn`: the domain-specific update FIRST, then L_a with the
domain-specific parts just updated. `epi_fcr.warmup_steps` counts the warm-up steps (501 =
released); the two kinds of step are the two phases of a methods/base.Phases. The domain-specific
models train at every step of both phases.

BatchNorm. Every forward runs in training mode (batch statistics), as DeepAll does here; running
statistics change only where an optimizer owns the part: the domain-specific models' from their
own update (model k on site k's slices), the aggregated model's from its forward on the whole
pooled batch (the network evaluated sees what DeepAll's sees). The episodic forwards (x_i only,
through ψ_r, ψ̄_j or θ̄_j) update no statistics: ψ_r's stay at their initial values, and the fixed
parts of model j keep theirs.

Data parallelism: S sums over the global batch (losses.global_sum), gradients and metrics are
averaged over devices (device_mean), the episode (i, j) is drawn from the step's replicated key
(the same on every device), and with `bn_sync` every BatchNorm's statistics are global (each
device holds the same number of slices of every site: GROUPS_BY_DOMAIN); without it the running
statistics are averaged over devices after the step.

Deviations from the released PACS code (ResNet-18 classification), with why:
  * ImageNet-pretrained feature extractors with BatchNorm frozen in eval mode (`bn_eval=1`) →
    U-Nets trained from scratch with train-mode BatchNorm (no pretrained segmentation encoder
    exists here; frozen initial statistics would be mean 0 / variance 1). Every model, including
    ψ_r, gets its own random initialization from the run's key (the release starts every feature
    extractor from the same pretrained weights).
  * The released domain-specific and aggregated updates read two independent data readers; here
    both updates of a step see the same pooled batch (one sampler per run).
  * Released optimizer: SGD lr 1e-3, momentum 0.9, weight decay 1e-4, batch 32 per domain, 3001
    iterations; the project configs keep the project's optimizer (config.optimizer, one instance
    per trained group) and explicit L2 on kernels (weight decay in the released SGD reaches every
    parameter).

Metrics: loss (L_ds + the aggregated objective of the phase), loss_domain_specific (L_ds),
loss_aggregated (L_agg), loss_epir, loss_epic, loss_epif (unweighted; full phase only), loss_l2
(the aggregated model's), dice_c (the aggregated model's per-site Dice averaged over the sites),
grad_norm (aggregated), ds_grad_norm, episode_i, episode_j (full phase only), phase (0 warm-up, 1
full).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medgen_jax import augment, losses
from medgen_jax.methods import deepall
from medgen_jax.methods.base import (Phases, device_mean, flag_non_finite, fold_device, init_net,
                                     segmenter_variables, split_dice, state_norms, update_net)
from medgen_jax.methods.deepall import bn_synced
from medgen_jax.models.domains import group_by_domain
from medgen_jax.train_state import TrainState, create_train_state, make_optimizer

LABEL = "Epi-FCR"
SAMPLER = "pooled"
GROUPS_BY_DOMAIN = True   # every step splits each device's shard into the sites' slices

DOMAIN_SPECIFIC = "domain_specific"
RANDOM_DECODER = "random_decoder"


def validate(config) -> None:
  c = config.epi_fcr
  for key in ("epif_weight", "epic_weight", "epir_weight"):
    if c[key] < 0:
      raise ValueError(f"config.epi_fcr.{key}={c[key]}: loss weights must be >= 0 (released: epif 2.0, "
                       "epic 0.05, epir 0.1)")
  if not 0 <= c.warmup_steps < config.num_steps:
    raise ValueError(f"config.epi_fcr.warmup_steps={c.warmup_steps}: the episodic terms start after the "
                     f"warm-up, which must end before num_steps ({config.num_steps}): use 0 <= "
                     "epi_fcr.warmup_steps < num_steps (released: 501 of 3001)")
  if deepall.uses_domains(config):
    raise ValueError("config.model: Epi-FCR's per-site parts are its own domain-specific U-Nets; the "
                     "evaluated (aggregated) U-Net has no per-site layers: use model.norm != 'dsbn', "
                     "model.adapter='none', model.se != 'domain'")


# --- Parts: feature extractor (encoder) and classifier (decoder) of a U-Net ---------------------


def is_encoder(name: str) -> bool:
  """U-Net top-level names of the feature extractor: down0 .. down{depth-1}, bottleneck."""
  return name.startswith("down") or name == "bottleneck"


def split_parts(tree):
  """(encoder, decoder) of a U-Net's params or batch_stats dict (by top-level name)."""
  return ({k: v for k, v in tree.items() if is_encoder(k)},
          {k: v for k, v in tree.items() if not is_encoder(k)})


def merge(encoder, decoder):
  """The dict of a U-Net made of `encoder` and `decoder` parts."""
  return {**encoder, **decoder}


def domain_name(k: int) -> str:
  return f"domain_{k}"


def pick(tree, index, num_domains: int):
  """Domain-specific model `index` (a traced int) of {'domain_k': tree_k}: the K trees stacked and
  indexed (the same program for every episode)."""
  return jax.tree.map(lambda *xs: jnp.stack(xs)[index],
                      *[tree[domain_name(k)] for k in range(num_domains)])


def draw_episode(key, num_domains: int):
  """(i, j): i uniform over the sites, j uniform over the others (released: np.random.choice of
  index_val, then of index_trn among the rest)."""
  key_i, key_j = jax.random.split(key)
  i = jax.random.randint(key_i, (), 0, num_domains)
  j = (i + 1 + jax.random.randint(key_j, (), 0, num_domains - 1)) % num_domains
  return i, j


# --- Objectives -----------------------------------------------------------------------------------


def make_objectives(model, config, *, num_classes: int, num_domains: int, axis_name: str | None = None):
  """(ds_objective, agg_objective).

  ds_objective(ds_params, ds_stats, grouped, keys) -> (L_ds, (metrics, new ds_stats)) with
  `grouped` = {'image', 'label'} grouped by site [K, n, ...] and one dropout key per site.
  agg_objective(params, stats, batch, episode, key, *, episodic) -> (L_a, (metrics, new
  aggregated stats)), `params`/`stats` = {'aggregated', 'domain_specific', 'random_decoder'}: a
  function of every group, so that the stop_gradient of the fixed parts is visible to jax.grad;
  `episodic=False` is the warm-up objective L_agg + L2."""
  loss_config, c, K = config.loss, config.epi_fcr, num_domains

  def apply(params, stats, images, key):
    logits, updates = model.apply({"params": params, "batch_stats": stats}, images, train=True,
                                  mutable=["batch_stats"], rngs={"dropout": key})
    return logits, updates.get("batch_stats", stats)

  def seg(logits, labels):
    loss, metrics = deepall.config_segmentation_loss(logits, labels, loss_config, num_classes=num_classes,
                                                     axis_name=axis_name)
    return loss, metrics["dice"]

  def per_site(grouped_logits, grouped_labels):
    """Σ_k S on site k's slices (the released per-domain loop), and the sites' mean Dice."""
    terms = [seg(grouped_logits[k], grouped_labels[k]) for k in range(K)]
    return sum(t[0] for t in terms), sum(t[1] for t in terms) / K

  def ds_objective(ds_params, ds_stats, grouped, keys):
    total, new_stats = 0.0, {}
    for k in range(K):
      name = domain_name(k)
      logits, new_stats[name] = apply(ds_params[name], ds_stats[name], grouped["image"][k], keys[k])
      total += seg(logits, grouped["label"][k])[0]
    l2 = losses.l2_kernel_loss(ds_params, coefficient=loss_config.weight_decay)
    return total + l2, ({"loss_domain_specific": total + l2}, new_stats)

  def agg_objective(params, stats, batch, episode, key, *, episodic: bool = True):
    agg, agg_stats = params["aggregated"], stats["aggregated"]
    key_agg, key_rand, key_f, key_c = jax.random.split(key, 4)
    images = batch["image"]
    grouped_images = group_by_domain(images, batch["domain"], K)
    labels = group_by_domain(batch["label"], batch["domain"], K)
    logits, new_agg_stats = apply(agg, agg_stats, images, key_agg)
    loss_agg, dice = per_site(group_by_domain(logits, batch["domain"], K), labels)
    l2 = losses.l2_kernel_loss(agg, coefficient=loss_config.weight_decay)
    metrics = {"loss_aggregated": loss_agg, "loss_l2": l2, "dice": dice}
    total = loss_agg + l2
    if episodic:
      enc, dec = split_parts(agg)
      enc_s, dec_s = split_parts(agg_stats)
      # ψ_r: fixed (never trained); θ learns to suit a classifier it cannot adapt (eq. 6)
      rand = jax.lax.stop_gradient(params[RANDOM_DECODER])
      rand_logits, _ = apply(merge(enc, rand), merge(enc_s, stats[RANDOM_DECODER]), images, key_rand)
      loss_epir, _ = per_site(group_by_domain(rand_logits, batch["domain"], K), labels)
      i, j = episode
      x_i, y_i = grouped_images[i], labels[i]
      # model j's parts are fixed: the aggregated part must do well alongside a partner that
      # has never seen site i (eqs. 4, 5)
      enc_j, dec_j = split_parts(jax.lax.stop_gradient(pick(params[DOMAIN_SPECIFIC], j, K)))
      enc_sj, dec_sj = split_parts(pick(stats[DOMAIN_SPECIFIC], j, K))
      loss_epif, _ = seg(apply(merge(enc, dec_j), merge(enc_s, dec_sj), x_i, key_f)[0], y_i)
      loss_epic, _ = seg(apply(merge(enc_j, dec), merge(enc_sj, dec_s), x_i, key_c)[0], y_i)
      total = (total + c.epir_weight * loss_epir + c.epic_weight * loss_epic
               + c.epif_weight * loss_epif)
      metrics.update(loss_epir=loss_epir, loss_epic=loss_epic, loss_epif=loss_epif)
    return total, (dict(metrics, loss_agg_objective=total), new_agg_stats)

  return ds_objective, agg_objective


# --- The step -------------------------------------------------------------------------------------


def make_train_step(model, agg_tx, ds_tx, config, *, num_classes: int, num_domains: int,
                    axis_name: str | None = None, bn_sync: bool = True) -> Phases:
  """Phases (warm-up step, full step), switching at config.epi_fcr.warmup_steps (module docstring)."""
  K = num_domains
  if K < 2:
    raise ValueError(f"Epi-FCR pairs each site with another site's model: {K} source site(s); use a "
                     "run with >= 2 source sites")
  ds_objective, agg_objective = make_objectives(model, config, num_classes=num_classes, num_domains=K,
                                                axis_name=axis_name)

  def sync_stats(stats):
    if axis_name is not None and not bn_sync:   # keep the replicated state identical
      stats = jax.lax.pmean(stats, axis_name)
    return stats

  def ds_update(state, batch, key):
    """train_ds_nn: one optimizer update of every domain-specific model on its own site."""
    net = state.nets[DOMAIN_SPECIFIC]
    grouped = group_by_domain({"image": batch["image"], "label": batch["label"]}, batch["domain"], K)
    (_, (metrics, stats)), grads = jax.value_and_grad(ds_objective, has_aux=True)(
        net.params, net.batch_stats, grouped, jax.random.split(key, K))
    grads = device_mean(grads, axis_name)
    net = update_net(net, ds_tx, grads, batch_stats=sync_stats(stats))
    return (state.replace(nets=dict(state.nets, **{DOMAIN_SPECIFIC: net})),
            dict(device_mean(metrics, axis_name), ds_grad_norm=optax.tree.norm(grads)))

  def agg_update(state, batch, episode, key, *, episodic):
    """train_agg_nn (episodic) / train_agg_nn_warm: one update of (θ, ψ) only."""
    params = {"aggregated": state.params, DOMAIN_SPECIFIC: state.nets[DOMAIN_SPECIFIC].params,
              RANDOM_DECODER: state.nets[RANDOM_DECODER].params}
    stats = {"aggregated": state.batch_stats, DOMAIN_SPECIFIC: state.nets[DOMAIN_SPECIFIC].batch_stats,
             RANDOM_DECODER: state.nets[RANDOM_DECODER].batch_stats}

    def objective(agg):   # differentiated w.r.t. (θ, ψ) only: the optimizer_agg's parameters
      return agg_objective(dict(params, aggregated=agg), stats, batch, episode, key, episodic=episodic)

    (_, (metrics, agg_stats)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    grads = device_mean(grads, axis_name)
    updates, opt_state = agg_tx.update(grads, state.opt_state, state.params)
    new = state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                        batch_stats=sync_stats(agg_stats))
    return new, dict(device_mean(metrics, axis_name), grad_norm=optax.tree.norm(grads))

  def prepare(batch, key):
    rows = batch["image"].shape[0]
    if rows % K:
      raise ValueError(f"Epi-FCR trains each site's model on that site's slices: a device's batch of {rows} "
                       f"cannot hold the {K} sites equally. Fix: make config.batch_size a multiple of {K} "
                       "sites x the number of devices")
    episode_key, key = jax.random.split(key)   # before fold_device: one episode on every device
    key = fold_device(key, axis_name)
    augment_key, ds_key, agg_key = jax.random.split(key, 3)
    batch = augment.maybe_augment(augment_key, batch, config.get("augment"))
    return batch, draw_episode(episode_key, K), ds_key, agg_key

  def run(state, batch, key, *, episodic):
    batch, episode, ds_key, agg_key = prepare(batch, key)
    new, ds_metrics = ds_update(state, batch, ds_key)                 # 1. train_ds_nn
    new, agg_metrics = agg_update(new, batch, episode, agg_key, episodic=episodic)   # 2. with ds updated
    metrics = dict(ds_metrics, **agg_metrics,
                   loss=ds_metrics["loss_domain_specific"] + agg_metrics["loss_agg_objective"],
                   phase=jnp.asarray(int(episodic), jnp.int32))
    if episodic:
      metrics.update(episode_i=episode[0].astype(jnp.float32), episode_j=episode[1].astype(jnp.float32))
    new = new.replace(step=state.step + 1)
    checked = [metrics["loss"], metrics["grad_norm"], metrics["ds_grad_norm"]]
    return flag_non_finite(state, new, checked + state_norms(new)), split_dice(metrics)

  def warmup_step(state: TrainState, batch, key):
    return run(state, batch, key, episodic=False)

  def full_step(state: TrainState, batch, key):
    return run(state, batch, key, episodic=True)

  warmup = config.epi_fcr.warmup_steps
  return Phases((warmup_step, full_step), lambda step: phase_at(step, warmup))


def phase_at(step, warmup_steps: int):
  """0 = warm-up (domain-specific + aggregated L_agg), 1 = full step, at (0-based) step `step`
  (traced inside a step function; a plain integer on the host, computed with numpy)."""
  xp = jnp if isinstance(step, jax.core.Tracer) else np
  return (xp.asarray(step) >= warmup_steps).astype(xp.int32)


# --- The method interface (methods/base.py) ------------------------------------------------------


def optimizers(config):
  """(aggregated optimizer, domain-specific optimizer): config.optimizer twice (released: two SGDs)."""
  return (make_optimizer(config.optimizer, num_steps=config.num_steps),
          make_optimizer(config.optimizer, num_steps=config.num_steps))


def init_epi_fcr_state(key, model, agg_tx, ds_tx, *, input_shape, num_domains: int) -> TrainState:
  """The aggregated U-Net (create_train_state from its own key), K domain-specific U-Nets and the
  random decoder ψ_r, each from its own split of `key`."""
  agg_key, rand_key, ds_key = jax.random.split(key, 3)
  state = create_train_state(agg_key, model, agg_tx, input_shape=input_shape)
  init = jax.jit(lambda k: model.init(k, jnp.zeros(input_shape, jnp.float32), train=False))
  ds = [init(k) for k in jax.random.split(ds_key, num_domains)]
  ds_params = {domain_name(k): v["params"] for k, v in enumerate(ds)}
  ds_stats = {domain_name(k): v.get("batch_stats", {}) for k, v in enumerate(ds)}
  rand = init(rand_key)
  rand_params = split_parts(rand["params"])[1]
  rand_stats = split_parts(rand.get("batch_stats", {}))[1]
  return state.replace(nets={DOMAIN_SPECIFIC: init_net(ds_params, ds_stats, ds_tx),
                             RANDOM_DECODER: init_net(rand_params, rand_stats, None)})


def init_state(key, config, info) -> TrainState:
  agg_tx, ds_tx = optimizers(config)
  return init_epi_fcr_state(key, deepall.segmenter(config, info, train=False), agg_tx, ds_tx,
                            input_shape=(1, *info.input_shape), num_domains=info.num_domains)


def make_step(config, info):
  agg_tx, ds_tx = optimizers(config)
  return make_train_step(deepall.segmenter(config, info, train=True), agg_tx, ds_tx, config,
                         num_classes=info.num_classes, num_domains=len(info.domains),
                         axis_name=info.axis_name, bn_sync=bn_synced(config, info))


def eval_network(config, info):
  """The aggregated model (θ, ψ): a plain U-Net, the top-level state."""
  return deepall.segmenter(config, info, train=False), segmenter_variables
