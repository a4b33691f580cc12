"""MLDG (Li et al., AAAI 2018) for segmentation: episodic meta-learning on source sites.

Each step the episodic sampler splits the source sites into meta-train and meta-test groups;
the objective is meta.mldg_objective with the DeepAll task loss (weighted CE + Dice + L2):

    F(θ) = L(θ; D_tr) + β · L(θ − α·clip(∇L(θ; D_tr)); D_te)

differentiated exactly (second order) by nested jax.grad, or first order with
`meta.first_order=True`, and applied by one optimizer (MLDG's code has no separate task
optimizer: `meta.optimizers` must be 'summed'). BatchNorm: see medgen_jax/meta.py (each pass uses
its own batch statistics, per domain with `meta.per_domain_bn`; running statistics are updated
from the meta-train pass at θ only). L(θ; D_tr) is one loss over the pooled, domain-interleaved
meta-train batch, i.e. a mean over its domains; MLDG's code sums the meta-train domains' losses,
which scales L_tr and the inner step by the number of meta-train domains.
"""

from __future__ import annotations


import jax

from medgen_jax import meta
from medgen_jax.methods import deepall, episodic
from medgen_jax.methods.deepall import finish_step
from medgen_jax.methods.episodic import augment_episode, inner_clip, make_loss_fn

LABEL = "MLDG"
SAMPLER = episodic.SAMPLER
validate = episodic.validate
eval_network = deepall.eval_network


def init_state(key, config, info):
  return episodic.init_state(key, config, info, with_metric=False)


def make_step(config, info):
  return episodic.make_step(make_train_step, config, info)


def label(config, sources):
  return episodic.label(LABEL, config)


def make_train_step(model, tx, config, *, num_classes: int, axis_name: str | None = None,
                    bn_sync: bool = True, **unused):
  seg_loss = make_loss_fn(model, config, num_classes=num_classes, axis_name=axis_name)
  m = config.meta

  def step(state, batch, key):
    if axis_name is not None:
      key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    augment_key, key_tr, key_te = jax.random.split(key, 3)
    meta_train, meta_test = augment_episode(augment_key, batch, config)

    def loss_fn(params, episode):
      return seg_loss(params, state.batch_stats, episode["batch"], episode["key"],
                      group=episode["group"])

    def objective(params):
      return meta.mldg_objective(loss_fn, params,
                                 {"batch": meta_train, "key": key_tr, "group": "meta_train"},
                                 {"batch": meta_test, "key": key_te, "group": "meta_test"},
                                 inner_lr=m.inner_lr, beta=m.beta, first_order=m.first_order,
                                 clip=inner_clip(m), has_aux=True, axis_name=axis_name)

    (value, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    metrics_tr, batch_stats = aux["meta_train"]
    metrics_te, _ = aux["meta_test"]
    metrics = dict(metrics_tr, loss=value, loss_meta_train=aux["loss_meta_train"],
                   loss_meta_test=aux["loss_meta_test"], dice_meta_test=metrics_te["dice"][1:].mean())
    return finish_step(state, tx, grads, metrics, batch_stats, axis_name=axis_name, bn_sync=bn_sync)

  return step
