"""Episodic parts shared by the meta-learning methods: the episode's augmentation, inner clip and
forward passes (MLDG, MASF, SAML), and the skeleton of MASF and SAML: one inner step on
meta-train, an outer objective at θ' with a metric network M_φ, the optimizer(s) of θ and one
for φ.

    θ' = θ − α · clip(∇_θ L_inner(θ; D_tr)),     F(θ, φ) = L_inner(θ; D_tr) + outer(θ', φ; D_tr, D_te)

`outer(adapted, phi, episode) -> (loss, metrics)` is the method's own part; `episode` holds the
(augmented) meta-train and meta-test batches, and `episode["forward"](params, group)`, the
train-mode forward pass of a group at (adapted) params, which discards its BN statistics (see
medgen_jax/meta.py for the BN policy and `meta.per_domain_bn`).

The step computes the two parts of ∇_θ F separately, at the same θ (`meta_gradients`):

    g_task = ∇_θ L_inner(θ)               (the inner gradient, reused from meta.adapt)
    g_meta = ∇_θ outer(θ'(θ), φ)          (through θ': second order unless `meta.first_order`)

and applies them according to `meta.optimizers`:

* 'summed': one optimizer (config.optimizer) on g_task + clip(g_meta) — with `meta.outer_clip`
  0 (off) exactly ∇_θ F, the gradient of the whole objective;
* 'released' (MASF and SAML as released, methods.md §3.7/§3.8): two optimizer states for θ, as
  the TF code's two train ops in one `session.run`: config.optimizer on clip(g_meta) (SAML:
  Adam 1e-3, clip 10; MASF: Adam outer_lr, clip 2) and the task optimizer
  (`make_task_optimizer`: config.optimizer's kind and schedule at `meta.task_learning_rate`;
  SAML: Adam 1e-4, MASF: Adam outer_lr) on g_task, both gradients at the same θ, the two updates
  summed (methods/deepall.finish_step).

clip is `tf.clip_by_norm` per tensor at `meta.outer_clip` (0 = off), applied to the global
(device-averaged) meta gradient. φ always has its own optimizer on ∂F/∂φ = ∂outer/∂φ (the code's
metric_train_op; MASF's code also let its meta_train_op update φ, a variable-filter quirk that is
not reproduced).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from medgen_jax import augment, meta
from medgen_jax.methods import deepall
from medgen_jax.methods.base import fold_device, init_net
from medgen_jax.methods.deepall import finish_step, segmentation_terms
from medgen_jax.models.metric import MetricNet
from medgen_jax.train_state import make_optimizer

SAMPLER = "episodic"

OPTIMIZER_MODES = ("summed", "released")
RELEASED = ("masf", "saml")   # methods whose released code had a separate task optimizer


def task_learning_rate(config) -> float:
  """`meta.task_learning_rate`, or config.optimizer.learning_rate when it is 0."""
  return config.meta.task_learning_rate or config.optimizer.learning_rate


def make_task_optimizer(config):
  """The second optimizer of θ, for the task loss, when `meta.optimizers` is 'released'
  (MASF/SAML as released): config.optimizer's kind and schedule at `task_learning_rate(config)`.
  None in 'summed' mode (one optimizer on the summed objective)."""
  if config.meta.optimizers == "summed":
    return None
  if config.meta.optimizers != "released" or config.method not in RELEASED:
    raise ValueError(f"config.meta.optimizers={config.meta.optimizers!r} for method {config.method!r}: "
                     f"'released' exists for {', '.join(RELEASED)} only; use 'summed'")
  opt = config.optimizer.copy_and_resolve_references()
  opt.learning_rate = task_learning_rate(config)
  return make_optimizer(opt, num_steps=config.num_steps)


def inner_clip(meta_config):
  """The per-tensor inner-gradient clip norm, or None when `meta.clip` is 0 (off)."""
  return meta_config.clip if meta_config.clip and meta_config.clip > 0 else None


def clip_tensors(grads, max_norm: float | None):
  """tf.clip_by_norm on every tensor of a gradient pytree (None: unchanged)."""
  if max_norm is None:
    return grads
  return jax.tree.map(lambda g: meta.clip_by_norm(g, max_norm), grads)


def augment_episode(key, batch, config):
  """BigAug (when enabled) on both groups of an episode, with independent keys."""
  k_tr, k_te = jax.random.split(key)
  augment_config = config.get("augment")
  return (augment.maybe_augment(k_tr, batch["meta_train"], augment_config),
          augment.maybe_augment(k_te, batch["meta_test"], augment_config))


def apply_model(model, params, batch_stats, images, key, *, domains: int = 1,
                per_domain_bn: bool = False, return_features: bool = False):
  """Train-mode forward: (outputs, new batch_stats).

  With `per_domain_bn` and several `domains`, the batch (domain-interleaved: rows i::domains
  are domain i, as the episodic sampler and parallel.shard_batch leave every device's chunk) is
  regrouped to [domains, B/domains, ...] and the network is vmapped over the domain axis, so
  BatchNorm normalizes each domain with its own statistics, as the TF1 code's per-domain calls
  (methods.md §1.8); with a BN `axis_name` each domain's statistics are synchronized over
  devices. The returned running statistics are the mean over domains of the per-domain updates;
  outputs come back in the batch's own row order. Dropout draws an independent key per domain.
  """
  def run(x, k):
    out, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                               return_features=return_features, mutable=["batch_stats"],
                               rngs={"dropout": k})
    return out, updates.get("batch_stats", batch_stats)

  if not per_domain_bn or domains == 1:
    return run(images, key)
  b = images.shape[0]
  if b % domains:
    raise ValueError(f"per-domain BN: a batch of {b} rows does not hold {domains} interleaved domains")
  grouped = images.reshape((b // domains, domains) + images.shape[1:]).swapaxes(0, 1)
  outputs, stats = jax.vmap(run)(grouped, jax.random.split(key, domains))
  ungroup = lambda y: y.swapaxes(0, 1).reshape((b,) + y.shape[2:])
  return jax.tree.map(ungroup, outputs), jax.tree.map(lambda s: jnp.mean(s, axis=0), stats)


def group_domains(meta_config, group: str) -> int:
  return meta_config.meta_train_domains if group == "meta_train" else meta_config.meta_test_domains


def make_loss_fn(model, config, *, num_classes: int, axis_name: str | None = None):
  """The task loss of an episode group (DeepAll's: weighted CE + Dice + L2), with the forward
  pass of `apply_model`: loss_fn(params, batch_stats, batch, key, *, group) ->
  (loss, (metrics, new_batch_stats))."""
  m = config.meta

  def loss_fn(params, batch_stats, batch, key, *, group: str):
    logits, new_stats = apply_model(model, params, batch_stats, batch["image"], key,
                                    domains=group_domains(m, group), per_domain_bn=m.per_domain_bn)
    loss, metrics = segmentation_terms(logits, batch["label"], params, config.loss,
                                       num_classes=num_classes, axis_name=axis_name)
    return loss, (metrics, new_stats)

  return loss_fn


def make_episode(model, config, batch_stats, meta_train, meta_test, key_tr, key_te) -> dict:
  """The episode an `outer` sees: both groups, the BN statistics and `forward(params, group)` ->
  (logits, features), the train-mode pass at (adapted) params whose BN update is discarded."""
  m = config.meta
  keys = {"meta_train": key_tr, "meta_test": key_te}
  groups = {"meta_train": meta_train, "meta_test": meta_test}

  def forward(params, group):
    (logits, features), _ = apply_model(model, params, batch_stats, groups[group]["image"], keys[group],
                                        domains=group_domains(m, group), per_domain_bn=m.per_domain_bn,
                                        return_features=True)
    return logits, features

  return {"meta_train": meta_train, "meta_test": meta_test, "batch_stats": batch_stats,
          "forward": forward}


def meta_gradients(inner_loss, outer, params, phi, episode, *, meta_config, axis_name=None):
  """The two parts of ∇_θ F at the same θ, and ∂F/∂φ:
  (g_task, g_meta, g_phi, loss_inner, loss_outer, inner_metrics, outer_metrics, batch_stats).

  g_task = ∇_θ L_inner(θ) is meta.adapt's inner gradient (global with `axis_name`; not
  recomputed); g_meta = ∇_θ outer(θ'(θ), φ) differentiates through θ' (the Hessian term unless
  `first_order`) and is this device's part (average it over devices); g_task + g_meta = ∇_θ F.
  `inner_loss(params, batch) -> (loss, (metrics, batch_stats))` on episode["meta_train"]."""
  m = meta_config

  def objective(theta, phi):
    adapted, loss_inner, g_task, (inner_metrics, batch_stats) = meta.adapt(
        inner_loss, theta, episode["meta_train"], inner_lr=m.inner_lr, first_order=m.first_order,
        clip=inner_clip(m), has_aux=True, axis_name=axis_name)
    loss_outer, outer_metrics = outer(adapted, phi, episode)
    return loss_outer, (jax.lax.stop_gradient(g_task), loss_inner, inner_metrics, outer_metrics,
                        batch_stats)

  (loss_outer, (g_task, loss_inner, inner_metrics, outer_metrics, batch_stats)), (g_meta, g_phi) = (
      jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(params, phi))
  return g_task, g_meta, g_phi, loss_inner, loss_outer, inner_metrics, outer_metrics, batch_stats


def make_metric_step(outer, model, tx, config, *, num_classes: int, axis_name: str | None,
                     bn_sync: bool, metric_tx, task_tx=None):
  # φ is state.nets['metric'] (a NetState), updated by `metric_tx`.
  """The MASF/SAML step: `task_tx` None is 'summed' mode, else 'released' (module docstring)."""
  loss_fn = make_loss_fn(model, config, num_classes=num_classes, axis_name=axis_name)
  m = config.meta
  if (m.optimizers == "released") != (task_tx is not None):
    raise ValueError(f"config.meta.optimizers={m.optimizers!r} needs task_tx="
                     f"{'make_task_optimizer(config)' if task_tx is None else 'None'}")
  outer_clip = m.outer_clip if m.outer_clip > 0 else None

  def step(state, batch, key):
    key = fold_device(key, axis_name)
    augment_key, key_inner, key_tr, key_te = jax.random.split(key, 4)
    meta_train, meta_test = augment_episode(augment_key, batch, config)
    episode = make_episode(model, config, state.batch_stats, meta_train, meta_test, key_tr, key_te)
    inner_loss = lambda p, b: loss_fn(p, state.batch_stats, b, key_inner, group="meta_train")
    g_task, g_meta, g_phi, loss_inner, loss_outer, inner_metrics, outer_metrics, batch_stats = (
        meta_gradients(inner_loss, outer, state.params, state.nets["metric"].params, episode,
                       meta_config=m, axis_name=axis_name))
    if outer_clip is not None:
      if axis_name is not None:  # clip the global meta gradient, as on one device
        g_meta = jax.lax.pmean(g_meta, axis_name)
      g_meta = clip_tensors(g_meta, outer_clip)
    total = loss_inner + loss_outer
    # "loss" is the whole objective: the trainer's non-finite guard watches it.
    metrics = dict(inner_metrics, **outer_metrics, loss_inner=loss_inner, loss=total, loss_total=total)
    if task_tx is None:
      grads, task_grads = jax.tree.map(jnp.add, g_task, g_meta), None
    else:
      grads, task_grads = g_meta, g_task
    return finish_step(state, tx, grads, metrics, batch_stats, axis_name=axis_name, bn_sync=bn_sync,
                       task_tx=task_tx, task_grads=task_grads, net_grads={"metric": g_phi},
                       net_txs={"metric": metric_tx})

  return step


# --- The method interface of MLDG, MASF and SAML (methods/base.py) -------------------------------


def validate(config) -> None:
  groups = config.meta.meta_train_domains + config.meta.meta_test_domains
  if config.batch_size % groups:
    raise ValueError(f"config.batch_size: {config.batch_size} is not a multiple of the {groups} domains of "
                     "an episode (meta.meta_train_domains + meta.meta_test_domains)")
  if config.meta.outer_clip < 0 or config.meta.task_learning_rate < 0:
    raise ValueError("config.meta: outer_clip and task_learning_rate must be >= 0 (0: off / "
                     "optimizer.learning_rate)")


def label(name: str, config) -> str:
  base = name + (" (1st order)" if config.meta.first_order else "")
  return base + (" + BigAug" if config.augment.enabled else "")


def metric_network(config):
  """MASF/SAML's metric embedding M_φ and its optimizer (`<method>.metric_*`)."""
  block = config[config.method]
  return MetricNet(tuple(block.metric_features)), optax.adam(block.metric_lr)


def init_state(key, config, info, *, with_metric: bool):
  """θ (+ the task optimizer's state in 'released' mode) and, for MASF/SAML, φ (initialized from
  PRNGKey(seed + 7), an independent stream)."""
  state = deepall.init_state(key, config, info)
  task_tx = make_task_optimizer(config)
  if task_tx is not None:
    state = state.replace(task_opt_state=task_tx.init(state.params))
  if with_metric:
    metric_model, metric_tx = metric_network(config)
    phi = metric_model.init(jax.random.PRNGKey(config.seed + 7),
                            jnp.zeros((1, config.model.base_features)))["params"]
    state = state.replace(nets={"metric": init_net(phi, {}, metric_tx)})
  return state


def make_step(make_train_step, config, info):
  """A method's `make_train_step` with the networks and optimizers of the config."""
  metric_model, metric_tx = metric_network(config) if config.method in ("masf", "saml") else (None, None)
  return make_train_step(
      deepall.segmenter(config, info, train=True), make_optimizer(config.optimizer, num_steps=config.num_steps),
      config, num_classes=info.num_classes, axis_name=info.axis_name,
      bn_sync=deepall.bn_synced(config, info), metric_model=metric_model, metric_tx=metric_tx,
      task_tx=make_task_optimizer(config))
