"""The fast layers (models/ops.conv_same, models/unet.UpConv2x2 / max_pool_2x2 / the Dense head)
against independently written lax / flax reference layers: values, first derivatives, second
derivatives (reverse over reverse, as MLDG/MASF/SAML take them), forward mode (jax.jvp,
jax.hessian), vmap, shard_map, bf16.

Exact-math comparisons run in float64 (`jax.enable_x64`), where the two programs agree to
rounding (1e-10); bf16 inputs are compared with a float32 reference on the same (bf16-rounded)
numbers, within bf16's resolution (8 significant bits: 2^-8 ≈ 0.4 % relative per rounding).
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from medgen_jax.models.ops import conv_same, weight_grad
from medgen_jax.models.unet import ConvSame, UNet, UpConv2x2, max_pool_2x2

F64_TOL = dict(rtol=1e-10, atol=1e-10)


def quick_jit(f):
  """jax.jit without XLA:CPU's backend (LLVM) optimizations: the tiny test programs compile about
  twice as fast; the HLO, and so the math compared here, is the same."""
  return jax.jit(f, compiler_options={"xla_backend_optimization_level": 0})


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def normal(seed, shape, dtype=jnp.float64):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)


def random_params(module, x, dtype=jnp.float64, seed=0):
  """Random values (biases non-zero too) in the shapes of `module.init`, without running init
  (an XLA compile of the whole forward pass: seconds for a U-Net)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(0.0, 0.5, p.shape), dtype), shapes)


def reference_conv(x, w):
  """Stride-1 'SAME' NHWC ⋆ HWIO cross-correlation straight from lax."""
  return lax.conv_general_dilated(x, w, window_strides=(1, 1), padding="SAME",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def assert_trees_close(actual, expected, **tol):
  jax.tree.map(lambda a, e: np.testing.assert_allclose(np.asarray(a, np.float64),
                                                       np.asarray(e, np.float64), **tol),
               actual, expected)


def scalar_loss(f):
  """A nonlinear scalar of f's output, so that second derivatives are not trivially zero
  (computed in at least float32: bf16 tests then measure the layer's rounding, not the loss's)."""
  def loss(*args):
    y = f(*args)
    y = y.astype(jnp.promote_types(y.dtype, jnp.float32))
    return jnp.sum(jnp.sin(y) * jnp.cos(0.5 * y + 0.1))
  return loss


def gradient_loss(f):
  """A scalar function of the gradient of `scalar_loss(f)` (the shape of a meta-gradient):
  its gradient is a second derivative of f."""
  def loss(*args):
    grads = jax.grad(scalar_loss(f), argnums=tuple(range(len(args))))(*args)
    grads = [g.astype(jnp.promote_types(g.dtype, jnp.float32)) for g in jax.tree.leaves(grads)]
    return sum(jnp.sum(jnp.tanh(g) * (1.0 + 0.1 * k)) for k, g in enumerate(grads))
  return loss


def derivatives(f, *args):
  """Value, gradient, reverse-over-reverse gradient, and a forward-over-reverse Hessian-vector
  product of f at args (all arguments, arrays or pytrees, differentiated); one jit (op-by-op
  dispatch would compile every primitive for every shape)."""
  return quick_jit(lambda *args: _derivatives(f, *args))(*args)


def _derivatives(f, *args):
  argnums = tuple(range(len(args)))
  directions = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size, dtype=a.dtype)).reshape(a.shape), args)
  grad = jax.grad(scalar_loss(f), argnums)
  _, hvp = jax.jvp(lambda *a: grad(*a), args, directions)
  return {"value": f(*args), "grad": grad(*args),
          "grad_of_grad": jax.grad(gradient_loss(f), argnums)(*args), "hvp": hvp}


