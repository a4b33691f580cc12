"""MetaReg (methods/metareg.py): the weighted-L1 regularizer against numpy, the meta-gradient
∂L_b/∂φ through regularized inner steps against a hand-derived closed form (diagonal quadratic
L_a, linear L_b) and against float64 central differences of an independently written unrolled
inner loop on the real U-Net, the supervised update against a hand SGD step on per-site losses
(one network call per site), the meta update changing φ only, the final phase's loss and update
(L + Σ φ|θ|, θ from its fresh init) against a hand computation, the phase schedule and the site
pair draw, pmap on 2 devices == one device, and a run end to end through the registry."""

from __future__ import annotations

import contextlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import leaves_equal, make_sites_dataset, tiny_config
from medgen_jax import losses, parallel, train_lib
from medgen_jax.config import base_config
from medgen_jax.methods import metareg
from medgen_jax.methods.base import RunInfo
from medgen_jax.methods.deepall import segmentation_terms
from medgen_jax.models import UNet
from medgen_jax.models import norms as norms_module
from medgen_jax.models import unet as unet_module

K, C, SIZE = 2, 3, 16
LR, META_LR, INNER_LR, INNER_STEPS, PHI0 = 0.1, 1.0, 0.5, 2, 0.05
INFO = RunInfo(num_classes=C, input_shape=(SIZE, SIZE, 1), domains=("A", "B"))


def make_config(**overrides):
  c = base_config()
  c.method = "metareg"
  c.model.base_features = 4
  c.model.depth = 1              # fewer layers to compile (compilation is this file's time)
  c.optimizer.name = "sgd"       # phase-1 and phase-2 updates are then −LR · gradient
  c.optimizer.momentum = 0.0
  c.optimizer.learning_rate = LR
  c.loss.weight_decay = 0.05     # large enough for the L2 term to matter in the hand steps
  c.num_steps = 4
  c.metareg.meta_fraction = 0.5  # N1 = 2
  c.metareg.inner_steps = INNER_STEPS
  c.metareg.inner_lr = INNER_LR  # large, so that R_φ moves β visibly
  c.metareg.meta_lr = META_LR    # SGD at 1: φ_new = φ − ∂L_b/∂φ
  c.metareg.phi_init = PHI0
  c.metareg.phi_nonnegative = False
  for key, value in overrides.items():
    block, name = key.split(".")
    c[block][name] = value
  return c


def make_batch(seed=0, n=4):
  rng = np.random.default_rng(seed)
  domain = (np.arange(n) % K).astype(np.int32)      # interleaved, as the pooled sampler
  image = (rng.normal(size=(n, SIZE, SIZE, 1)) * (1 + domain[:, None, None, None])
           + 2.0 * domain[:, None, None, None]).astype(np.float32)
  label = rng.integers(0, C, size=(n, SIZE, SIZE)).astype(np.int32)
  return {"image": image, "label": label, "domain": domain}


host = lambda t: jax.tree.map(np.asarray, t)


@pytest.fixture(scope="module")
def reference():
  """The initial state, one meta-training step and one final-training step (at step N1), on one
  device. Computed once per module."""
  config = make_config()
  state = metareg.init_state(jax.random.PRNGKey(0), config, INFO)
  phases = metareg.make_step(config, INFO)
  batch, key = make_batch(), jax.random.PRNGKey(7)
  meta_step = jax.jit(phases.steps[0])
  state1, metrics1 = meta_step(state, batch, key)
  state1_at_n1 = state1.replace(step=jnp.asarray(metareg.meta_steps(config), jnp.int32))
  state2, metrics2 = jax.jit(phases.steps[1])(state1_at_n1, batch, key)
  return dict(config=config, state=host(state), batch=batch, key=key, state1=host(state1),
              metrics1=host(metrics1), state1_at_n1=host(state1_at_n1), state2=host(state2),
              metrics2=host(metrics2))


# --- Hand-written pieces: one network call per site, the paper's formulas ------------------------


def model_of(config, dtype=jnp.float32):
  m = config.model
  return UNet(C, base_features=m.base_features, depth=m.depth, dtype=dtype)


def site_rows(batch, site):
  rows = np.flatnonzero(batch["domain"] == site)
  return batch["image"][rows], batch["label"][rows]


def hand_loss_and_stats(model, config, params, stats, images, labels):
  """(The DeepAll loss of the U-Net `params` on these slices, train-mode BatchNorm; the running
  statistics that forward leaves)."""
  logits, updates = model.apply({"params": params, "batch_stats": stats}, images, train=True,
                                mutable=["batch_stats"])
  return segmentation_terms(logits, labels, params, config.loss, num_classes=C)[0], updates["batch_stats"]


