"""MLDG / MASF / SAML train steps: the exact meta-gradient (float64 central differences, the
Hessian term), exactness on N devices, the two optimizer modes, per-domain BN, end-to-end runs.

One tiny problem for all: a depth-1, 4-feature U-Net on 8x8 slices, 2 meta-train + 1 meta-test
domains of 4 slices each (one slice per domain and device on 4 devices), SGD with rate 1, so a
step's update is minus its gradient, and inner rate 0.5, so the Hessian term −α·H·∇outer is
large (≈ 20 % of the gradient). Every compiled step is shared through module-scoped fixtures.
"""

import contextlib
import types

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import make_sites_dataset, tiny_config
from medgen_jax import losses, methods, parallel, train_lib
from medgen_jax.config import base_config
from medgen_jax.methods import episodic, masf, saml
from medgen_jax.models import UNet
from medgen_jax.models import metric as metric_module
from medgen_jax.models import norms as norms_module
from medgen_jax.models import unet as unet_module
from medgen_jax.models.metric import MetricNet
from medgen_jax.train_state import NetState, create_train_state, make_optimizer

SIZE, CLASSES, PER_DOMAIN = 8, 3, 4
MODEL = {"base_features": 4, "depth": 1}
EPISODE_SEED, STEP_KEY = 0, 5
METRIC_LR = 1000.0


def make_episode(rng, n_tr=2, n_te=1, per_domain=PER_DOMAIN, size=SIZE):
  def group(n):
    b = n * per_domain
    return {"image": rng.normal(size=(b, size, size, 1)).astype(np.float32),
            "label": rng.integers(0, CLASSES, size=(b, size, size)).astype(np.int32)}
  return {"meta_train": group(n_tr), "meta_test": group(n_te)}


def meta_config(method, **overrides):
  config = base_config()
  config.method = method
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 1.0
  config.meta.inner_lr = 0.5
  config.masf.margin = config.saml.margin = 1.0
  # φ's gradient is ~1e-5: a large rate lifts its update above φ's float32 resolution.
  config.masf.metric_lr = config.saml.metric_lr = METRIC_LR
  # MASF's and SAML's own terms are tiny on random data at the released weights: weigh them up so
  # that they matter (MASF's Hessian term: norm 0.14 instead of 0.005).
  config.masf.global_weight, config.masf.local_weight = 30.0, 0.5
  config.saml.perimeter_scale, config.saml.smoothness_weight = 1.0, 0.5
  for key, value in overrides.items():
    block, name = key.split(".")
    config[block][name] = value
  return config


def build(config, *, axis_name=None):
  """(initial state, step) with the trainer's optimizers (SGD or Adam for M_φ, as for θ)."""
  method = config.method
  tx = make_optimizer(config.optimizer, num_steps=10)
  model = UNet(CLASSES, **MODEL, bn_axis_name=axis_name)
  state = create_train_state(0, model, tx, input_shape=(1, SIZE, SIZE, 1))
  metric_model = metric_tx = None
  if method in ("masf", "saml"):
    metric_model = MetricNet(tuple(config[method].metric_features))
    metric_tx = (optax.sgd if config.optimizer.name == "sgd" else optax.adam)(config[method].metric_lr)
    phi = metric_model.init(jax.random.PRNGKey(3), jnp.zeros((1, MODEL["base_features"])))["params"]
    state = state.replace(nets={"metric": NetState(phi, {}, metric_tx.init(phi))})
  task_tx = episodic.make_task_optimizer(config)
  if task_tx is not None:
    state = state.replace(task_opt_state=task_tx.init(state.params))
  step = methods.MODULES[method].make_train_step(model, tx, config, num_classes=CLASSES,
                                                 axis_name=axis_name, bn_sync=True,
                                                 metric_model=metric_model, metric_tx=metric_tx,
                                                 task_tx=task_tx)
  return state, step


def flat(tree):
  """A pytree's leaves as one float64 vector (ravel_pytree's order)."""
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


# --- float64 references ------------------------------------------------------------------------


class _Float64Numpy:
  """jax.numpy with `float32` meaning float64: the model and the losses cast to float32 on
  purpose (mixed precision); for the float64 reference they must not."""

  def __getattr__(self, name):
    return jnp.float64 if name == "float32" else getattr(jnp, name)