def assert_bfloat16_matches_float32(fast, reference, *args):
  """`derivatives` of `fast` on bf16 `args` (float32 parameters stay float32) against those of
  `reference` on the same numbers in float32: within 5 % of the largest reference entry. bf16
  keeps 8 significant bits (0.4 % per rounding) and a gradient sums many rounded terms (up to
  2.4 % seen on a bias gradient); a wrong kernel orientation or window is off by O(100 %)."""
  fast_derivatives = derivatives(fast, *args)
  assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(fast_derivatives["value"]))
  reference_derivatives = derivatives(reference, *jax.tree.map(lambda a: a.astype(jnp.float32), args))
  jax.tree.map(lambda a, e: np.testing.assert_allclose(
      np.asarray(a, np.float32), e, rtol=0, atol=0.05 * float(np.max(np.abs(e)))),
      fast_derivatives, reference_derivatives)


# --- conv_same ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel_shape", [(2, 2, 1, 1), (4, 4, 3, 2), (3, 2, 1, 1), (2, 5, 2, 2)])
def test_conv_same_rejects_even_kernels(kernel_shape):
  x = jnp.zeros((1, 5, 5, kernel_shape[2]))
  with pytest.raises(ValueError, match=re.escape(f"{kernel_shape}") + ".*Fix: use an odd kernel"):
    conv_same(x, jnp.zeros(kernel_shape))


def test_weight_grad_rejects_even_kernels():
  with pytest.raises(ValueError, match=r"kernel shape \(3, 2, 1, 2\)"):
    weight_grad(jnp.zeros((1, 5, 5, 1)), jnp.zeros((1, 5, 5, 2)), (3, 2))


def test_conv_same_module_rejects_even_kernel_size():
  with pytest.raises(ValueError, match=r"kernel shape \(4, 4, 1, 3\)"):
    ConvSame(3, kernel_size=4).init(jax.random.PRNGKey(0), jnp.zeros((1, 5, 5, 1)))


@pytest.mark.parametrize("kernel_hw", [(1, 1), (3, 3), (5, 5), (5, 3)])
@pytest.mark.parametrize("channels", [(1, 2), (3, 4)])
def test_conv_same_matches_lax_to_second_order(x64, kernel_hw, channels):
  x = normal(0, (2, 7, 5, channels[0]))
  w = normal(1, kernel_hw + channels)
  assert_trees_close(derivatives(conv_same, x, w), derivatives(reference_conv, x, w), **F64_TOL)


def test_conv_same_forward_mode_hessian_matches_lax(x64):
  """jax.hessian (= jacfwd of jacrev) w.r.t. image and kernel together."""
  x, w = normal(0, (1, 3, 5, 2)), normal(1, (3, 3, 2, 2))
  hessian = lambda conv: quick_jit(jax.hessian(scalar_loss(conv), (0, 1)))(x, w)
  assert_trees_close(hessian(conv_same), hessian(reference_conv), **F64_TOL)


def test_conv_same_third_order_matches_lax(x64):
  """The derivative primitives are closed under transposition, so every order works."""
  x, w = normal(0, (1, 5, 3, 2)), normal(1, (3, 3, 2, 3))
  third = lambda conv: quick_jit(jax.grad(
      lambda w: jnp.sum(jax.grad(gradient_loss(conv), 1)(x, w) ** 2)))(w)
  np.testing.assert_allclose(third(conv_same), third(reference_conv), rtol=1e-9, atol=1e-9)


VMAP_TRANSFORMS = {
    "vmap": lambda f, in_axes: jax.vmap(f, in_axes),
    "vmap_of_second_order": lambda f, in_axes: jax.vmap(jax.grad(gradient_loss(f), (0, 1)), in_axes),
    "grad_of_vmap": lambda f, in_axes: jax.grad(
        lambda x, w: jnp.sum(jax.vmap(f, in_axes)(x, w) ** 3), (0, 1)),
}


@pytest.mark.parametrize("transform", VMAP_TRANSFORMS)
@pytest.mark.parametrize("in_axes", [(0, None), (None, 0), (0, 0), (2, 4)])
def test_conv_same_vmap_matches_lax(x64, in_axes, transform):
  xs, ws = normal(0, (3, 2, 5, 3, 2)), normal(1, (3, 3, 3, 2, 4))
  xs = jnp.moveaxis(xs, 0, in_axes[0]) if in_axes[0] is not None else xs[0]
  ws = jnp.moveaxis(ws, 0, in_axes[1]) if in_axes[1] is not None else ws[0]
  transform = VMAP_TRANSFORMS[transform]
  assert_trees_close(quick_jit(transform(conv_same, in_axes))(xs, ws),
                     quick_jit(transform(reference_conv, in_axes))(xs, ws), **F64_TOL)


