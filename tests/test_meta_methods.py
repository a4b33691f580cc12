"""MLDG / MASF / SAML train steps: pmap equals one device, special cases, end-to-end runs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import make_sites_dataset, tiny_config
from medgen_jax import methods, parallel, train_lib
from medgen_jax.config import base_config
from medgen_jax.models import UNet
from medgen_jax.models.metric import MetricNet
from medgen_jax.train_state import create_train_state, make_optimizer


def episode(rng, n_tr=2, n_te=1, per_domain=2, size=16):
  def group(n):
    b = n * per_domain
    return {"image": rng.normal(size=(b, size, size, 1)).astype(np.float32),
            "label": rng.integers(0, 3, size=(b, size, size)).astype(np.int32),
            "domain": np.tile(np.arange(n), per_domain).astype(np.int32)}
  return {"meta_train": group(n_tr), "meta_test": group(n_te)}


def build(method, config, *, axis_name=None, first_order=False):
  config.meta.first_order = first_order
  tx = make_optimizer(config.optimizer, num_steps=10)
  model = UNet(3, base_features=4, depth=2, bn_axis_name=axis_name)
  state = create_train_state(0, model, tx, input_shape=(1, 16, 16, 1))
  metric_model = metric_tx = None
  if method in methods.WITH_METRIC_NET:
    metric_model = MetricNet(tuple(config[method].metric_features))
    metric_tx = (optax.sgd if config.optimizer.name == "sgd" else optax.adam)(config[method].metric_lr)
    phi = metric_model.init(jax.random.PRNGKey(3), jnp.zeros((1, 4)))["params"]
    state = state.replace(metric_params=phi, metric_opt_state=metric_tx.init(phi))
  step = methods.MODULES[method].make_train_step(model, tx, config, num_classes=3, axis_name=axis_name,
                                                 bn_sync=True, metric_model=metric_model,
                                                 metric_tx=metric_tx)
  return state, step


def meta_config():
  config = base_config()
  config.meta.inner_lr = 0.05
  config.masf.margin = 1.0
  config.saml.margin = 1.0
  return config


@pytest.mark.parametrize("method", ["masf", "saml"])
def test_step_pmapped_on_two_devices_equals_one_device(method):
  config = meta_config()
  # SGD: Adam rescales near-zero gradients to full-size steps, so summation-order noise
  # (~1e-9) in a gradient that is ~0 would become a 1e-3 parameter difference.
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.1
  config.masf.metric_lr = 0.1
  config.saml.metric_lr = 0.1
  rng = np.random.default_rng(0)
  episodes = [episode(rng) for _ in range(2)]
  single_state, single_step = build(method, config)
  single_step = jax.jit(single_step)
  multi_state, multi_step = build(method, config, axis_name=parallel.AXIS_NAME)
  runner = parallel.DataParallel(multi_step, num_devices=2)
  multi_state = runner.replicate(multi_state)
  key = jax.random.PRNGKey(5)
  for ep in episodes:
    single_state, m1 = single_step(single_state, ep, key)
    multi_state, m2 = runner.step(multi_state, ep, key)
    np.testing.assert_allclose(m1["loss_total"], m2["loss_total"], rtol=1e-5)
  host = runner.unreplicate(multi_state)
  for a, b in zip(jax.tree.leaves((single_state.params, single_state.metric_params)),
                  jax.tree.leaves((host.params, host.metric_params))):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_mldg_with_beta_zero_is_the_deepall_step_on_meta_train():
  config = meta_config()
  config.meta.beta = 0.0
  ep = episode(np.random.default_rng(1))
  state, mldg_step = build("mldg", config)
  _, deepall_step = build("deepall", config)
  key = jax.random.PRNGKey(0)
  new_mldg, _ = jax.jit(mldg_step)(state, ep, key)
  # DeepAll's dropout key differs, but the model has no dropout: same update.
  new_deepall, _ = jax.jit(deepall_step)(state, ep["meta_train"], key)
  for a, b in zip(jax.tree.leaves(new_mldg.params), jax.tree.leaves(new_deepall.params)):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("method", ["mldg", "masf", "saml"])
def test_second_and_first_order_steps_run_and_differ(method):
  config = meta_config()
  ep = episode(np.random.default_rng(2))
  state, second = build(method, config)
  _, first = build(method, meta_config(), first_order=True)
  key = jax.random.PRNGKey(0)
  s2, m2 = jax.jit(second)(state, ep, key)
  s1, m1 = jax.jit(first)(state, ep, key)
  assert all(np.isfinite(float(v)) for v in jax.tree.leaves(m2) if np.ndim(v) == 0)
  diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(s2.params), jax.tree.leaves(s1.params)))
  assert diff > 0  # the Hessian term changes the update
  if method in methods.WITH_METRIC_NET:
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.metric_params),
                                                       jax.tree.leaves(s2.metric_params))]
    assert any(moved)  # φ has its own optimizer


@pytest.fixture(scope="module")
def five_sites(tmp_path_factory):
  return make_sites_dataset(tmp_path_factory.mktemp("data") / "five", sites=tuple("ABCDE"), cases=3)


@pytest.mark.parametrize("method,label", [("masf", "MASF"), ("saml", "SAML (1st order)")])
def test_train_and_evaluate_runs_episodic_methods(five_sites, tmp_path, method, label):
  # batch 12 = 3 domains x 4 slices: one slice per domain per device.
  config = tiny_config(five_sites, method=method, batch_size=12, num_steps=2, eval_every=2,
                       **{"data.held_out": ("E",), "data.split.test_fraction": 0.0,
                          "meta.first_order": method == "saml", "checkpoint.every": 2})
  result = train_lib.train_and_evaluate(config, tmp_path / "run")
  assert {r["method"] for r in result["records"]} == {label}
  assert {r["site"] for r in result["records"] if r["role"] == "unseen"} == {"E"}
