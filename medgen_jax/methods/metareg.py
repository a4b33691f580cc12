"""MetaReg: domain generalization by a meta-learned weighted-L1 regularizer (Balaji,
Sankaranarayanan, Chellappa, "MetaReg: Towards Domain Generalization using Meta-Regularization",
NeurIPS 2018; Algorithm 1). `config.method='metareg'`, keys in `config.metareg`.

Networks. The U-Net (models/unet.UNet) is cut, by top-level parameter name, into the shared
feature network F_ψ = its encoder (`down*` blocks and `bottleneck`) and a task network T_θ = its
decoder (`upconv*`, `up*`, `head`); a combination is the SAME UNet applied to the merged dicts
(the decoder's skip connections come from F). On K source sites the method keeps F_ψ, one task
network θ_i per site (`state.nets['tasks']`, the K decoders stacked along a leading axis so that
a traced site index picks one), the regularizer weights φ (`state.nets['regularizer']`, one weight
per decoder parameter: BatchNorm scale/bias, up-convolution kernels and biases, head included)

    R_φ(θ) = Σ_j φ_j · |θ_j|                                                    (paper eq. 3)

and the final task network θ (the decoder in `state.params`).

Phase 1, meta-training (Algorithm 1; the first round(metareg.meta_fraction · num_steps) steps).
L_i(ψ, θ) = the DeepAll task loss (methods/deepall.segmentation_terms: weighted CE + soft Dice
with batch-level sums over site i's slices of the global batch + L2 on the kernels of (ψ, θ)) of
the network (ψ, θ) on site i's slices x_i of the step's pooled, site-balanced batch. Each step:

  1. supervised update (lines 2-7):  (ψ, θ_1..θ_K) ← opt_1 step on Σ_i L_i(ψ, θ_i)
  2. meta-update of φ (lines 8-17), at the ψ, θ_a just updated: sites a ≠ b drawn uniformly
     (ordered pairs) from the step's replicated key,
         β_0 = θ_a,   β_k = β_{k−1} − α ∇_β [L_a(ψ, β_{k−1}) + R_φ(β_{k−1})],  k = 1..l
         φ ← opt_φ step on ∂L_b(ψ, β_l)/∂φ     (Algorithm 1: plain SGD at α_φ)
     the gradient taken exactly by nested jax.grad through the l regularized inner steps
     (`meta_objective`); F is fixed in the inner loop (ψ is a constant of the objective).

`state.params` holds, during phase 1, F_ψ + the MEAN of the K task networks (what a validation
pass in phase 1 scores: the meta-training model's best single network); `state.batch_stats` the
same for the statistics.

Phase 2, final training (the remaining steps): φ frozen, the final network (ψ, θ) trained on all
sources pooled (one DeepAll forward over the whole batch) on

    L(ψ, θ) + R_φ(θ)                                                           (paper eq. 4)

with its own optimizer (opt_2, config.optimizer over num_steps − N1 steps, fresh moments).
F continues from meta-training and is fine-tuned (R_φ regularizes θ only). θ starts
(`metareg.final_task_init`) from a fresh initialization ('scratch', as the paper's final task
network "initialized from scratch") or from the mean of the K task networks ('mean').

|θ| at 0. |θ_j| is written θ_j · stop_gradient(sign θ_j) (`abs_sign`): its derivative is sign(θ_j),
i.e. the subgradient 0 at θ_j = 0 exactly (the minimum-norm subgradient, what PyTorch's abs
backward gives; jnp.abs would give +1 there), and sign has derivative 0, so the meta-gradient is
the exact derivative wherever no β_k,j is 0 (almost everywhere) and uses that subgradient
otherwise. Parameters initialized at exactly 0 (biases, BN offsets) therefore
get no L1 pull, and φ_j no meta-gradient from them, until an update moves them (the supervised
update precedes the inner loop, so in practice only at the very first step).

φ ≥ 0 (`metareg.phi_nonnegative`, default on): after each meta update φ is projected onto φ ≥ 0.
Not in Algorithm 1; a negative weight would make R_φ unbounded below in phase 2 (|θ_j| → ∞
lowers the loss), so the final training would diverge.

BatchNorm. Every forward runs in training mode. Supervised update: the network (ψ, θ_i) on x_i,
one pass per site (vmapped over the sites), so every BN normalizes each site with its own
statistics, as Algorithm 1's per-domain updates; θ_i's running statistics come from site i, F's
are the mean over sites of the per-site updates. The inner and meta passes use their own batch
statistics and update no running statistics. Phase 2: one pass over the pooled batch (as
DeepAll). The evaluated network uses the running statistics.

Data parallelism (exact on N devices, the mechanism of medgen_jax/meta.py): batch-level sums are
sums of an all_gather (losses.global_sum), the inner gradient is averaged over devices inside the
differentiated function (so it is the global batch's, to every order), and every outer gradient
(supervised, ∂L_b/∂φ, phase 2) is averaged over devices; sites a, b are drawn from the replicated
key before it is folded per device. Each device's shard holds the same number of slices of each
site (GROUPS_BY_DOMAIN; models/domains.group_by_domain groups them).

Deviations from Algorithm 1 (also in the README): lines 2-7 update ψ once per site in sequence;
here one update on the sum Σ_i L_i (the same gradient to first order); the l inner steps reuse
the step's slices of site a (Algorithm 1 samples a fresh batch of site a per inner step); the
supervised optimizer is config.optimizer (Adam by default) while the inner steps are plain SGD
at α = metareg.inner_lr.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medgen_jax import augment
from medgen_jax.methods import deepall
from medgen_jax.methods.base import (Phases, device_mean, flag_non_finite, fold_device, init_net,
                                     segmenter_variables, split_dice, state_norms)
from medgen_jax.methods.deepall import bn_synced, segmentation_terms
from medgen_jax.models.domains import group_by_domain
from medgen_jax.train_state import create_train_state, make_optimizer

LABEL = "MetaReg"
SAMPLER = "pooled"
GROUPS_BY_DOMAIN = True   # per-site task networks split each device's shard by site

FINAL_TASK_INITS = ("scratch", "mean")
META_OPTIMIZERS = ("sgd", "adam")
ENCODER_PREFIXES = ("down", "bottleneck")


# --- Parts of the U-Net ---------------------------------------------------------------------------


def is_encoder(name: str) -> bool:
  return name.startswith(ENCODER_PREFIXES)


def split_parts(tree):
  """(encoder F, decoder T) of a U-Net's params or batch_stats dict, by top-level name."""
  return ({k: v for k, v in tree.items() if is_encoder(k)},
          {k: v for k, v in tree.items() if not is_encoder(k)})


