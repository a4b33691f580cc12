"""LatReg (methods/latreg.py): the four regularizer losses against numpy written from the released
Keras code (ShahabAslani/Scanner-Invariant: binary_crossentropy to 0.5 targets, categorical CE to
randomly permuted one-hot labels, squared Pearson correlation), the random targets (uniform,
independent of the device split), one SGD step against hand arithmetic on a hand-written
regularization MLP (cooperative losses: θ and ψ both descend w·L_reg; adversarial: ψ descends,
θ gets the reversed gradient), weight 0 == DeepAll's step bit for bit, pmap 2 devices == 1
device, config checks, and a tiny run through the registry."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import every_leaf_changed, leaves_equal, make_sites_dataset, tiny_config
from medgen_jax import parallel, train_lib
from medgen_jax.config import base_config, validate
from medgen_jax.methods import deepall, latreg
from medgen_jax.methods.base import RunInfo

K, C, N = 3, 3, 6
INFO = RunInfo(num_classes=C, input_shape=(16, 16, 1), domains=("A", "B", "D"))


def make_config(**overrides):
  c = base_config()
  c.method = "latreg"
  c.model.base_features = 4
  c.model.depth = 1            # few layers to compile
  c.latreg.hidden = 5
  c.latreg.weight = 0.7        # large enough for the regularizer to matter in the hand step
  c.optimizer.name = "sgd"
  c.optimizer.momentum = 0.0
  c.optimizer.learning_rate = 0.5
  c.num_steps = 10
  for key, value in overrides.items():
    target = c
    *path, last = key.split(".")
    for p in path:
      target = target[p]
    target[last] = value
  return c


def make_batch(seed=0, n=N):
  rng = np.random.default_rng(seed)
  domain = (np.arange(n) % K).astype(np.int32)
  image = (rng.normal(size=(n, 16, 16, 1)) * (1 + domain[:, None, None, None])
           + 2 * domain[:, None, None, None]).astype(np.float32)
  label = rng.integers(0, C, size=(n, 16, 16)).astype(np.int32)
  return {"image": image, "label": label, "domain": domain}


@pytest.fixture(scope="module")
def state():
  return latreg.init_state(jax.random.PRNGKey(0), make_config(), INFO)


@pytest.fixture(scope="module")
def uniform_step():
  """The default (uniform) step of make_config(), compiled once for two tests."""
  return jax.jit(latreg.make_step(make_config(), INFO))


@pytest.fixture(scope="module")
def randomized_step():
  """The randomized variant's one-device step, compiled once for two tests."""
  return jax.jit(latreg.make_step(make_config(**{"latreg.loss": "randomized"}), INFO))


# --- L_reg against numpy -----------------------------------------------------------------------


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_losses_equal_numpy_from_the_released_formulas():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(5, K)) * 2
  domain = np.array([0, 2, 1, 1, 0])
  p = np_softmax(logits)
  # uniform, K = 2 as released: Keras binary_crossentropy(0.5, p) = mean over the 2 outputs
  logits2 = rng.normal(size=(5, 2)) * 2
  p2 = np_softmax(logits2)
  keras_bce = np.mean(-(0.5 * np.log(p2) + 0.5 * np.log(1 - p2)), axis=-1).mean()
  np.testing.assert_allclose(latreg.uniform_loss(jnp.asarray(logits2)), keras_bce, rtol=1e-5)
  # uniform, K = 3: the cross-entropy of the uniform distribution to p
  np.testing.assert_allclose(latreg.uniform_loss(jnp.asarray(logits)),
                             np.mean(-np.sum(np.log(p) / K, axis=-1)), rtol=1e-5)
  # randomized: categorical CE of one-hot targets
  targets = np.array([1, 1, 0, 2, 2])
  np.testing.assert_allclose(latreg.regularization_loss("randomized", jnp.asarray(logits), domain, targets),
                             np.mean(-np.log(p[np.arange(5), targets])), rtol=1e-5)
  # adversarial: the same CE with the true sites
  np.testing.assert_allclose(latreg.regularization_loss("adversarial", jnp.asarray(logits), domain),
                             np.mean(-np.log(p[np.arange(5), domain])), rtol=1e-5)
  # correlation: squared Pearson r of (one-hot site, p) per slice, averaged
  r = [np.corrcoef(np.eye(K)[d], q)[0, 1] for d, q in zip(domain, p)]
  np.testing.assert_allclose(latreg.regularization_loss("correlation", jnp.asarray(logits), domain),
                             np.mean(np.square(r)), rtol=1e-5)
  # the minima the paper aims at: uniform p gives log K (uniform) and is finite for correlation
  flat = jnp.zeros((2, K))
  np.testing.assert_allclose(latreg.uniform_loss(flat), np.log(K), rtol=1e-6)
  assert np.isfinite(latreg.correlation_loss(flat, jnp.array([0, 1])))


