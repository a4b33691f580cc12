"""A 'SAME' stride-1 NHWC convolution whose derivatives of every order stay standard convolutions.

Same math as `lax.conv_general_dilated(x, w, (1, 1), "SAME", ("NHWC", "HWIO", "NHWC"))`; only the
derivative program differs. JAX derives the weight gradient of a convolution as a convolution with
the batch as its feature dimension. Taking the gradient of that gradient (MLDG/MASF/SAML
meta-gradients) produces convolutions in non-canonical layouts (e.g. dim_labels
01fb_o01i->f01b) that XLA:CPU runs on a slow generic path: in the second-order MLDG step they
took ~75 % of the time. Here the derivatives are written out with two bilinear primitives,

    conv_same(x, W)        = x ⋆ W                       (forward: a standard convolution)
    weight_grad(x, ȳ)      = Σ_{b,h,w} x_pad[b, h+i, w+j, :] ⊗ ȳ[b, h, w, :]
                                                          (XLA's own weight-gradient convolution)

and their transposes (the adjoint of a bilinear map in each argument) are expressed again through
the same two primitives:

    x̄ of conv_same        = conv_same(ȳ, rot180(W)ᵀ)     (odd kernel: 'SAME' is symmetric)
    W̄ of conv_same        = weight_grad(x, ȳ)
    x̄ of ⟨V, weight_grad⟩  = conv_same(ȳ, rot180(V)ᵀ),   ȳ̄ of ⟨V, weight_grad⟩ = conv_same(x, V)

(rot180(W)ᵀ: both spatial axes reversed, input/output channels swapped). Because the set
{conv_same, weight_grad} is closed under transposition, reverse-over-reverse differentiation of
any order only ever meets canonical NHWC/HWIO convolutions and XLA's weight-gradient
convolution: MLDG's second-order step went from 2,132 ms to 786 ms on XLA:CPU (BENCHMARKS.md).

Why primitives and not `jax.custom_vjp` (the previous version): a custom_vjp function cannot be
differentiated in forward mode, so `jax.jvp`, `jax.jacfwd` and `jax.hessian` of any model using
these layers failed. A bilinear primitive gets its JVP from the product rule
(d(x ⋆ W) = dx ⋆ W + x ⋆ dW; `ad.defbilinear`, the way jax/_src/lax/convolution.py defines
`conv_general_dilated_p` itself), so forward mode, reverse mode and any composition of the two
work, with the same second-order program as before. (Attaching a transpose to an ordinary
function, `custom_transpose`, was only ever internal to JAX and is gone in jax 0.10.)

Both primitives lower, and run eagerly, through the lax functions `_lax_conv` and
`_lax_weight_grad`: forward values are exactly lax's. vmap works: a batch axis on one operand is
folded into the batch or a channel axis of the same primitive; on both operands (per-example
gradients) it falls back to vmap of the lax function, which is correct but whose own
derivatives are lax's again.

Only odd kernels: with an even kernel 'SAME' pads asymmetrically (one more zero after than
before), the transpose would need the padding mirrored, and `conv_same(ȳ, rot180(W)ᵀ)` would be
shifted by one pixel, i.e. silently wrong. `conv_same` and `weight_grad` raise instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

_DN = ("NHWC", "HWIO", "NHWC")


def _lax_conv(x, w):
  """The reference semantics: stride-1 'SAME' NHWC ⋆ HWIO cross-correlation (what nn.Conv runs)."""
  return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_DN)


def _lax_weight_grad(x, dy, *, kernel_hw):
  """W̄ of `_lax_conv` for an odd kernel of size `kernel_hw`: XLA's own weight-gradient
  convolution, written as JAX's transpose rule for lax.conv_general_dilated w.r.t. its kernel
  writes it (jax/_src/lax/convolution.py, _conv_general_dilated_transpose_rhs): the batch N
  becomes the contracted feature axis, x's channels the batch axis, and the 'SAME' padding
  ((k - 1) / 2 on both sides) turns an H x W correlation into a kh x kw result."""
  padding = [((k - 1) // 2, (k - 1) // 2) for k in kernel_hw]
  return lax.conv_general_dilated(x, dy, (1, 1), padding, dimension_numbers=("CHWN", "IHWO", "HWNC"))


def check_odd_kernel(kernel_shape) -> None:
  """Raises unless `kernel_shape` (HWIO) has odd spatial sizes (see the module docstring)."""
  if len(kernel_shape) != 4 or kernel_shape[0] % 2 == 0 or kernel_shape[1] % 2 == 0:
    raise ValueError(
        f"conv_same needs an HWIO kernel with odd spatial sizes, got kernel shape "
        f"{tuple(kernel_shape)}: with an even kernel 'SAME' padding is asymmetric and the "
        f"hand-written input gradient would be shifted by one pixel. Fix: use an odd kernel size "
        f"(1, 3, 5, ...), or flax.linen.Conv / lax.conv_general_dilated for an even one.")


conv_same_p = Primitive("conv_same")
weight_grad_p = Primitive("conv_same_weight_grad")


def _varying_axes(a) -> frozenset:
  return getattr(getattr(jax.typeof(a), "mat", None), "varying", frozenset())


def _vary_alike(a, b):
  """Inside `jax.shard_map(check_vma=True)`, marks both operands as varying over the union of
  their manual mesh axes, as lax does before its own binary ops (core.auto_insert_reshard): the
  transpose of that cast is a psum, so a replicated kernel's gradient is summed over devices
  (pmap runs shard_map with check_vma=False, where there is nothing to do)."""
  a_axes, b_axes = _varying_axes(a), _varying_axes(b)
  if b_axes - a_axes:
    a = lax.pcast(a, tuple(sorted(b_axes - a_axes)), to="varying")
  if a_axes - b_axes:
    b = lax.pcast(b, tuple(sorted(a_axes - b_axes)), to="varying")
  return a, b


def conv_same(x, w):
  """NHWC ⋆ HWIO, stride 1, 'SAME' padding, odd kernel, no bias: `_lax_conv(x, w)` whose
  derivatives of every order (forward and reverse mode) stay standard convolutions."""
  check_odd_kernel(jnp.shape(w))
  x, w = jnp.asarray(x), jnp.asarray(w)
  if x.ndim != 4 or x.shape[-1] != w.shape[2] or x.dtype != w.dtype:
    raise ValueError(f"conv_same needs x [N, H, W, C] and w [kh, kw, C, O] of one dtype, got "
                     f"x {x.shape} {x.dtype} and w {w.shape} {w.dtype}")
  return conv_same_p.bind(*_vary_alike(x, w))


def weight_grad(x, dy, kernel_hw):
  """W̄ = Σ_{b,h,w} x_pad[b, h+i, w+j, :] ⊗ dy[b, h, w, :] for a kernel of spatial size
  `kernel_hw` (odd): the kernel gradient of conv_same, itself differentiable to any order."""
  kernel_hw = tuple(int(k) for k in kernel_hw)
  x, dy = jnp.asarray(x), jnp.asarray(dy)
  check_odd_kernel(kernel_hw + (x.shape[-1], dy.shape[-1]))
  return weight_grad_p.bind(*_vary_alike(x, dy), kernel_hw=kernel_hw)


def _rot180_swap_io(w):
  return jnp.swapaxes(w[::-1, ::-1], 2, 3)


def _input_grad(dy, w):
  """x̄ for y = x ⋆ w ('SAME', odd kernel): dy correlated with the flipped, in/out-swapped w."""
  return conv_same(dy, _rot180_swap_io(w))


# Abstract evaluation: the output shape, with x's sharding and manual-axis type (x and the other
# operand carry the same ones after `_vary_alike`).
def _conv_same_abstract_eval(x, w):
  return x.update(shape=x.shape[:3] + (w.shape[3],), dtype=x.dtype, weak_type=False)


def _weight_grad_abstract_eval(x, dy, *, kernel_hw):
  return x.update(shape=kernel_hw + (x.shape[3], dy.shape[3]), dtype=x.dtype, weak_type=False)


conv_same_p.def_abstract_eval(_conv_same_abstract_eval)
weight_grad_p.def_abstract_eval(_weight_grad_abstract_eval)
conv_same_p.def_impl(_lax_conv)
weight_grad_p.def_impl(_lax_weight_grad)
mlir.register_lowering(conv_same_p, mlir.lower_fun(_lax_conv, multiple_results=False))
mlir.register_lowering(weight_grad_p, mlir.lower_fun(_lax_weight_grad, multiple_results=False))

# Transposes (the JVP of a bilinear primitive follows from them: d f(x, w) = f(dx, w) + f(x, dw)).
ad.defbilinear(
    conv_same_p,
    lambda dy, x, w: _input_grad(dy, w),
    lambda dy, x, w: weight_grad(x, dy, w.aval.shape[:2]))
ad.defbilinear(
    weight_grad_p,
    lambda v, x, dy, *, kernel_hw: _input_grad(dy, v),
    lambda v, x, dy, *, kernel_hw: conv_same(x, v))


def _fold_in(a, batch_dim, axis):
  """Moves vmap's axis `batch_dim` of `a` next to `axis` (before it) and merges the two."""
  a = jnp.moveaxis(a, batch_dim, axis)
  return a.reshape(a.shape[:axis] + (a.shape[axis] * a.shape[axis + 1],) + a.shape[axis + 2:])