def merge(encoder, decoder):
  """The U-Net dict made of an encoder and a decoder part."""
  return {**encoder, **decoder}


def take(stacked, index):
  """Member `index` (a traced int) of a tree stacked along a leading axis."""
  return jax.tree.map(lambda x: x[index], stacked)


def tree_mean(stacked):
  return jax.tree.map(lambda x: jnp.mean(x, axis=0), stacked)


# --- The regularizer and the meta-objective (any pytree, any loss) ---------------------------------


def abs_sign(t):
  """|t| whose derivative is sign(t): the subgradient 0 at t = 0 (jnp.abs differentiates to
  select(t >= 0, 1, −1), i.e. +1 at 0). Written t · sign(t) with sign under stop_gradient: the
  same value, derivative sign(t) (sign's own derivative is 0 wherever it exists), so every
  higher derivative is the exact one away from 0."""
  return t * jax.lax.stop_gradient(jnp.sign(t))


def regularizer(phi, theta):
  """R_φ(θ) = Σ_j φ_j · |θ_j| over every leaf of θ (φ has θ's structure); ∇_θ R = φ · sign(θ)."""
  terms = [jnp.sum(p * abs_sign(t)) for p, t in zip(jax.tree.leaves(phi), jax.tree.leaves(theta))]
  return sum(terms) if terms else jnp.zeros(())


