"""models/unet3d.py: the fast layers against flax's own, the U-Net's shapes and anisotropic
pooling, nnU-Net's pooling plan on hand-derived cases, registration through make_model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from medgen_jax.models.unet import max_pool_2x2
from medgen_jax.models.unet3d import UNet3D, UpConv, max_pool, plan_pooling
from medgen_jax.train_state import make_model

RNG = np.random.default_rng(0)


def test_upconv_equals_flax_conv_transpose():
  x = jnp.asarray(RNG.normal(size=(2, 3, 4, 5, 3)), jnp.float32)
  for strides in [(2, 2, 2), (1, 2, 2)]:
    ours, flax_layer = UpConv(4, strides), nn.ConvTranspose(4, strides, strides=strides)
    params = jax.eval_shape(ours.init, jax.random.PRNGKey(0), x)
    assert jax.eval_shape(flax_layer.init, jax.random.PRNGKey(0), x) == params
    params = jax.tree.map(lambda p: jnp.asarray(RNG.normal(size=p.shape), jnp.float32), params)  # non-zero bias
    got, want = jax.jit(lambda p, v: (ours.apply(p, v), flax_layer.apply(p, v)))(params, x)
    assert got.shape == (2, 3 * strides[0], 4 * strides[1], 5 * strides[2], 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_max_pool_equals_flax_max_pool_values_and_gradient():
  for window, shape in [((2, 2, 2), (2, 4, 6, 8, 3)), ((1, 2, 2), (2, 3, 5, 4, 2))]:  # odd: remainder dropped
    x = jnp.asarray(RNG.integers(0, 3, size=shape), jnp.float32)   # many ties
    cot = jnp.asarray(RNG.normal(size=nn.max_pool(x, window, strides=window).shape), jnp.float32)

    @jax.jit
    def values_and_grads(v):
      ours, flax_pool = (lambda u: max_pool(u, window)), (lambda u: nn.max_pool(u, window, strides=window))
      grad = lambda f: jax.grad(lambda u: jnp.sum(f(u) * cot))(v)
      return ours(v), flax_pool(v), grad(ours), grad(flax_pool)
    ours, theirs, ours_grad, their_grad = values_and_grads(x)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(ours_grad, their_grad)


def test_max_pool_in_2d_is_the_2d_u_nets():
  x = jnp.asarray(RNG.normal(size=(2, 6, 5, 3)), jnp.float32)
  np.testing.assert_array_equal(max_pool(x, (2, 2)), max_pool_2x2(x))


def test_plan_pooling_follows_nnunets_rule():
  # Isotropic: every axis pooled at every level, 3x3x3 kernels.
  assert plan_pooling((32, 32, 32), (1.0, 1.0, 1.0), 3) == (((2, 2, 2),) * 3, ((3, 3, 3),) * 4)
  # Thick slices (3 mm vs 1 mm): the slice axis waits until the in-plane spacing reaches 2 mm
  # (ratio 3/2 < 2 at level 1), and its kernel is 1 until then.
  pools, kernels = plan_pooling((16, 64, 64), (3.0, 1.0, 1.0), 3)
  assert pools == ((1, 2, 2), (2, 2, 2), (2, 2, 2))
  assert kernels == ((1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3))
  # An axis too short to pool (8 < 2 * 8) stays unpooled; no poolable axis at all is an error.
  assert plan_pooling((8, 32, 32), (1.0, 1.0, 1.0), 1, min_feature_map=8)[0] == ((1, 2, 2),)
  with pytest.raises(ValueError, match="cannot be pooled 3 times"):
    plan_pooling((8, 8, 8), (1.0, 1.0, 1.0), 3)


@pytest.fixture(scope="module")
def anisotropic():
  model = UNet3D(num_classes=3, base_features=4, depth=2, pool_sizes=((1, 2, 2), (2, 2, 2)),
                 kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3)))
  x = jnp.asarray(RNG.normal(size=(2, 4, 16, 16, 1)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  return model, variables, x


def test_unet3d_shapes_names_and_anisotropic_levels(anisotropic):
  model, variables, x = anisotropic
  logits, levels = jax.jit(lambda v, u: model.apply(v, u, return_levels=True))(variables, x)
  assert logits.shape == (2, 4, 16, 16, 3) and logits.dtype == jnp.float32
  assert set(variables["params"]) == {"down0", "down1", "bottleneck", "upconv1", "upconv0", "up1", "up0", "head"}
  assert set(variables["params"]["down0"]) == {"conv0", "norm0", "conv1", "norm1"}
  # Level 0 keeps the slice axis (pool 1x2x2), level 1 halves it.
  assert levels["down0"].shape == (2, 4, 16, 16, 4) and levels["down1"].shape == (2, 4, 8, 8, 8)
  assert levels["bottleneck"].shape == (2, 2, 4, 4, 16) and levels["up0"].shape == (2, 4, 16, 16, 4)
  assert variables["params"]["down0"]["conv0"]["kernel"].shape == (1, 3, 3, 1, 4)
  assert variables["params"]["upconv0"]["kernel"].shape == (1, 2, 2, 8, 4)
  assert variables["params"]["upconv1"]["kernel"].shape == (2, 2, 2, 16, 8)


def test_fast_and_flax_layers_compute_the_same_function(anisotropic):
  model, variables, x = anisotropic
  slow = model.clone(fast_ops=False)
  params = dict(variables["params"])
  params["head"] = {"kernel": params["head"]["kernel"][None, None, None], "bias": params["head"]["bias"]}
  fast_out, slow_out = jax.jit(lambda v, w, u: (model.apply(v, u), slow.apply(w, u)))(
      variables, {**variables, "params": params}, x)
  np.testing.assert_allclose(fast_out, slow_out, rtol=1e-4, atol=1e-4)


def test_make_model_builds_unet3d_and_refuses_bad_shapes():
  config = ml_collections.ConfigDict({"name": "unet3d", "base_features": 4, "depth": 2, "dropout": 0.0,
                                      "norm": "instance", "fast_ops": True, "adapter": "none", "se": "none",
                                      "pool_sizes": ((1, 2, 2), (1, 2, 2))})
  model = make_model(config, num_classes=2)
  assert isinstance(model, UNet3D) and model.pool_sizes == ((1, 2, 2), (1, 2, 2)) and model.norm == "instance"
  x = jnp.zeros((1, 3, 8, 8, 1))   # the slice axis is never pooled: any depth works
  assert jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), x)[0]).shape == (1, 3, 8, 8, 2)
  with pytest.raises(ValueError, match="divisible by"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 6, 8, 1)))
  with pytest.raises(ValueError, match="needs 2 entries"):
    UNet3D(2, depth=2, pool_sizes=((2, 2, 2),)).init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 4, 1)))
  with pytest.raises(ValueError, match="no adapters"):
    make_model(ml_collections.ConfigDict({**config.to_dict(), "adapter": "series"}), num_classes=2)