def hand_loss(model, config, params, stats, images, labels):
  return hand_loss_and_stats(model, config, params, stats, images, labels)[0]


def encoder_decoder(tree):
  enc = {k: v for k, v in tree.items() if k.startswith(("down", "bottleneck"))}
  dec = {k: v for k, v in tree.items() if not k.startswith(("down", "bottleneck"))}
  return enc, dec


def flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


class _Float64Numpy:
  """jax.numpy with `float32` meaning float64 (the model and losses cast to float32 on purpose)."""

  def __getattr__(self, name):
    return jnp.float64 if name == "float32" else getattr(jnp, name)


@contextlib.contextmanager
def float64():
  with jax.enable_x64(True), pytest.MonkeyPatch.context() as patch:
    for module in (unet_module, norms_module, losses.segmentation):
      patch.setattr(module, "jnp", _Float64Numpy())
    yield


def test_phase_schedule_and_site_pairs():
  config = make_config(**{"metareg.meta_fraction": 0.3})
  config.num_steps = 10
  phases = metareg.make_step(config, INFO)
  assert [int(phases.schedule(s)) for s in range(10)] == [0, 0, 0, 1, 1, 1, 1, 1, 1, 1]
  for fraction in (0.0, 1.0):
    with pytest.raises(ValueError, match="metareg.meta_fraction"):
      metareg.validate(make_config(**{"metareg.meta_fraction": fraction}))
  with pytest.raises(ValueError, match="metareg.final_task_init"):
    metareg.validate(make_config(**{"metareg.final_task_init": "random"}))
  metareg.validate(make_config())
  # (a, b): every ordered pair a ≠ b of 3 sites, about equally often
  pairs = jax.vmap(lambda k: jnp.stack(metareg.pick_pair(k, 3)))(jax.random.split(jax.random.PRNGKey(0), 6000))
  counts = {}
  for a, b in np.asarray(pairs):
    counts[(a, b)] = counts.get((a, b), 0) + 1
  assert set(counts) == {(a, b) for a in range(3) for b in range(3) if a != b}
  assert all(abs(v - 1000) < 150 for v in counts.values())


# --- The regularizer and the meta-gradient ------------------------------------------------------


def test_regularizer_is_the_weighted_l1_sum():
  rng = np.random.default_rng(0)
  theta = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": {"c": np.array([0.0, -2.0, 3.0], np.float32)}}
  phi = {"a": rng.uniform(size=(3, 4)).astype(np.float32), "b": {"c": np.array([5.0, 0.5, 0.25], np.float32)}}
  expected = np.sum(phi["a"] * np.abs(theta["a"])) + (5.0 * 0.0 + 0.5 * 2.0 + 0.25 * 3.0)
  np.testing.assert_allclose(float(metareg.regularizer(phi, theta)), expected, rtol=1e-6)
  # ∇_θ R = φ · sign(θ): the subgradient 0 where θ_j = 0 (jnp.abs would give +φ_j there)
  grad = jax.grad(metareg.regularizer, argnums=1)(phi, theta)
  np.testing.assert_allclose(grad["a"], phi["a"] * np.sign(theta["a"]), rtol=1e-6)
  np.testing.assert_allclose(grad["b"]["c"], [0.0, -0.5, 0.25], rtol=1e-6)


@pytest.mark.parametrize("steps", [1, 2])
def test_meta_gradient_closed_form_on_a_diagonal_quadratic(steps):
  """L_a(β) = ½ Σ h_j (β_j − c_j)², L_b(β) = Σ w_j β_j. By hand (elementwise, s_k = sign β_k):
  β_1 = β_0 − α(h(β_0 − c) + φ s_0), ∂β_1/∂φ = −α s_0,
  β_2 = β_1 − α(h(β_1 − c) + φ s_1), ∂β_2/∂φ = −α(1 − αh) s_0 − α s_1;  ∂L_b/∂φ = w ∂β_l/∂φ."""
  rng = np.random.default_rng(3)
  n, alpha = 6, 0.3
  h = rng.uniform(0.5, 2.0, n)
  c = rng.normal(size=n)
  w = rng.normal(size=n)
  beta0 = np.array([0.8, -0.4, 1.5, -1.2, 0.3, -0.9])
  phi = rng.uniform(0.05, 0.2, n)
  inner = lambda b: 0.5 * jnp.sum(h * (b["x"] - c) ** 2)
  outer = lambda b: jnp.sum(w * b["x"])
  grad = jax.grad(lambda p: metareg.meta_objective(inner, outer, {"x": jnp.asarray(beta0)}, {"x": p},
                                                   inner_lr=alpha, steps=steps)[0])(jnp.asarray(phi))
  s0 = np.sign(beta0)
  beta1 = beta0 - alpha * (h * (beta0 - c) + phi * s0)
  d1 = -alpha * s0
  expected = w * d1 if steps == 1 else w * ((1 - alpha * h) * d1 - alpha * np.sign(beta1))
  np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-7)
  # the value: L_b(β_l) and L_a(β_0)
  value, first = metareg.meta_objective(inner, outer, {"x": jnp.asarray(beta0)}, {"x": jnp.asarray(phi)},
                                        inner_lr=alpha, steps=1)
  np.testing.assert_allclose(float(value), np.sum(w * beta1), rtol=1e-5)
  np.testing.assert_allclose(float(first), 0.5 * np.sum(h * (beta0 - c) ** 2), rtol=1e-5)