def regularized_inner_steps(inner_loss, theta, phi, *, inner_lr: float, steps: int,
                            axis_name: str | None = None):
  """β_0 = θ, β_k = β_{k−1} − α ∇_β [L_a(β_{k−1}) + R_φ(β_{k−1})] for k = 1..`steps`.
  Returns (β_l, [L_a(β_0), ..., L_a(β_{l−1})]). Differentiable in φ and θ (jax.grad of jax.grad).
  With `axis_name` the gradient is averaged over the data-parallel axis: the global batch's."""
  beta, losses = theta, []
  for _ in range(steps):
    loss, grads = jax.value_and_grad(lambda b: inner_loss(b) + regularizer(phi, b))(beta)
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
    losses.append(loss - regularizer(phi, beta))
    beta = jax.tree.map(lambda b, g: b - inner_lr * g, beta, grads)
  return beta, losses


def meta_objective(inner_loss, outer_loss, theta, phi, *, inner_lr: float, steps: int,
                   axis_name: str | None = None):
  """L_b(β_l(φ)), β_l = `regularized_inner_steps` from θ; jax.grad of it in φ is Algorithm 1's
  meta-gradient (line 17). Returns (L_b(β_l), L_a(β_0))."""
  beta, losses = regularized_inner_steps(inner_loss, theta, phi, inner_lr=inner_lr, steps=steps,
                                         axis_name=axis_name)
  return outer_loss(beta), losses[0]


# --- Schedule and checks --------------------------------------------------------------------------


def meta_steps(config) -> int:
  """N1 = round(metareg.meta_fraction · num_steps): the meta-training phase's length."""
  return int(round(config.metareg.meta_fraction * config.num_steps))


def phase_at(step, n1: int):
  """0 = meta-training (step < N1), 1 = final training; traced or a plain integer."""
  xp = jnp if isinstance(step, jax.core.Tracer) else np
  return (xp.asarray(step) >= n1).astype(xp.int32)


def validate(config) -> None:
  c = config.metareg
  n1 = meta_steps(config)
  if not 0 < n1 < config.num_steps:
    raise ValueError(f"config.metareg.meta_fraction={c.meta_fraction}: the meta-training phase has {n1} "
                     f"of num_steps={config.num_steps} steps; both phases need at least one step: use "
                     "0 < meta_fraction < 1 with num_steps large enough")
  if int(c.inner_steps) < 1:
    raise ValueError(f"config.metareg.inner_steps={c.inner_steps}: l, the number of regularized inner "
                     "steps, must be >= 1")
  if c.final_task_init not in FINAL_TASK_INITS:
    raise ValueError(f"config.metareg.final_task_init={c.final_task_init!r}: use one of "
                     f"{', '.join(FINAL_TASK_INITS)}")
  if c.meta_optimizer not in META_OPTIMIZERS:
    raise ValueError(f"config.metareg.meta_optimizer={c.meta_optimizer!r}: use one of "
                     f"{', '.join(META_OPTIMIZERS)}")
  if deepall.uses_domains(config):
    raise ValueError("config.model: MetaReg evaluates one plain U-Net (F + the final T); domain-specific "
                     "layers (model.norm='dsbn', model.adapter, model.se='domain') are not supported: "
                     "set model.norm='batch', adapter='none', se='none'|'shared'")


def check_domains(info) -> int:
  k = len(info.domains)
  if k < 2:
    raise ValueError(f"MetaReg meta-trains its regularizer on pairs of source sites a != b: it needs at "
                     f"least 2 training sites, got {list(info.domains)}. Fix: hold out fewer sites")
  return k


# --- Networks and optimizers ----------------------------------------------------------------------


def optimizers(config):
  """(opt_1 of (ψ, θ_1..K) for phase 1, opt_2 of the final (ψ, θ) for phase 2, opt_φ): the first
  two are config.optimizer over their own phase's length; opt_φ is metareg.meta_optimizer at the
  constant rate metareg.meta_lr (Algorithm 1: SGD)."""
  n1 = meta_steps(config)
  c = config.metareg
  meta_tx = optax.sgd(c.meta_lr) if c.meta_optimizer == "sgd" else optax.adam(c.meta_lr)
  return (make_optimizer(config.optimizer, num_steps=n1),
          make_optimizer(config.optimizer, num_steps=config.num_steps - n1), meta_tx)