def test_random_sites_are_uniform_and_do_not_depend_on_the_device_split():
  key = jax.random.PRNGKey(3)
  draw = jax.jit(latreg.random_sites, static_argnums=(1, 2))   # compiled, not op by op (speed)
  whole = draw(key, 6, K)
  shards = jax.jit(jax.vmap(lambda _: latreg.random_sites(key, 3, K, axis_name="d"), axis_name="d"))(jnp.arange(2))
  np.testing.assert_array_equal(np.asarray(shards).reshape(-1), np.asarray(whole))
  many = np.asarray(draw(key, 6000, K))
  counts = np.bincount(many, minlength=K)
  assert counts.shape == (K,) and np.all(np.abs(counts / 6000 - 1 / K) < 0.03), counts
  # a new step key draws new targets
  assert not np.array_equal(np.asarray(draw(jax.random.PRNGKey(4), 64, K)), np.asarray(draw(key, 64, K)))


# --- One SGD step against hand arithmetic --------------------------------------------------------


def hand_mlp(psi, z, layers=2):
  """The regularization network written out: flatten, ReLU(h W + b) twice, h W + b."""
  h = z.reshape(z.shape[0], -1)
  for i in range(layers):
    h = jnp.maximum(h @ psi[f"fc{i}"]["kernel"] + psi[f"fc{i}"]["bias"], 0.0)
  return h @ psi["out"]["kernel"] + psi["out"]["bias"]


def hand_reg(kind, site_logits, domain):
  logp = jax.nn.log_softmax(site_logits, -1)
  if kind == "uniform":
    return -jnp.mean(jnp.sum(logp, -1) / K)
  return -jnp.mean(logp[jnp.arange(logp.shape[0]), domain])   # adversarial: CE of the true sites