def _split_out(a, axis, size):
  """Inverse of `_fold_in`: splits `axis` into (size, rest) and returns the array and the new
  position of the vmap axis."""
  return a.reshape(a.shape[:axis] + (size, a.shape[axis] // size) + a.shape[axis + 1:]), axis


def _conv_same_batch(args, dims):
  (x, w), (x_dim, w_dim) = args, dims
  if w_dim is None:   # images batched: one convolution over the merged batch
    size = x.shape[x_dim]
    return _split_out(conv_same(_fold_in(x, x_dim, 0), w), 0, size)
  if x_dim is None:   # kernels batched: one convolution with the kernels side by side on O
    size = w.shape[w_dim]
    return _split_out(conv_same(x, _fold_in(w, w_dim, 3)), 3, size)
  return jax.vmap(_lax_conv, (x_dim, w_dim))(x, w), 0


def _weight_grad_batch(args, dims, *, kernel_hw):
  (x, dy), (x_dim, dy_dim) = args, dims
  if dy_dim is None:  # W̄[..., c, o] only sees channel c of x: batch folded into C
    size = x.shape[x_dim]
    return _split_out(weight_grad(_fold_in(x, x_dim, 3), dy, kernel_hw), 2, size)
  if x_dim is None:   # ... and only channel o of ȳ: batch folded into O
    size = dy.shape[dy_dim]
    return _split_out(weight_grad(x, _fold_in(dy, dy_dim, 3), kernel_hw), 3, size)
  return jax.vmap(functools.partial(_lax_weight_grad, kernel_hw=kernel_hw), (x_dim, dy_dim))(x, dy), 0


batching.primitive_batchers[conv_same_p] = _conv_same_batch
batching.primitive_batchers[weight_grad_p] = _weight_grad_batch