@contextlib.contextmanager
def float64():
  with jax.enable_x64(True), pytest.MonkeyPatch.context() as patch:
    for module in (unet_module, norms_module, metric_module, losses.segmentation,
                   losses.metric_learning, losses.distillation, masf, saml):
      patch.setattr(module, "jnp", _Float64Numpy())
    yield


def exact_reference(config, state, ep, *, eps=1e-5, random_directions=2):
  """Float64, written independently of the train step and of meta.adapt:
  F(θ, φ) = L_inner(θ) + outer(θ − α ∇L_inner(θ), φ) (MLDG: outer = β · L(·; D_te)), its exact
  gradient, the task gradient ∇L_inner(θ), the Hessian term −α · H_inner(θ) · ∇_θ' outer (a
  Hessian-vector product) and central differences of F along the unit Hessian-term direction and
  along random unit directions."""
  m = config.meta
  with float64():
    to64 = lambda t: jax.tree.map(
        lambda x: jnp.asarray(x, jnp.float64) if np.issubdtype(np.asarray(x).dtype, np.floating)
        else jnp.asarray(x), t)
    model = UNet(CLASSES, **MODEL, dtype=jnp.float64)
    phi = state.nets["metric"].params if state.nets else {}
    theta, phi, stats = to64(state.params), to64(phi), to64(state.batch_stats)
    meta_train, meta_test = to64(ep["meta_train"]), to64(ep["meta_test"])
    key = jax.random.PRNGKey(0)  # no dropout, no augmentation: keys do not matter
    loss_fn = episodic.make_loss_fn(model, config, num_classes=CLASSES)
    inner = lambda p: loss_fn(p, stats, meta_train, key, group="meta_train")[0]
    if config.method == "mldg":
      outer = lambda adapted, phi: m.beta * loss_fn(adapted, stats, meta_test, key, group="meta_test")[0]
    else:
      module = methods.MODULES[config.method]
      metric_model = MetricNet(tuple(config[config.method].metric_features))
      outer_fn = module.make_outer(model, config, num_classes=CLASSES, metric_model=metric_model)
      episode = episodic.make_episode(model, config, stats, meta_train, meta_test, key, key)
      outer = lambda adapted, phi: outer_fn(adapted, phi, episode)[0]
    step_in = lambda p: jax.tree.map(lambda w, g: w - m.inner_lr * g, p, jax.grad(inner)(p))
    objective = jax.jit(lambda p, phi: inner(p) + outer(step_in(p), phi))

    @jax.jit
    def gradients(p, phi):
      grad, grad_phi = jax.grad(lambda p, phi: inner(p) + outer(step_in(p), phi), argnums=(0, 1))(p, phi)
      g_outer = jax.grad(outer)(step_in(p), phi)
      hvp = jax.jvp(jax.grad(inner), (p,), (g_outer,))[1]
      return grad, grad_phi, jax.grad(inner)(p), jax.tree.map(lambda h: -m.inner_lr * h, hvp)

    grad, grad_phi, task, hessian = gradients(theta, phi)
    _, unravel = ravel_pytree(theta)
    hess_flat = flat(hessian)
    rng = np.random.default_rng(1)
    directions = [hess_flat / np.linalg.norm(hess_flat)]
    directions += [d / np.linalg.norm(d) for d in rng.normal(size=(random_directions, hess_flat.size))]
    shift = lambda d, s: jax.tree.map(lambda w, v: w + s * v, theta, unravel(jnp.asarray(d)))
    central = [float(objective(shift(d, eps), phi) - objective(shift(d, -eps), phi)) / (2 * eps)
               for d in directions]
    host = lambda t: jax.tree.map(np.asarray, t)
    return types.SimpleNamespace(grad=host(grad), grad_phi=host(grad_phi), task=host(task),
                                 hessian=host(hessian), directions=np.stack(directions),
                                 central=np.asarray(central))