@pytest.mark.parametrize("in_axes", [None, (0, None), (None, 0), (0, 0), (3, 1)])
def test_weight_grad_is_the_kernel_cotangent_of_lax_conv(x64, in_axes):
  """ops.weight_grad (plain and under vmap, whose batching rules fold a batched operand into a
  channel axis) is the transpose of w -> reference_conv(x, w)."""
  xs, dys = normal(0, (3, 2, 5, 3, 2)), normal(1, (3, 2, 5, 3, 4))

  def reference(x, dy):
    kernel = jax.ShapeDtypeStruct((5, 3, 2, 4), x.dtype)
    return jax.linear_transpose(lambda w: reference_conv(x, w), kernel)(dy)[0]

  fast = lambda x, dy: weight_grad(x, dy, (5, 3))
  if in_axes is None:
    xs, dys = xs[0], dys[0]
  else:
    xs = jnp.moveaxis(xs, 0, in_axes[0]) if in_axes[0] is not None else xs[0]
    dys = jnp.moveaxis(dys, 0, in_axes[1]) if in_axes[1] is not None else dys[0]
    fast, reference = jax.vmap(fast, in_axes), jax.vmap(reference, in_axes)
  np.testing.assert_allclose(quick_jit(fast)(xs, dys), quick_jit(reference)(xs, dys), **F64_TOL)


def test_conv_same_second_order_program_has_only_canonical_convolutions():
  """The point of conv_same: XLA:CPU sees no convolution in a non-canonical layout (the slow
  generic path) in a gradient of a gradient. The lax program does have one (e.g. 01fb_o01i->f01b),
  which is what this test is able to see."""
  x, w = normal(0, (2, 8, 8, 3), jnp.float32), normal(1, (3, 3, 3, 4), jnp.float32)

  def conv_layouts(conv):
    hlo = jax.jit(jax.grad(gradient_loss(conv), (0, 1))).lower(x, w).compile().as_text()
    return set(re.findall(r"dim_labels=([\w>-]+)", hlo))

  assert conv_layouts(reference_conv) - {"b01f_01io->b01f"}, "the check would not see a slow layout"
  assert conv_layouts(conv_same) == {"b01f_01io->b01f"}


def test_conv_same_gradients_under_shard_map_with_vma_checks():
  """shard_map(check_vma=True): a replicated kernel's gradient is summed over devices (pmap runs
  with check_vma=False; DataParallel is covered by the trainer tests)."""
  if jax.device_count() < 2:
    pytest.skip("needs 2 devices (tests/conftest.py fakes 4 CPU devices)")
  mesh = jax.make_mesh((2,), ("data",))
  x = jax.device_put(normal(0, (4, 5, 3, 2), jnp.float32), NamedSharding(mesh, P("data")))
  w = normal(1, (3, 3, 2, 3), jnp.float32)

  def sharded_grads(conv):
    per_device = lambda x, w: jax.grad(gradient_loss(conv), (0, 1))(x, w)
    return quick_jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"), P()),
                                   out_specs=(P("data"), P())))(x, w)

  assert_trees_close(sharded_grads(conv_same), sharded_grads(reference_conv), rtol=1e-5, atol=1e-5)


def test_conv_same_bfloat16_matches_float32_reference():
  x, w = normal(0, (2, 7, 5, 3), jnp.float32), normal(1, (3, 3, 3, 4), jnp.float32)
  assert_bfloat16_matches_float32(conv_same, reference_conv, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))