def init_metareg_state(key, model, config, *, num_domains: int, input_shape):
  """F, the final decoder and its statistics from `key` (create_train_state's init); task
  network i's decoder from a model initialized with fold_in(key, i + 1); φ = metareg.phi_init."""
  phase1_tx, phase2_tx, meta_tx = optimizers(config)
  state = create_train_state(key, model, phase2_tx, input_shape=input_shape)
  init = jax.jit(lambda k: model.init(k, jnp.zeros(input_shape, jnp.float32), train=False))
  decoders = []
  for i in range(num_domains):
    variables = init(jax.random.fold_in(key, i + 1))
    decoders.append((split_parts(variables["params"])[1], split_parts(variables.get("batch_stats", {}))[1]))
  stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  task_params, task_stats = stack([d[0] for d in decoders]), stack([d[1] for d in decoders])
  encoder, final_decoder = split_parts(state.params)
  encoder_stats, final_stats = split_parts(state.batch_stats)
  phi = jax.tree.map(lambda t: jnp.full(t.shape, config.metareg.phi_init, jnp.float32), final_decoder)
  nets = {"tasks": init_net(task_params, task_stats, None),
          "regularizer": init_net(phi, {}, meta_tx)}
  if config.metareg.final_task_init == "scratch":
    nets["final_init"] = init_net(final_decoder, final_stats, None)
  # Phase 1 evaluates F + the mean task network (module docstring).
  return state.replace(params=merge(encoder, tree_mean(task_params)),
                       batch_stats=merge(encoder_stats, tree_mean(task_stats)),
                       task_opt_state=phase1_tx.init({"feature": encoder, "tasks": task_params}),
                       nets=nets)


# --- The two phases -------------------------------------------------------------------------------


def pick_pair(key, num_domains: int):
  """(a, b), a uniform over the sites and b uniform over the others: every ordered pair a ≠ b
  equally likely (Algorithm 1 line 8)."""
  key_a, key_b = jax.random.split(key)
  a = jax.random.randint(key_a, (), 0, num_domains)
  b = (a + 1 + jax.random.randint(key_b, (), 0, num_domains - 1)) % num_domains
  return a, b