@pytest.fixture(scope="module")
def reference():
  """Per method, on one device: the initial state, the second- and first-order steps ('summed',
  SGD rate 1) and the float64 reference. Computed once per module."""
  cache = {}

  def get(method):
    if method not in cache:
      config = meta_config(method)
      state, second = build(config)
      _, first = build(meta_config(method, **{"meta.first_order": True}))
      ep = make_episode(np.random.default_rng(EPISODE_SEED))
      key = jax.random.PRNGKey(STEP_KEY)
      host = lambda t: jax.tree.map(np.asarray, t)
      new2, metrics = jax.jit(second)(state, ep, key)
      new1, _ = jax.jit(first)(state, ep, key)
      cache[method] = types.SimpleNamespace(
          config=config, state=host(state), ep=ep, key=key, second=host(new2), first=host(new1),
          metrics=host(metrics), exact=exact_reference(config, state, ep))
    return cache[method]

  return get


def relative(a, b, scale):
  return float(np.linalg.norm(flat(a) - flat(b)) / np.linalg.norm(flat(scale)))


# --- the meta-gradient -------------------------------------------------------------------------


# MASF and SAML (~27 s each) are slow: their meta-gradient is MLDG's nested-grad machinery
# (methods/episodic.py, checked here against central differences in CI) with their own losses,
# which test_dg_losses checks against numpy; their steps run in CI in the n-device and
# end-to-end tests below.
@pytest.mark.parametrize("method", ["mldg", pytest.param("masf", marks=pytest.mark.slow),
                                    pytest.param("saml", marks=pytest.mark.slow)])
def test_meta_gradient_matches_float64_central_differences(reference, method):
  ref = reference(method)
  exact = ref.exact
  grad = flat(exact.grad)
  # The float64 gradient of the objective against central differences (the first direction is
  # the Hessian term's: a first-order gradient would be off by its whole norm there).
  hessian_norm = np.linalg.norm(flat(exact.hessian))
  np.testing.assert_allclose(exact.directions @ grad, exact.central, rtol=0, atol=1e-8 * hessian_norm)
  # The train step's own (float32) gradient along the same directions, to float32 round-off.
  step_grad = flat(ref.state.params) - flat(ref.second.params)
  np.testing.assert_allclose(exact.directions @ step_grad, exact.central, rtol=0, atol=1e-5 * hessian_norm)
  assert abs(exact.directions[0] @ (flat(ref.state.params) - flat(ref.first.params)) - exact.central[0]) \
      > 0.5 * hessian_norm


@pytest.mark.parametrize("method", ["mldg", "masf", "saml"])
def test_summed_step_is_the_gradient_of_the_whole_objective(reference, method):
  """'summed': the step applies g_task + g_meta = ∇F, the old single-gradient formulation."""
  ref = reference(method)
  update = jax.tree.map(lambda a, b: a - b, ref.state.params, ref.second.params)  # SGD, rate 1
  assert relative(update, ref.exact.grad, ref.exact.grad) < 1e-5
  if method != "mldg":  # φ: its own SGD at metric_lr on ∂F/∂φ
    phi_update = jax.tree.map(lambda a, b: (a - b) / METRIC_LR, ref.state.nets["metric"].params,
                              ref.second.nets["metric"].params)
    assert relative(phi_update, ref.exact.grad_phi, ref.exact.grad_phi) < 1e-5


@pytest.mark.parametrize("method", ["mldg", "masf", "saml"])
def test_first_order_step_drops_exactly_the_hessian_term(reference, method):
  ref = reference(method)
  # SGD rate 1: θ_1st − θ_2nd = ∇F − ∇F_1st = the Hessian term, computed here as an HVP.
  difference = jax.tree.map(lambda a, b: a - b, ref.first.params, ref.second.params)
  assert relative(difference, ref.exact.hessian, ref.exact.hessian) < 1e-4


# --- N devices ---------------------------------------------------------------------------------