def test_meta_gradient_matches_float64_central_differences(reference):
  """The step's φ update (SGD at 1: φ − φ' = ∂L_b/∂φ) against float64 central differences of
  φ ↦ L_b(ψ, β_2(φ)), β_k = β_{k−1} − α(∇L_a(β_{k−1}) + φ·sign β_{k−1}), written here from the
  paper (the regularizer's gradient by hand), at the step's updated ψ and θ_a."""
  config, ref = reference["config"], reference
  a, b = int(ref["metrics1"]["domain_a"]), int(ref["metrics1"]["domain_b"])
  assert a != b
  phi0, phi1 = ref["state"].nets["regularizer"].params, ref["state1"].nets["regularizer"].params
  step_grad = (flat(phi0) - flat(phi1)) / META_LR
  psi, _ = encoder_decoder(ref["state1"].params)
  theta_a = jax.tree.map(lambda x: x[a], ref["state1"].nets["tasks"].params)
  x_a, y_a = site_rows(ref["batch"], a)
  x_b, y_b = site_rows(ref["batch"], b)
  with float64():
    to64 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), t)
    model = model_of(config, jnp.float64)
    stats = to64(ref["state1"].batch_stats)   # train mode: not read
    psi, theta_a, x_a, x_b = to64(psi), to64(theta_a), to64(x_a), to64(x_b)
    loss = lambda params, x, y: hand_loss(model, config, params, stats, x, y)

    def meta_loss(phi):
      beta = theta_a
      for _ in range(INNER_STEPS):
        g = jax.grad(lambda bb: loss({**psi, **bb}, x_a, y_a))(beta)
        beta = jax.tree.map(lambda bb, gg, p: bb - INNER_LR * (gg + p * jnp.sign(bb)), beta, g, phi)
      return loss({**psi, **beta}, x_b, y_b)

    meta_loss = jax.jit(meta_loss)
    phi = to64(phi0)
    exact = flat(jax.jit(jax.grad(meta_loss))(phi))
    _, unravel = jax.flatten_util.ravel_pytree(phi)
    rng = np.random.default_rng(1)
    directions = [step_grad / np.linalg.norm(step_grad)] + [d / np.linalg.norm(d) for d in rng.normal(size=(2, step_grad.size))]
    eps = 1e-6
    central = np.array([(float(meta_loss(jax.tree.map(lambda p, v: p + eps * v, phi, unravel(jnp.asarray(d)))))
                         - float(meta_loss(jax.tree.map(lambda p, v: p - eps * v, phi, unravel(jnp.asarray(d))))))
                        / (2 * eps) for d in directions])
  norm = np.linalg.norm(exact)
  assert norm > 1e-4
  np.testing.assert_allclose(np.stack(directions) @ exact, central, rtol=0, atol=1e-6 * norm)
  np.testing.assert_allclose(np.stack(directions) @ step_grad, central, rtol=0, atol=1e-4 * norm)
  assert np.linalg.norm(step_grad - exact) < 1e-4 * norm
  np.testing.assert_allclose(ref["metrics1"]["meta_grad_norm"], norm, rtol=1e-4)


# --- The two phases ------------------------------------------------------------------------------