def make_train_step(model, config, *, num_classes: int, num_domains: int,
                    axis_name: str | None = None, bn_sync: bool = True) -> Phases:
  """Phases (meta-training step, final-training step) switching at N1 = meta_steps(config)."""
  phase1_tx, phase2_tx, meta_tx = optimizers(config)
  c, n1, k_sites = config.metareg, meta_steps(config), num_domains

  def forward(params, stats, images, key):
    """Train-mode forward: (logits, new batch_stats)."""
    logits, updates = model.apply({"params": params, "batch_stats": stats}, images, train=True,
                                  mutable=["batch_stats"], rngs={"dropout": key})
    return logits, updates.get("batch_stats", stats)

  def task_loss(params, stats, images, labels, key):
    """The DeepAll loss of network `params` on one site's slices (global over devices)."""
    logits, new_stats = forward(params, stats, images, key)
    loss, metrics = segmentation_terms(logits, labels, params, config.loss, num_classes=num_classes,
                                       axis_name=axis_name)
    return loss, (metrics, new_stats)

  def prepare(batch, key):
    rows = batch["image"].shape[0]
    if rows % k_sites:
      raise ValueError(f"MetaReg runs each site's task network on that site's slices: a device's batch of "
                       f"{rows} cannot hold the {k_sites} sites equally. Fix: make config.batch_size a "
                       f"multiple of {k_sites} sites x the number of devices")
    a, b = pick_pair(jax.random.fold_in(key, 1), k_sites)   # replicated key: same sites on every device
    key = fold_device(key, axis_name)
    augment_key, key = jax.random.split(key)
    batch = augment.maybe_augment(augment_key, batch, config.get("augment"))
    return batch, key, a, b

  def supervised_loss(trainable, stats, grouped, key):
    """Σ_i L_i(ψ, θ_i): the network (ψ, θ_i) on site i's slices, vmapped over the sites (each
    site's BN statistics its own). Returns (loss, (metrics, encoder stats, stacked task stats))."""
    encoder_stats, task_stats = stats
    def one(theta, dec_stats, images, labels, k):
      params = merge(trainable["feature"], theta)
      logits, new = forward(params, merge(encoder_stats, dec_stats), images, k)
      return logits, new
    logits, new_stats = jax.vmap(one)(trainable["tasks"], task_stats, grouped["image"], grouped["label"],
                                      jax.random.split(key, k_sites))
    total, per_site = 0.0, []
    for i in range(k_sites):
      params = merge(trainable["feature"], take(trainable["tasks"], i))
      loss, metrics = segmentation_terms(logits[i], grouped["label"][i], params, config.loss,
                                         num_classes=num_classes, axis_name=axis_name)
      total += loss
      per_site.append(metrics)
    metrics = jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs), axis=0), *per_site)
    new_encoder, new_tasks = split_parts(new_stats)
    return total, (dict(metrics, loss=total), tree_mean(new_encoder), new_tasks)

  def meta_step(state, batch, key):
    batch, key, a, b = prepare(batch, key)
    sup_key, inner_key, outer_key = jax.random.split(key, 3)
    grouped = group_by_domain({"image": batch["image"], "label": batch["label"]}, batch["domain"], k_sites)
    encoder, _ = split_parts(state.params)
    encoder_stats, _ = split_parts(state.batch_stats)
    tasks = state.nets["tasks"]
    trainable = {"feature": encoder, "tasks": tasks.params}

    # 1. supervised update of ψ and every θ_i (Algorithm 1 lines 2-7)
    (_, (metrics, new_encoder_stats, new_task_stats)), grads = jax.value_and_grad(supervised_loss, has_aux=True)(
        trainable, (encoder_stats, tasks.batch_stats), grouped, sup_key)
    grads = device_mean(grads, axis_name)
    metrics = device_mean(metrics, axis_name)
    if axis_name is not None and not bn_sync:   # keep the replicated state identical
      new_encoder_stats, new_task_stats = jax.lax.pmean((new_encoder_stats, new_task_stats), axis_name)
    updates, task_opt_state = phase1_tx.update(grads, state.task_opt_state, trainable)
    trained = optax.apply_updates(trainable, updates)
    psi, thetas = trained["feature"], trained["tasks"]

    # 2. meta-update of φ at the updated ψ, θ_a (lines 8-17); F fixed: ψ is a constant here
    phi_net = state.nets["regularizer"]
    stats_a = merge(new_encoder_stats, take(new_task_stats, a))
    stats_b = merge(new_encoder_stats, take(new_task_stats, b))
    x_a, y_a = grouped["image"][a], grouped["label"][a]
    x_b, y_b = grouped["image"][b], grouped["label"][b]
    inner_loss = lambda beta: task_loss(merge(psi, beta), stats_a, x_a, y_a, inner_key)[0]
    outer_loss = lambda beta: task_loss(merge(psi, beta), stats_b, x_b, y_b, outer_key)[0]
    objective = lambda phi: meta_objective(inner_loss, outer_loss, take(thetas, a), phi, inner_lr=c.inner_lr,
                                           steps=int(c.inner_steps), axis_name=axis_name)
    (loss_meta_test, loss_meta_train), phi_grads = jax.value_and_grad(objective, has_aux=True)(phi_net.params)
    phi_grads = device_mean(phi_grads, axis_name)
    phi_updates, phi_opt_state = meta_tx.update(phi_grads, phi_net.opt_state, phi_net.params)
    phi = optax.apply_updates(phi_net.params, phi_updates)
    if c.phi_nonnegative:
      phi = jax.tree.map(lambda p: jnp.maximum(p, 0.0), phi)

    nets = dict(state.nets, tasks=tasks.replace(params=thetas, batch_stats=new_task_stats),
                regularizer=phi_net.replace(params=phi, opt_state=phi_opt_state))
    new = state.replace(step=state.step + 1, params=merge(psi, tree_mean(thetas)),
                        batch_stats=merge(new_encoder_stats, tree_mean(new_task_stats)),
                        task_opt_state=task_opt_state, nets=nets)
    phi_leaves = jax.tree.leaves(phi)
    metrics = split_dice(dict(
        metrics, grad_norm=optax.tree.norm(grads), meta_grad_norm=optax.tree.norm(phi_grads),
        loss_meta_train=device_mean(loss_meta_train, axis_name),
        loss_meta_test=device_mean(loss_meta_test, axis_name),
        phi_mean=sum(jnp.sum(p) for p in phi_leaves) / sum(p.size for p in phi_leaves),
        phi_max=jnp.max(jnp.stack([jnp.max(p) for p in phi_leaves])),
        phi_min=jnp.min(jnp.stack([jnp.min(p) for p in phi_leaves])),
        domain_a=a.astype(jnp.float32), domain_b=b.astype(jnp.float32), phase=jnp.asarray(0, jnp.int32)))
    checked = [metrics["loss"], metrics["grad_norm"], metrics["meta_grad_norm"], metrics["loss_meta_test"]]
    return flag_non_finite(state, new, checked + state_norms(new)), metrics

  def final_loss(params, stats, phi, batch, key):
    """L(ψ, θ) + R_φ(θ) on the pooled batch (paper eq. 4)."""
    loss, (metrics, new_stats) = task_loss(params, stats, batch["image"], batch["label"], key)
    reg = regularizer(phi, split_parts(params)[1])
    return loss + reg, (dict(metrics, loss=loss + reg, loss_seg=loss, loss_reg=reg), new_stats)

  def final_step(state, batch, key):
    batch, key, _, _ = prepare(batch, key)
    params, stats = state.params, state.batch_stats
    if c.final_task_init == "scratch":   # the first phase-2 step starts θ from its fresh init
      start = state.step == n1
      init = state.nets["final_init"]
      pick = lambda new, old: jax.tree.map(lambda x, y: jnp.where(start, x, y), new, old)
      encoder, decoder = split_parts(params)
      encoder_stats, decoder_stats = split_parts(stats)
      params = merge(encoder, pick(init.params, decoder))
      stats = merge(encoder_stats, pick(init.batch_stats, decoder_stats))
    phi = state.nets["regularizer"].params
    (_, (metrics, new_stats)), grads = jax.value_and_grad(final_loss, has_aux=True)(params, stats, phi, batch, key)
    grads = device_mean(grads, axis_name)
    metrics = device_mean(metrics, axis_name)
    if axis_name is not None and not bn_sync:
      new_stats = jax.lax.pmean(new_stats, axis_name)
    updates, opt_state = phase2_tx.update(grads, state.opt_state, params)
    new = state.replace(step=state.step + 1, params=optax.apply_updates(params, updates), batch_stats=new_stats,
                        opt_state=opt_state)
    metrics = split_dice(dict(metrics, grad_norm=optax.tree.norm(grads), phase=jnp.asarray(1, jnp.int32)))
    return flag_non_finite(state, new, [metrics["loss"], metrics["grad_norm"]] + state_norms(new)), metrics

  return Phases((meta_step, final_step), lambda step: phase_at(step, n1))


# --- The method interface (methods/base.py) ------------------------------------------------------


def init_state(key, config, info):
  return init_metareg_state(key, deepall.segmenter(config, info, train=False), config,
                            num_domains=check_domains(info), input_shape=(1, *info.input_shape))


def make_step(config, info):
  return make_train_step(deepall.segmenter(config, info, train=True), config, num_classes=info.num_classes,
                         num_domains=check_domains(info), axis_name=info.axis_name,
                         bn_sync=bn_synced(config, info))


def eval_network(config, info):
  """F + the final T: a plain U-Net (`state.params`; F + the mean task network during phase 1)."""
  return deepall.segmenter(config, info, train=False), segmenter_variables


def label(config, sources) -> str:
  return LABEL + (" + BigAug" if config.augment.enabled else "")