@pytest.mark.parametrize("num_devices", [2, 4])
@pytest.mark.parametrize("method", ["mldg", "masf", "saml"])
def test_second_order_step_on_n_devices_equals_one_device(reference, method, num_devices):
  """The pmapped exact second-order step on the same global batch equals the one-device step to
  well below 1e-3 of the Hessian term (measured ≈ 5e-6; the former psum-based global_sum, exact in
  the first derivative only, was 4e-3 to 9e-3)."""
  ref = reference(method)
  state, step = build(ref.config, axis_name=parallel.AXIS_NAME)
  runner = parallel.DataParallel(step, num_devices=num_devices)
  new, metrics = runner.step(runner.replicate(state), ref.ep, ref.key)
  host = runner.unreplicate(new)
  assert relative(host.params, ref.second.params, ref.exact.hessian) < 1e-4
  np.testing.assert_allclose(metrics["loss"], ref.metrics["loss"], rtol=1e-5)
  if method != "mldg":
    phi_ref, phi_new = ref.state.nets["metric"].params, ref.second.nets["metric"].params
    phi_update = jax.tree.map(lambda a, b: a - b, phi_ref, phi_new)
    assert relative(host.nets["metric"].params, phi_new, phi_update) < 1e-4


# --- optimizers: 'summed' and 'released' ---------------------------------------------------------


def clip_per_tensor(tree, max_norm):
  return jax.tree.map(lambda g: g * min(1.0, max_norm / max(np.linalg.norm(g), 1e-30)), tree)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_released_mode_applies_task_and_clipped_meta_gradients_with_two_optimizers(reference, optimizer):
  """SAML as released: config.optimizer on clip(g_meta) (per tensor) + the task optimizer on
  g_task, both at the same θ, updates summed; with Adam, two independent moment estimates."""
  ref = reference("saml")
  g_task = ref.exact.task
  g_meta = jax.tree.map(lambda a, b: a - b, ref.exact.grad, g_task)
  norms = np.array([np.linalg.norm(g) for g in jax.tree.leaves(g_meta)])
  clip = float(np.median(norms))
  assert (norms > 1.01 * clip).any() and (norms < 0.99 * clip).any()  # active on some tensors only
  lr, task_lr = (1.0, 0.3) if optimizer == "sgd" else (1e-3, 1e-4)
  config = meta_config("saml", **{"meta.optimizers": "released", "meta.task_learning_rate": task_lr,
                                  "meta.outer_clip": clip, "optimizer.name": optimizer,
                                  "optimizer.learning_rate": lr, "saml.metric_lr": min(lr, METRIC_LR)})
  state, step = build(config)
  new, metrics = jax.jit(step)(state, ref.ep, ref.key)
  clipped = clip_per_tensor(g_meta, clip)
  update = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - b, new.params, ref.state.params)
  if optimizer == "sgd":
    expected = jax.tree.map(lambda t, c: -task_lr * t - lr * c, g_task, clipped)
  else:
    meta_moments, task_moments = new.opt_state[0], new.task_opt_state[0]
    assert isinstance(meta_moments, optax.ScaleByAdamState)
    assert isinstance(task_moments, optax.ScaleByAdamState)
    # Each state's first moment is (1 − b1) times its own gradient: two independent Adams.
    assert relative(jax.tree.map(lambda x: x / 0.1, meta_moments.mu), clipped, clipped) < 1e-5
    assert relative(jax.tree.map(lambda x: x / 0.1, task_moments.mu), g_task, g_task) < 1e-5
    adam = lambda rate, g: optax.adam(rate).update(g, optax.adam(rate).init(g))[0]
    expected = jax.tree.map(jnp.add, adam(lr, clipped), adam(task_lr, g_task))
  assert relative(update, expected, expected) < 1e-4
  np.testing.assert_allclose(metrics["task_grad_norm"], np.linalg.norm(flat(g_task)), rtol=1e-4)


def test_optimizer_modes_are_checked():
  config = meta_config("saml", **{"meta.optimizers": "released"})
  tx = make_optimizer(config.optimizer, num_steps=1)
  with pytest.raises(ValueError, match="task_tx"):  # released mode without its task optimizer
    saml.make_train_step(UNet(CLASSES, **MODEL), tx, config, num_classes=CLASSES)
  assert episodic.make_task_optimizer(meta_config("saml")) is None
  with pytest.raises(ValueError, match="'released' exists for masf, saml"):
    episodic.make_task_optimizer(meta_config("mldg", **{"meta.optimizers": "released"}))


# --- BatchNorm per domain ----------------------------------------------------------------------