def test_supervised_update_then_only_phi_changes_in_the_meta_update(reference):
  """ψ and θ_i after a meta-training step = a hand SGD step on Σ_i L_i(ψ, θ_i), one network call per
  site: the meta update changed nothing else; φ changed (every leaf); the evaluated network is
  F + the mean task network; the final network's optimizer and init are untouched."""
  config, ref = reference["config"], reference
  state, state1 = ref["state"], ref["state1"]
  model = model_of(config)
  psi, _ = encoder_decoder(state.params)
  enc_stats, _ = encoder_decoder(state.batch_stats)
  tasks, task_stats = state.nets["tasks"].params, state.nets["tasks"].batch_stats

  def total(psi, thetas):
    out, new_stats = 0.0, []
    for i in range(K):
      theta = jax.tree.map(lambda x: x[i], thetas)
      stats = {**enc_stats, **jax.tree.map(lambda x: x[i], task_stats)}
      x, y = site_rows(ref["batch"], i)
      loss, new = hand_loss_and_stats(model, config, {**psi, **theta}, stats, x, y)
      out += loss
      new_stats.append(new)
    return out, new_stats

  (value, site_stats), (g_psi, g_tasks) = jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))(psi, tasks)
  np.testing.assert_allclose(ref["metrics1"]["loss"], float(value), rtol=1e-5)
  new_psi, _ = encoder_decoder(state1.params)
  for got, p, g in zip(jax.tree.leaves(new_psi), jax.tree.leaves(psi), jax.tree.leaves(g_psi)):
    np.testing.assert_allclose(got, p - LR * np.asarray(g), atol=2e-6)
  for got, p, g in zip(jax.tree.leaves(state1.nets["tasks"].params), jax.tree.leaves(tasks), jax.tree.leaves(g_tasks)):
    np.testing.assert_allclose(got, p - LR * np.asarray(g), atol=2e-6)
  # BatchNorm: θ_i's running statistics from site i's own pass, F's the mean of the K per-site
  # updates, the evaluated network's the means of both (the meta update changes none of them)
  site_stats = [encoder_decoder(host(s)) for s in site_stats]
  for i in range(K):
    got = jax.tree.map(lambda x: x[i], state1.nets["tasks"].batch_stats)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(site_stats[i][1])):
      np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
  new_enc_stats, new_dec_stats = encoder_decoder(state1.batch_stats)
  for part, got in ((0, new_enc_stats), (1, new_dec_stats)):
    expected = jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0), *[s[part] for s in site_stats])
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
      np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
    assert not leaves_equal(got, encoder_decoder(state.batch_stats)[part])
  # φ: every leaf moved (the meta update's only effect)
  for p0, p1 in zip(jax.tree.leaves(state.nets["regularizer"].params), jax.tree.leaves(state1.nets["regularizer"].params)):
    assert not np.array_equal(p0, p1)
  # evaluated: F + the mean of the task networks
  _, decoder = encoder_decoder(state1.params)
  for got, stacked in zip(jax.tree.leaves(decoder), jax.tree.leaves(state1.nets["tasks"].params)):
    np.testing.assert_allclose(got, stacked.mean(axis=0), rtol=1e-6, atol=1e-7)
  assert leaves_equal(state.opt_state, state1.opt_state)
  assert leaves_equal(state.nets["final_init"], state1.nets["final_init"])
  assert int(state1.step) == 1 and int(state1.first_bad_step) == 0


def test_final_phase_trains_f_and_a_fresh_t_on_the_regularized_loss(reference):
  """At step N1 ('scratch'): θ starts from its init; loss = L(ψ, θ) + Σ φ|θ| (numpy sum); the SGD
  update is −LR·(∇L + φ·sign θ) on θ and −LR·∇L on ψ; φ and the task networks are frozen."""
  config, ref = reference["config"], reference
  before, after = ref["state1_at_n1"], ref["state2"]
  psi, _ = encoder_decoder(before.params)
  enc_stats, _ = encoder_decoder(before.batch_stats)
  theta, dec_stats = before.nets["final_init"].params, before.nets["final_init"].batch_stats
  phi = before.nets["regularizer"].params
  model = model_of(config)
  params = {**psi, **theta}
  (seg, new_stats), grads = jax.jit(jax.value_and_grad(
      lambda p: hand_loss_and_stats(model, config, p, {**enc_stats, **dec_stats}, ref["batch"]["image"],
                                    ref["batch"]["label"]), has_aux=True))(params)
  reg = sum(np.sum(np.asarray(p, np.float64) * np.abs(np.asarray(t, np.float64)))
            for p, t in zip(jax.tree.leaves(phi), jax.tree.leaves(theta)))
  np.testing.assert_allclose(ref["metrics2"]["loss_reg"], reg, rtol=1e-5)
  np.testing.assert_allclose(ref["metrics2"]["loss"], float(seg) + reg, rtol=1e-5)
  new_psi, new_theta = encoder_decoder(after.params)
  g_psi, g_theta = encoder_decoder(grads)
  for got, p, g in zip(jax.tree.leaves(new_psi), jax.tree.leaves(psi), jax.tree.leaves(g_psi)):
    np.testing.assert_allclose(got, p - LR * np.asarray(g), atol=2e-6)
  for got, p, g, f in zip(jax.tree.leaves(new_theta), jax.tree.leaves(theta), jax.tree.leaves(g_theta),
                          jax.tree.leaves(phi)):
    np.testing.assert_allclose(got, p - LR * (np.asarray(g) + f * np.sign(p)), atol=2e-6)
  assert leaves_equal(before.nets, after.nets)
  # BatchNorm: the pooled pass's running statistics, the decoder's from its fresh init's
  for g, e in zip(jax.tree.leaves(after.batch_stats), jax.tree.leaves(host(new_stats))):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
  assert not leaves_equal(after.batch_stats, {**enc_stats, **dec_stats})