def hand_step(config, state, batch, kind, scale=1.0):
  """θ' = θ − lr (∇θ L_seg + s·w ∇θ L_reg) with s = +1 (cooperative) or −λ (reversal), and
  ψ' = ψ − lr w ∇ψ L_reg, every gradient from the hand-written losses."""
  model = deepall.segmenter(config, INFO, train=True)
  seg_loss = deepall.make_loss_fn(model, config.loss, num_classes=C)

  def reg(params, psi):
    (_, levels), _ = model.apply({"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
                                 mutable=["batch_stats"], return_levels=True)
    return hand_reg(kind, hand_mlp(psi, levels["bottleneck"]), batch["domain"])

  @jax.jit   # one compilation for both gradients
  def grads(params, psi):
    g_seg = jax.grad(lambda p: seg_loss(p, state.batch_stats, batch, jax.random.PRNGKey(0))[0])(params)
    return g_seg, *jax.grad(reg, argnums=(0, 1))(params, psi)

  g_seg, g_reg_theta, g_reg_psi = grads(state.params, state.nets["reg"].params)
  lr, w = config.optimizer.learning_rate, config.latreg.weight
  theta = jax.tree.map(lambda p, a, b: p - lr * (a + scale * w * b), state.params, g_seg, g_reg_theta)
  psi = jax.tree.map(lambda p, g: p - lr * w * g, state.nets["reg"].params, g_reg_psi)
  return theta, psi, g_reg_theta


def max_abs(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("kind, scale", [("uniform", 1.0), ("adversarial", -0.6)])
def test_sgd_step_equals_hand_arithmetic(state, uniform_step, kind, scale):
  config = make_config(**{"latreg.loss": kind, "latreg.reversal_scale": -scale if kind == "adversarial" else 1.0})
  batch = make_batch()
  step = uniform_step if kind == "uniform" else jax.jit(latreg.make_step(config, INFO))
  new, metrics = step(state, batch, jax.random.PRNGKey(2))
  theta, psi, g_reg_theta = hand_step(config, state, batch, kind, scale)
  assert max_abs(new.nets["reg"].params, psi) < 1e-5
  assert max_abs(new.params, theta) < 1e-5
  # the regularizer's share of θ's update is large enough for the sign to be seen
  assert float(jax.tree.reduce(max, jax.tree.map(lambda g: jnp.max(jnp.abs(g)), g_reg_theta))) * 0.7 * 0.5 > 1e-3
  assert every_leaf_changed(state.nets["reg"].params, new.nets["reg"].params)
  assert int(new.step) == 1 and int(new.first_bad_step) == 0
  np.testing.assert_allclose(metrics["loss"], metrics["loss_seg"] + 0.7 * metrics["loss_reg"], rtol=1e-6)


def test_uniform_regularizer_flattens_the_site_prediction(state, uniform_step):
  """Repeated steps move the site classifier's output towards uniform: L_reg falls towards its
  minimum log K (θ and ψ both descend it)."""
  s, batch, values = state, make_batch(), []
  for i in range(4):
    s, m = uniform_step(s, batch, jax.random.PRNGKey(i))
    values.append(float(m["loss_reg"]))
  assert all(a > b for a, b in zip(values, values[1:])) and values[-1] >= np.log(K) - 1e-6, values


def hand_site_probs(state, batch):
  """softmax(C_ψ(bottleneck)) at `state`, the U-Net in train mode, C_ψ written out (hand_mlp)."""
  model = deepall.segmenter(make_config(), INFO, train=True)
  (_, levels), _ = model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch["image"],
                               train=True, mutable=["batch_stats"], return_levels=True)
  return np.asarray(jax.nn.softmax(hand_mlp(state.nets["reg"].params, levels["bottleneck"]), -1))


def test_randomized_step_draws_random_sites_anew_each_step(state, randomized_step):
  """The randomized variant's targets, read back from ψ's output-bias update: SGD on
  w · mean_b −log p_b[r_b] moves the bias by −lr·w·mean_b (p_b − onehot(r_b)), so
  Σ_b onehot(r_b) = Σ_b p_b + N·Δbias/(lr·w) must be integer site counts summing to N; they must
  change with the step key (new targets every step) and not always be the true sites' (2, 2, 2)."""
  batch = make_batch()
  p = hand_site_probs(state, batch)
  counts = []
  for seed in (11, 12, 13):
    new, _ = randomized_step(state, batch, jax.random.PRNGKey(seed))
    delta = np.asarray(new.nets["reg"].params["out"]["bias"] - state.nets["reg"].params["out"]["bias"])
    c = p.sum(0) + N * delta / (0.5 * 0.7)
    np.testing.assert_allclose(c, np.round(c), atol=2e-3)
    assert int(np.round(c).sum()) == N, c
    counts.append(tuple(int(v) for v in np.round(c)))
  true_counts = tuple(np.bincount(batch["domain"], minlength=K))
  assert len(set(counts)) > 1 and set(counts) != {true_counts}, (counts, true_counts)


# --- DeepAll at weight 0, pmap, config ------------------------------------------------------------


def test_weight_zero_is_deepalls_step_exactly():
  config = make_config(**{"latreg.weight": 0.0, "optimizer.name": "adam", "optimizer.learning_rate": 1e-3})
  state = latreg.init_state(jax.random.PRNGKey(0), config, INFO)
  batch, key = make_batch(seed=3), jax.random.PRNGKey(5)
  new, _ = jax.jit(latreg.make_step(config, INFO))(state, batch, key)
  ref, _ = jax.jit(deepall.make_step(config, INFO))(state.replace(nets={}), batch, key)
  assert leaves_equal(new.params, ref.params)
  assert leaves_equal(new.batch_stats, ref.batch_stats)
  assert leaves_equal(new.opt_state, ref.opt_state)
  assert not leaves_equal(new.params, state.params)
  # ψ keeps its own Adam state, advanced by the step like θ's (zero gradient: ψ itself unchanged)
  assert leaves_equal(new.nets["reg"].params, state.nets["reg"].params)
  counts = lambda s: [int(x) for x in jax.tree.leaves(s) if jnp.issubdtype(x.dtype, jnp.integer)]
  assert counts(new.nets["reg"].opt_state) == counts(new.opt_state) == [1, 1]


def test_pmapped_step_equals_one_device(state, randomized_step):
  config = make_config(**{"latreg.loss": "randomized"})   # also checks the device-independent targets
  batch, key = make_batch(seed=7), jax.random.PRNGKey(9)
  one, m1 = randomized_step(state, batch, key)
  multi = latreg.make_step(config, RunInfo(C, (16, 16, 1), axis_name=parallel.AXIS_NAME, domains=INFO.domains))
  runner = parallel.DataParallel(multi, num_devices=2)
  two, m2 = runner.step(runner.replicate(state), batch, key)
  host = parallel.DataParallel.unreplicate(two)
  np.testing.assert_allclose(m1["loss"], np.asarray(m2["loss"]).reshape(-1)[0], rtol=1e-5)
  np.testing.assert_allclose(m1["loss_reg"], np.asarray(m2["loss_reg"]).reshape(-1)[0], rtol=1e-5)
  for a, b in [(one.params, host.params), (one.nets["reg"].params, host.nets["reg"].params)]:
    assert max_abs(a, b) < 2e-5
  assert max_abs(one.batch_stats, host.batch_stats) < 1e-4


def test_validate_and_single_site_refusals():
  for key, value in [("latreg.loss", "entropy"), ("latreg.pool", "max"), ("latreg.level", "up7"),
                     ("latreg.weight", -1.0), ("latreg.hidden", 0)]:
    with pytest.raises(ValueError, match=key.split(".")[1]):
      latreg.validate(make_config(**{key: value}))
  validate(make_config())
  with pytest.raises(ValueError, match="at least 2 source sites"):
    latreg.init_state(jax.random.PRNGKey(0), make_config(), RunInfo(C, (16, 16, 1), domains=("A",)))


def test_mean_pool_reads_any_slice_size():
  config = make_config(**{"latreg.pool": "mean"})
  s = latreg.init_state(jax.random.PRNGKey(0), config, INFO)
  assert s.nets["reg"].params["fc0"]["kernel"].shape == (8, 5)   # bottleneck channels (4·2^1) x hidden
  # the network against hand_mlp: the spatial mean (pool=mean) or the flattened map, Keras' zero biases
  z = np.random.default_rng(4).normal(size=(2, 3, 5, 4)).astype(np.float32)   # h != w != c
  for pool, features in [("mean", z.mean(axis=(1, 2))), ("flatten", z.reshape(2, -1))]:
    net = latreg.RegularizationNet(K, hidden=5, num_layers=2, pool=pool)
    psi = net.init(jax.random.PRNGKey(1), z)["params"]
    assert all(not np.any(np.asarray(psi[n]["bias"])) for n in ("fc0", "fc1", "out"))
    np.testing.assert_allclose(net.apply({"params": psi}, z), hand_mlp(psi, jnp.asarray(features)), rtol=1e-5, atol=1e-6)


def test_run_end_to_end_through_the_registry(tmp_path):
  root = make_sites_dataset(tmp_path / "toy", sites=("A", "B", "C"), cases=3)
  config = tiny_config(root, **{"method": "latreg", "model.depth": 1, "latreg.hidden": 4, "num_steps": 2,
                                "eval_every": 2, "checkpoint.every": 2, "eval.selection": "last",
                                "data.split.val_fraction": 0.0})
  result = train_lib.train_and_evaluate(config, tmp_path / "run")
  assert "| LatReg |" in (tmp_path / "run" / "results.md").read_text()
  assert {r["site"] for r in result["records"]} >= {"C"}