def test_per_domain_bn_pass_equals_separate_domain_passes():
  """meta.per_domain_bn: one vmapped pass = one forward pass per domain (rows i::n), also pmapped
  with synchronized BN on 2 devices (each device's chunk domain-interleaved)."""
  domains = 3
  images = np.random.default_rng(0).normal(size=(domains * 4, SIZE, SIZE, 1)).astype(np.float32)
  images += np.arange(domains * 4)[:, None, None, None] % domains  # domains differ in mean
  model = UNet(CLASSES, **MODEL)
  variables = model.init(jax.random.PRNGKey(0), images[:1])
  key = jax.random.PRNGKey(1)
  apply = lambda m, x: episodic.apply_model(m, variables["params"], variables["batch_stats"], x, key,
                                            domains=domains, per_domain_bn=True, return_features=True)
  (logits, features), stats = jax.jit(lambda x: apply(model, x))(images)
  one_pass = jax.jit(lambda x: model.apply(variables, x, train=True, return_features=True,
                                           mutable=["batch_stats"]))
  separate = [one_pass(images[i::domains]) for i in range(domains)]
  for i, ((logits_i, features_i), _) in enumerate(separate):
    np.testing.assert_allclose(logits[i::domains], logits_i, atol=1e-5)
    np.testing.assert_allclose(features[i::domains], features_i, atol=1e-5)
  mean_stats = jax.tree.map(lambda *s: sum(s) / domains, *[u["batch_stats"] for _, u in separate])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), stats, mean_stats)
  (joint, _), _ = one_pass(images)
  assert np.abs(np.asarray(joint) - np.asarray(logits)).max() > 1e-2  # one BN batch differs

  synced = UNet(CLASSES, **MODEL, bn_axis_name=parallel.AXIS_NAME)
  pmapped = jax.pmap(lambda x: apply(synced, x), axis_name=parallel.AXIS_NAME,
                     devices=jax.local_devices()[:2])
  (logits_2, _), stats_2 = pmapped(parallel.shard_batch(images, 2))
  np.testing.assert_allclose(np.asarray(logits_2).reshape(logits.shape), logits, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, atol=1e-6), stats_2, stats)


# --- special cases and end-to-end runs ---------------------------------------------------------


def test_mldg_with_beta_zero_is_the_deepall_step_on_meta_train():
  config = meta_config("mldg", **{"meta.beta": 0.0, "meta.first_order": True})
  ep = make_episode(np.random.default_rng(1))
  state, mldg_step = build(config)
  deepall = meta_config("deepall")
  _, deepall_step = build(deepall)
  key = jax.random.PRNGKey(0)
  new_mldg, _ = jax.jit(mldg_step)(state, ep, key)
  # DeepAll's dropout key differs, but the model has no dropout: same update.
  new_deepall, _ = jax.jit(deepall_step)(state, ep["meta_train"], key)
  for a, b in zip(jax.tree.leaves(new_mldg.params), jax.tree.leaves(new_deepall.params)):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.fixture(scope="module")
def five_sites(tmp_path_factory):
  return make_sites_dataset(tmp_path_factory.mktemp("data") / "five", sites=tuple("ABCDE"), cases=3)


@pytest.mark.parametrize("method,label,overrides", [
    ("masf", "MASF", {"meta.per_domain_bn": True}),
    ("saml", "SAML (1st order)", {"meta.first_order": True, "meta.optimizers": "released",
                                  "meta.task_learning_rate": 1e-4, "meta.outer_clip": 10.0})],
    ids=["masf-per_domain_bn", "saml-released"])
def test_train_and_evaluate_runs_episodic_methods(five_sites, tmp_path, method, label, overrides):
  # batch 12 = 3 domains x 4 slices: one slice per domain per device.
  config = tiny_config(five_sites, method=method, batch_size=12, num_steps=2, eval_every=2,
                       **{"data.held_out": ("E",), "data.split.test_fraction": 0.0,
                          "checkpoint.every": 2}, **overrides)
  result = train_lib.train_and_evaluate(config, tmp_path / "run")
  assert {r["method"] for r in result["records"]} == {label}
  assert {r["site"] for r in result["records"] if r["role"] == "unseen"} == {"E"}
