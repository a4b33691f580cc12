"""meta.py: the MLDG meta-gradient against finite differences and the closed form."""

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest

from medgen_jax import meta


def mlp_loss(params, batch):
  h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  out = h @ params["w2"] + params["b2"]
  return jnp.mean((out - batch["y"]) ** 2)


@pytest.fixture
def mlp_problem():
  rng = np.random.default_rng(0)
  params = {"w1": rng.normal(size=(3, 5)), "b1": rng.normal(size=5), "w2": rng.normal(size=(5, 2)),
            "b2": rng.normal(size=2)}
  make = lambda n: {"x": rng.normal(size=(n, 3)), "y": rng.normal(size=(n, 2))}
  return params, make(7), make(6)


@pytest.mark.parametrize("clip", [None, 0.5])
def test_second_order_meta_gradient_matches_finite_differences(mlp_problem, clip):
  with jax.enable_x64(True):
    params, tr, te = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), mlp_problem)
    f = lambda p: meta.mldg_objective(mlp_loss, p, tr, te, inner_lr=0.3, beta=0.7, clip=clip)
    grad = jax.grad(f)(params)
    flat, unravel = ravel_pytree(params)
    numeric = np.zeros(flat.shape)
    eps = 1e-6
    for i in range(flat.size):
      e = np.zeros(flat.shape)
      e[i] = eps
      numeric[i] = (f(unravel(flat + e)) - f(unravel(flat - e))) / (2 * eps)
    analytic = np.asarray(ravel_pytree(grad)[0])
    rel = np.linalg.norm(analytic - numeric) / np.linalg.norm(numeric)
    assert rel < 1e-4


def quadratic_problem():
  rng = np.random.default_rng(1)
  m = rng.normal(size=(4, 4))
  a = m @ m.T + np.eye(4)
  n = rng.normal(size=(4, 4))
  c = n @ n.T + np.eye(4)
  b, d, theta = rng.normal(size=4), rng.normal(size=4), rng.normal(size=4)
  loss = lambda p, batch: 0.5 * p @ batch["H"] @ p + batch["v"] @ p
  return loss, theta, {"H": a, "v": b}, {"H": c, "v": d}


@pytest.mark.parametrize("beta", [1.0, 0.4])
def test_meta_gradient_equals_closed_form_on_a_quadratic(beta):
  loss, theta, tr, te = quadratic_problem()
  alpha = 0.05
  with jax.enable_x64(True):
    grad = jax.grad(lambda p: meta.mldg_objective(loss, p, tr, te, inner_lr=alpha, beta=beta))(theta)
    first = jax.grad(lambda p: meta.mldg_objective(loss, p, tr, te, inner_lr=alpha, beta=beta,
                                                   first_order=True))(theta)
  a, b, c, d = tr["H"], tr["v"], te["H"], te["v"]
  g_tr = a @ theta + b
  adapted = theta - alpha * g_tr
  g_te = c @ adapted + d
  np.testing.assert_allclose(grad, g_tr + beta * (np.eye(4) - alpha * a) @ g_te, rtol=1e-10)
  # first_order drops exactly the Hessian term.
  np.testing.assert_allclose(first, g_tr + beta * g_te, rtol=1e-10)
  np.testing.assert_allclose(grad - first, -beta * alpha * a @ g_te, rtol=1e-9, atol=1e-12)


def test_beta_zero_gives_the_deepall_gradient(mlp_problem):
  params, tr, te = mlp_problem
  with jax.enable_x64(True):
    grad = jax.grad(lambda p: meta.mldg_objective(mlp_loss, p, tr, te, inner_lr=0.3, beta=0.0))(params)
    deepall = jax.grad(mlp_loss)(params, tr)
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(deepall)):
    np.testing.assert_allclose(a, b, rtol=1e-12)


def test_inner_update_clips_each_tensor_like_tf_clip_by_norm():
  params = {"a": np.zeros(2), "b": np.zeros(3)}
  grads = {"a": np.array([3.0, 4.0]), "b": np.array([0.1, 0.0, 0.0])}  # norms 5 and 0.1
  out = meta.inner_update(grads, params, inner_lr=2.0, clip=1.0)
  np.testing.assert_allclose(out["a"], -2.0 * np.array([0.6, 0.8]), rtol=1e-6)   # clipped to norm 1
  np.testing.assert_allclose(out["b"], -2.0 * grads["b"], rtol=1e-6)             # untouched


def test_has_aux_returns_both_passes(mlp_problem):
  params, tr, te = mlp_problem
  loss_aux = lambda p, batch: (mlp_loss(p, batch), {"n": batch["x"].shape[0]})
  value, aux = meta.mldg_objective(loss_aux, params, tr, te, inner_lr=0.1, has_aux=True)
  assert aux["meta_train"]["n"] == 7 and aux["meta_test"]["n"] == 6
  np.testing.assert_allclose(value, aux["loss_meta_train"] + aux["loss_meta_test"], rtol=1e-6)
  np.testing.assert_allclose(value, meta.mldg_objective(mlp_loss, params, tr, te, inner_lr=0.1), rtol=1e-6)


def test_adapt_returns_the_inner_gradient_before_clipping(mlp_problem):
  """adapt -> (θ', L(θ), g, aux): g = ∇L(θ) unclipped (MASF/SAML's task gradient),
  θ' = θ − α·clip(g)."""
  params, tr, _ = mlp_problem
  adapted, loss, grads, aux = meta.adapt(mlp_loss, params, tr, inner_lr=0.3, clip=0.5)
  expected = jax.grad(mlp_loss)(params, tr)
  assert aux is None
  np.testing.assert_allclose(loss, mlp_loss(params, tr), rtol=1e-6)
  for name in params:
    np.testing.assert_allclose(grads[name], expected[name], rtol=1e-5)
    g = np.asarray(expected[name])
    clipped = g * min(1.0, 0.5 / np.linalg.norm(g))
    np.testing.assert_allclose(adapted[name], params[name] - 0.3 * clipped, rtol=1e-5, atol=1e-6)
  assert max(np.linalg.norm(np.asarray(g)) for g in expected.values()) > 0.5  # the clip is active


def test_clip_by_norm_has_finite_derivatives_at_a_zero_gradient():
  # A tensor whose inner gradient is exactly zero but still depends on θ: the clip must not turn
  # the second-order meta-gradient into NaN (sqrt'(0) = inf).
  grad = jax.grad(lambda w: jnp.sum(meta.clip_by_norm(0.0 * w, 1.0)))(jnp.ones(3))
  np.testing.assert_array_equal(grad, np.zeros(3))
  big = jnp.array([3.0, 4.0])  # norm 5 > 2: scaled to norm 2
  np.testing.assert_allclose(meta.clip_by_norm(big, 2.0), big * 2.0 / 5.0, rtol=1e-6)
  np.testing.assert_allclose(meta.clip_by_norm(big, 10.0), big)
