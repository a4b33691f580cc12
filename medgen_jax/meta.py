"""Gradient-based meta-learning for domain generalization: exact nested `jax.grad`.

Episodic training (MLDG, Li et al., AAAI 2018; MAML, Finn et al., ICML 2017): each step splits
the source domains into meta-train D_tr and meta-test D_te, takes one inner gradient step on
D_tr and asks the adapted parameters to do well on D_te:

    θ' = θ − α · clip(∇_θ L_tr(θ))                                  (inner_update)
    F(θ) = L_tr(θ) + β · L_te(θ')                                   (mldg_objective)

`jax.grad(mldg_objective)` is the exact second-order meta-gradient

    ∇F = g_tr + β · (I − α · H_tr) · g_te,   g_tr = ∇L_tr(θ), g_te = ∇L_te(θ'), H_tr = ∇²L_tr(θ)

(without clipping); `first_order=True` stops the gradient through the inner gradient, dropping
exactly the Hessian term: ∇F = g_tr + β · g_te. Clipping is per tensor, `tf.clip_by_norm`
semantics (g · c / max(‖g‖, c)), as in the MASF and SAML code — not optax's global-norm clipping.

Everything here works for any params pytree and any `loss_fn(params, batch)`: no medgen_jax model
is involved.

Data parallelism: with `axis_name` the inner gradient is averaged over the data-parallel axis
(the global batch's), and batch-level sums inside the losses are `losses.global_sum` (a sum of an
`all_gather`), whose derivatives of every order are the global batch's. So the second-order
meta-gradient of a pmapped step on N devices equals the one-device one on the same global batch
(to float32 round-off; tests/test_meta_methods.py checks it against the Hessian term's size).

BatchNorm policy (what medgen_jax's methods do). Every forward pass runs in training mode and
normalizes with the statistics of its own batch: the meta-train pass at θ with the meta-train
batch's, the meta-test pass(es) at θ' with the meta-test batch's. By default the meta-train
domains share ONE BN batch: the meta-train batch (its domains interleaved) goes through the
network in one forward pass, so BN normalizes them with their joint statistics. The TF1 code of
MASF and SAML called the network once per domain batch instead, i.e. BN statistics per domain
(methods.md §1.8). `meta.per_domain_bn=True` does that here (methods/episodic.py `apply_model`):
each group's forward pass vmaps the network over its domains, so BatchNorm normalizes every
domain with its own statistics (synchronized over devices per domain under pmap); the running
averages are then updated with the mean over domains of the per-domain statistics. BN scale and
offset are ordinary parameters and are adapted like the others (SAML's code adapts only its
`weights` dict, the conv/deconv kernels and biases, and has no BN scale; MLDG's adapts everything). The running averages kept for
inference are updated from the meta-train pass at θ only; the passes at θ' discard theirs, so the
held-out role of a domain never leaks into the stored statistics through θ' (use `has_aux=True`
to receive both and decide otherwise).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def clip_by_norm(g, max_norm: float):
  """tf.clip_by_norm on one tensor: g · max_norm / max(‖g‖₂, max_norm).

  The norm's square root is taken only where Σg² > 0 (TF's two-`where` trick): at g = 0 the
  derivative of sqrt is infinite, and a zero inner gradient would otherwise make the second-order
  meta-gradient NaN."""
  squared = jnp.sum(jnp.square(g))
  positive = squared > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)
  return g * (max_norm / jnp.maximum(norm, max_norm))


def inner_update(grads, params, *, inner_lr: float, clip: float | None = None):
  """θ' = θ − α · clip(g), clipping each tensor to norm `clip` (None: no clipping)."""
  if clip is not None:
    grads = jax.tree.map(lambda g: clip_by_norm(g, clip), grads)
  return jax.tree.map(lambda p, g: p - inner_lr * g, params, grads)


def adapt(loss_fn: Callable, params, batch, *, inner_lr: float, first_order: bool = False,
          clip: float | None = None, has_aux: bool = False, axis_name: str | None = None):
  """One inner step: returns (θ', L(θ), g, aux) with g = ∇_θ L(θ), the inner gradient before
  clipping (the task gradient of MASF/SAML's task optimizer; differentiable unless
  `first_order`, so a caller that returns it as a value should stop its gradient). With
  `axis_name` g is averaged over the data-parallel axis, i.e. it is the global batch's gradient."""
  if has_aux:
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
  else:
    (loss, grads), aux = jax.value_and_grad(loss_fn)(params, batch), None
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
  if first_order:
    grads = jax.lax.stop_gradient(grads)
  return inner_update(grads, params, inner_lr=inner_lr, clip=clip), loss, grads, aux


def mldg_objective(loss_fn: Callable, params, meta_train, meta_test, *, inner_lr: float,
                   beta: float = 1.0, first_order: bool = False, clip: float | None = None,
                   has_aux: bool = False, axis_name: str | None = None):
  """L_tr(θ) + β · L_te(θ'), θ' = inner_update(∇L_tr(θ)). Differentiate it with jax.grad.

  `loss_fn(params, batch)` returns a scalar, or `(scalar, aux)` with `has_aux=True`, in which case
  this returns `(objective, {'meta_train': aux_tr, 'meta_test': aux_te, 'loss_meta_train': L_tr,
  'loss_meta_test': L_te})`. `axis_name`: see `adapt`.
  """
  adapted, loss_tr, _, aux_tr = adapt(loss_fn, params, meta_train, inner_lr=inner_lr,
                                      first_order=first_order, clip=clip, has_aux=has_aux,
                                      axis_name=axis_name)
  if has_aux:
    loss_te, aux_te = loss_fn(adapted, meta_test)
    return loss_tr + beta * loss_te, {"meta_train": aux_tr, "meta_test": aux_te,
                                      "loss_meta_train": loss_tr, "loss_meta_test": loss_te}
  loss_te = loss_fn(adapted, meta_test)
  return loss_tr + beta * loss_te
