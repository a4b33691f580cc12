"""A 'SAME' stride-1 NHWC convolution whose first *and second* derivatives stay standard convs.

Same math as `lax.conv_general_dilated`; only the derivative program differs. JAX derives the
weight gradient of a convolution as a convolution with the batch as its feature dimension. Taking
the gradient of that gradient (MLDG/MASF/SAML meta-gradients) produces convolutions in
non-canonical layouts (e.g. dim_labels 01fb_o01i->f01b) that XLA:CPU runs on a slow generic path:
in the second-order MLDG step they took ~75 % of the time. Here both derivatives are written out:

    y  = x ⋆ W                                   (forward)
    x̄  = ȳ ⋆ rot180(W)ᵀ                          (input gradient: a standard convolution)
    W̄  = weight_grad(x, ȳ)                       (XLA's own weight-gradient convolution)

and `weight_grad` has its own VJP made of two standard convolutions,
    d/dx ⟨V, weight_grad(x, ȳ)⟩ = ȳ ⋆ rot180(V)ᵀ,   d/dȳ ⟨V, weight_grad(x, ȳ)⟩ = x ⋆ V,
so reverse-over-reverse differentiation only ever meets canonical NHWC/HWIO convolutions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_DN = ("NHWC", "HWIO", "NHWC")


def _conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_DN)


def _input_grad(dy, w):
  """x̄ for y = x ⋆ w ('SAME', odd kernel): dy correlated with the flipped, in/out-swapped w."""
  return _conv(dy, jnp.swapaxes(w[::-1, ::-1], 2, 3))


@jax.custom_vjp
def weight_grad(x, dy, w_like):
  """W̄ = Σ_{b,h,w} x_pad[b, h+i, w+j, :] ⊗ dy[b, h, w, :] for kernel shape `w_like.shape`."""
  _, vjp = jax.vjp(lambda w: _conv(x, w), jnp.zeros_like(w_like))
  return vjp(dy)[0]


def _weight_grad_fwd(x, dy, w_like):
  return weight_grad(x, dy, w_like), (x, dy, w_like)


def _weight_grad_bwd(residuals, v):
  x, dy, w_like = residuals
  return _input_grad(dy, v), _conv(x, v), jnp.zeros_like(w_like)


weight_grad.defvjp(_weight_grad_fwd, _weight_grad_bwd)


@jax.custom_vjp
def conv_same(x, w):
  """NHWC ⋆ HWIO, stride 1, 'SAME' padding, odd kernel; derivatives as in the module docstring."""
  return _conv(x, w)


def _conv_fwd(x, w):
  return _conv(x, w), (x, w)


def _conv_bwd(residuals, dy):
  x, w = residuals
  return _input_grad(dy, w), weight_grad(x, dy, w)


conv_same.defvjp(_conv_fwd, _conv_bwd)