# --- Data parallelism and a whole run ------------------------------------------------------------


def test_meta_step_on_two_devices_equals_one_device(reference):
  """The pmapped meta-training step on the same global batch (2 devices x one slice per site)
  equals the one-device step: the supervised update and the second-order φ update."""
  config, ref = reference["config"], reference
  multi = metareg.make_step(config, RunInfo(C, (SIZE, SIZE, 1), axis_name=parallel.AXIS_NAME, domains=("A", "B")))
  runner = parallel.DataParallel(multi.steps[0], num_devices=2)
  new, metrics = runner.step(runner.replicate(ref["state"]), ref["batch"], ref["key"])
  got = runner.unreplicate(new)
  phi0, phi1 = ref["state"].nets["regularizer"].params, ref["state1"].nets["regularizer"].params
  phi_update = flat(phi0) - flat(phi1)
  assert np.linalg.norm(flat(got.nets["regularizer"].params) - flat(phi1)) < 1e-4 * np.linalg.norm(phi_update)
  for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(ref["state1"].params)):
    np.testing.assert_allclose(a, b, atol=2e-6)
  for a, b in zip(jax.tree.leaves(got.nets["tasks"]), jax.tree.leaves(ref["state1"].nets["tasks"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)
  np.testing.assert_allclose(metrics["loss_meta_test"], ref["metrics1"]["loss_meta_test"], rtol=1e-5)
  assert float(metrics["domain_a"]) == float(ref["metrics1"]["domain_a"])
  # the pair (a, b) is drawn once for the step, the same on every device (per-device draws would
  # make each device meta-train on another pair), for several step keys
  for seed in range(4):
    # runner._step: the step's compiled program as `runner.step` calls it, metrics of every device
    _, per_device = runner._step(runner.replicate(ref["state"]), parallel.shard_batch(ref["batch"], 2),
                                 jax.random.PRNGKey(100 + seed))
    pairs = np.stack([np.asarray(per_device["domain_a"]), np.asarray(per_device["domain_b"])], axis=1)
    assert (pairs == pairs[0]).all() and pairs[0, 0] != pairs[0, 1]


def test_run_end_to_end(tmp_path):
  """Through the registry and the trainer on 4 (fake) devices: 2 meta-training + 2 final steps,
  the final F + T evaluated on every site; the logged φ stays >= 0 (projection) and grows from 0,
  and the final phase's loss carries a positive R_φ."""
  root = make_sites_dataset(tmp_path / "toy", sites=("A", "B", "C"), cases=3)
  config = tiny_config(root, **{"method": "metareg", "model.depth": 1, "batch_size": 8, "num_steps": 4,
                                "log_every": 1, "metareg.meta_lr": 100.0,
                                "metareg.meta_fraction": 0.5, "eval_every": 4, "checkpoint.every": 4,
                                "eval.selection": "last", "eval.distances": False,
                                "data.split.val_fraction": 0.0})
  run = tmp_path / "run"
  result = train_lib.train_and_evaluate(config, run)
  assert "| MetaReg |" in (run / "results.md").read_text()
  assert {r["site"] for r in result["records"]} == {"A", "B", "C"}
  assert all(np.isfinite(r["dice"]).all() for r in result["records"])
  # phase 1 logged φ's range: φ starts at 0 (phi_init) and is projected on φ >= 0 after each update
  logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  meta = [m for m in logged if m.get("phase") == 0.0]
  assert meta and all(m["phi_min"] >= 0.0 for m in meta) and any(m["phi_max"] > 0.0 for m in meta)
  assert any(m.get("phase") == 1.0 and m["loss_reg"] > 0.0 for m in logged)