def test_conv_same_module_is_nn_conv(x64):
  x = normal(0, (2, 7, 5, 3))
  conv = nn.Conv(4, (3, 3), padding="SAME", use_bias=False, param_dtype=jnp.float64)
  params = random_params(conv, x)
  fast = lambda params, x: ConvSame(4, dtype=jnp.float64).apply(params, x)
  assert_trees_close(derivatives(fast, params, x), derivatives(conv.apply, params, x), **F64_TOL)


# --- UpConv2x2, max_pool_2x2, the Dense head ----------------------------------------------------

@pytest.mark.parametrize("shape,features", [((2, 3, 5, 1), 2), ((1, 4, 4, 3), 5)])
def test_upconv_is_nn_conv_transpose_with_the_same_kernel(x64, shape, features):
  """Exactly nn.ConvTranspose(features, (2, 2), strides=(2, 2)) with the same parameters (no
  kernel flip between the two any more)."""
  x = normal(0, shape)
  reference = nn.ConvTranspose(features, (2, 2), strides=(2, 2), param_dtype=jnp.float64)
  params = random_params(reference, x)
  fast = lambda params, x: UpConv2x2(features, jnp.float64).apply(params, x)
  assert_trees_close(derivatives(fast, params, x), derivatives(reference.apply, params, x), **F64_TOL)


def test_upconv_bfloat16_matches_float32_reference():
  x = normal(0, (2, 3, 5, 4), jnp.float32).astype(jnp.bfloat16)
  reference = nn.ConvTranspose(3, (2, 2), strides=(2, 2))
  fast = lambda params, x: UpConv2x2(3, jnp.bfloat16).apply(params, x)
  assert_bfloat16_matches_float32(fast, reference.apply, random_params(reference, x, jnp.float32), x)


@pytest.mark.parametrize("shape", [(2, 6, 4, 3), (1, 7, 5, 2), (3, 2, 2, 1)])
def test_max_pool_is_nn_max_pool(x64, shape):
  x = normal(0, shape)   # continuous values: no ties
  reference = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
  assert_trees_close(derivatives(max_pool_2x2, x), derivatives(reference, x), **F64_TOL)


def test_max_pool_ties_route_the_gradient_like_nn_max_pool():
  # Windows with tied maxima (as bf16 and ReLU produce): the whole gradient goes to one element,
  # the same one as nn.max_pool's, not split between the tied ones.
  x = jnp.array([[1., 1., 0., 2.], [0., 1., 2., 2.]])[None, :, :, None]
  grad = lambda pool: jax.grad(lambda x: jnp.sum(pool(x) * jnp.array([3., 5.])[None, None, :, None]))(x)
  np.testing.assert_array_equal(grad(max_pool_2x2), grad(lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))))
  assert float(jnp.max(grad(max_pool_2x2))) == 5.0  # not 5/3 or 5/2


def test_unet_gradient_has_no_nan_behind_a_norm_layer_at_xla_o0():
  # JAX's gradient of `max` (g·[x == max]/count) was 0/0 = NaN here: XLA:CPU at -O0 recomputed
  # the normalized pool input with other rounding than the max had seen.
  from medgen_jax.models.unet import UNet
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 8, 1)), jnp.float32)
  model = UNet(num_classes=2, base_features=2, depth=1, norm="instance")
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda p: jnp.asarray(rng.normal(0, 0.5, p.shape), jnp.float32),
                           jax.eval_shape(model.init, jax.random.PRNGKey(0), x))
  loss = lambda v: jnp.sum(jnp.sin(model.apply(v, x, train=True)))
  grads = quick_jit(jax.grad(loss))(variables)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_max_pool_bfloat16_matches_float32_reference():
  x = normal(0, (2, 6, 4, 3), jnp.float32).astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(max_pool_2x2(x), np.float32),   # a max rounds nothing
                                nn.max_pool(x.astype(jnp.float32), (2, 2), strides=(2, 2)))
  assert_bfloat16_matches_float32(max_pool_2x2, lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)), x)


def as_1x1_conv(dense_params):
  """nn.Dense parameters as nn.Conv(features, (1, 1)) parameters: kernel [C, K] -> [1, 1, C, K]."""
  return {"params": {"kernel": dense_params["params"]["kernel"][None, None],
                     "bias": dense_params["params"]["bias"]}}


