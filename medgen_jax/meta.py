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

BatchNorm in the inner loop (what medgen_jax's methods do, and why): every forward pass runs in
training mode and normalizes with the statistics of its own batch — the meta-train pass at θ with
the meta-train batch's, the meta-test pass at θ' with the meta-test batch's. So the adapted model
is evaluated on the unseen domain with that domain's own statistics, as in the TF1 code, which
called the network separately per domain. BN scale/offset are ordinary parameters and are adapted
like the others. The running averages kept for inference are updated from the meta-train pass at
θ only; the meta-test pass's update is discarded, so the held-out role of a domain never leaks
into the stored statistics through θ' (use `has_aux=True` to receive both and decide otherwise).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def clip_by_norm(g, max_norm: float):
  """tf.clip_by_norm on one tensor: g · max_norm / max(‖g‖₂, max_norm)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(g)))
  return g * (max_norm / jnp.maximum(norm, max_norm))


def inner_update(grads, params, *, inner_lr: float, clip: float | None = None):
  """θ' = θ − α · clip(g), clipping each tensor to norm `clip` (None: no clipping)."""
  if clip is not None:
    grads = jax.tree.map(lambda g: clip_by_norm(g, clip), grads)
  return jax.tree.map(lambda p, g: p - inner_lr * g, params, grads)


def adapt(loss_fn: Callable, params, batch, *, inner_lr: float, first_order: bool = False,
          clip: float | None = None, has_aux: bool = False, axis_name: str | None = None):
  """One inner step: returns (θ', L(θ), aux). With `axis_name` the inner gradient is averaged over
  the data-parallel axis, i.e. it is the gradient on the global batch."""
  if has_aux:
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
  else:
    (loss, grads), aux = jax.value_and_grad(loss_fn)(params, batch), None
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
  if first_order:
    grads = jax.lax.stop_gradient(grads)
  return inner_update(grads, params, inner_lr=inner_lr, clip=clip), loss, aux


def mldg_objective(loss_fn: Callable, params, meta_train, meta_test, *, inner_lr: float,
                   beta: float = 1.0, first_order: bool = False, clip: float | None = None,
                   has_aux: bool = False, axis_name: str | None = None):
  """L_tr(θ) + β · L_te(θ'), θ' = inner_update(∇L_tr(θ)). Differentiate it with jax.grad.

  `loss_fn(params, batch)` returns a scalar, or `(scalar, aux)` with `has_aux=True`, in which case
  this returns `(objective, {'meta_train': aux_tr, 'meta_test': aux_te, 'loss_meta_train': L_tr,
  'loss_meta_test': L_te})`. `axis_name`: see `adapt`.
  """
  adapted, loss_tr, aux_tr = adapt(loss_fn, params, meta_train, inner_lr=inner_lr,
                                   first_order=first_order, clip=clip, has_aux=has_aux,
                                   axis_name=axis_name)
  if has_aux:
    loss_te, aux_te = loss_fn(adapted, meta_test)
    return loss_tr + beta * loss_te, {"meta_train": aux_tr, "meta_test": aux_te,
                                      "loss_meta_train": loss_tr, "loss_meta_test": loss_te}
  loss_te = loss_fn(adapted, meta_test)
  return loss_tr + beta * loss_te