@pytest.mark.parametrize("channels,classes", [(1, 2), (4, 3)])
def test_dense_head_is_a_1x1_conv(x64, channels, classes):
  x = normal(0, (2, 3, 5, channels))
  head = nn.Dense(classes, param_dtype=jnp.float64)
  reference = nn.Conv(classes, (1, 1), param_dtype=jnp.float64)
  params = random_params(head, x)
  assert_trees_close(derivatives(head.apply, params, x),
                     derivatives(lambda p, x: reference.apply(as_1x1_conv(p), x), params, x), **F64_TOL)


def test_dense_head_bfloat16_matches_float32_reference():
  x = normal(0, (2, 3, 5, 4), jnp.float32).astype(jnp.bfloat16)
  head = nn.Dense(3, dtype=jnp.bfloat16, param_dtype=jnp.float32)   # as in UNet
  reference = lambda params, x: nn.Conv(3, (1, 1)).apply(as_1x1_conv(params), x)
  assert_bfloat16_matches_float32(head.apply, reference, random_params(head, x, jnp.float32), x)


# --- the whole U-Net ----------------------------------------------------------------------------

def unet_pair(x):
  """(apply_fast, apply_plain, params, plain_params, as_plain): fast_ops=True and False with the
  same parameters (the head kernel reshaped [C, K] -> [1, 1, C, K]), computed in float64 (the
  model rounds its logits to float32, hence the float32-level tolerance below)."""
  kwargs = dict(num_classes=2, base_features=2, depth=1, norm="none", dtype=jnp.float64)
  fast, plain = UNet(**kwargs, fast_ops=True), UNet(**kwargs, fast_ops=False)
  params = random_params(fast, x)
  as_plain = lambda tree: {"params": {**tree["params"], "head": {
      **tree["params"]["head"], "kernel": tree["params"]["head"]["kernel"][None, None]}}}
  assert (jax.tree.map(jnp.shape, as_plain(params))
          == jax.tree.map(jnp.shape, jax.eval_shape(plain.init, jax.random.PRNGKey(0), x)))
  return fast.apply, plain.apply, params, as_plain(params), as_plain


UNET_TOL = dict(rtol=1e-6, atol=1e-6)


def test_unet_fast_ops_computes_the_plain_flax_unet_to_second_order(x64):
  """Values and the reverse-over-reverse gradient w.r.t. parameters and image, as a
  meta-gradient takes it (one program per variant: XLA compiles take seconds here)."""
  x = normal(0, (1, 4, 6, 1))
  apply_fast, apply_plain, params, _, as_plain = unet_pair(x)
  apply_plain_fast_params = lambda p, x: apply_plain(as_plain(p), x)
  outputs = lambda f: quick_jit(lambda p, x: (f(p, x), jax.grad(gradient_loss(f), (0, 1))(p, x)))(params, x)
  assert_trees_close(outputs(apply_fast), outputs(apply_plain_fast_params), **UNET_TOL)


def test_unet_fast_ops_supports_forward_mode(x64):
  """jax.hessian (jacfwd over jacrev, vmapped) w.r.t. the image and jax.jvp w.r.t. the
  parameters, equal to the plain flax U-Net's."""
  x = normal(0, (1, 4, 6, 1))
  apply_fast, apply_plain, params, plain_params, as_plain = unet_pair(x)
  hessian = lambda apply, params: quick_jit(jax.hessian(scalar_loss(lambda x: apply(params, x))))(x)
  assert_trees_close(hessian(apply_fast, params), hessian(apply_plain, plain_params), **UNET_TOL)
  tangent = jax.tree.map(jnp.cos, params)
  jvp = lambda apply, params, tangent: quick_jit(
      lambda p, t: jax.jvp(lambda p: apply(p, x), (p,), (t,)))(params, tangent)
  assert_trees_close(jvp(apply_fast, params, tangent), jvp(apply_plain, plain_params, as_plain(tangent)),
                     **UNET_TOL)
