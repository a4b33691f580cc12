"""ADDA and PnP-AdaNet (methods/uda/adda.py, pnp_adanet.py): each sub-update changes exactly the
parameters it owns, one step of each sub-update against the optimizer step on hand-written losses
(no library loss), the divergence flag on a NaN target, the config checks, the phase switch, the
PnP schedule and losses by hand, pmap = one device, and both methods end to end on a tiny
source + target dataset."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import every_leaf_changed, leaves_equal, make_sites_dataset, tiny_config
from medgen_jax import parallel, train_lib
from medgen_jax.methods import deepall
from medgen_jax.methods.base import RunInfo, init_net
from medgen_jax.methods.uda import adda, pnp_adanet
from medgen_jax.methods.uda import common

INFO = RunInfo(num_classes=4, input_shape=(16, 16, 1))
AXIS_INFO = RunInfo(num_classes=4, input_shape=(16, 16, 1), axis_name=parallel.AXIS_NAME)
UDA = {"data.sites": ("A",), "data.held_out": ("C",), "data.target_adaptation": True,
       "eval.selection": "last"}
ADDA = {"method": "adda", "adda.pretrain_steps": 2, "adda.disc_features": 4, "adda.disc_layers": 2}
# μ = 1 and RMSProp from a zero mean square: updates large enough to compare (the released μ =
# 0.002 and TF's initial mean square 1 make the first updates ~1e-9).
PNP = {"method": "pnp_adanet", "pnp.pretrain_steps": 2, "pnp.critic_warmup_steps": 1, "pnp.critic_steps": 2,
       "pnp.critic_steps_growth_every": 0, "pnp.levels": ("down1", "bottleneck"), "pnp.adapt_levels": 1,
       "pnp.critic_features": 4, "pnp.mask_critic_features": 4, "pnp.critic_layers": 2,
       "pnp.mu": 1.0, "pnp.rmsprop_initial_scale": 0.0, "pnp.learning_rate": 1e-3}


def config_of(method_overrides, root="unused", **more):
  return tiny_config(root, **{**UDA, **method_overrides, **more})


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  return {"source": {"image": rng.normal(size=(4, 16, 16, 1)).astype(np.float32),
                     "label": rng.integers(0, 4, size=(4, 16, 16)).astype(np.int32),
                     "domain": np.zeros(4, np.int32)},
          "target": {"image": (0.5 * rng.normal(size=(4, 16, 16, 1)) + 1.0).astype(np.float32),
                     "domain": np.ones(4, np.int32)}}


def at_step(state, step):
  return state.replace(step=jnp.asarray(step, jnp.int32))


def with_nan_target(batch):
  """The batch with one NaN pixel in its first target image (train-mode BatchNorm spreads it)."""
  image = np.array(batch["target"]["image"])
  image[0, 3, 3, 0] = np.nan
  return dict(batch, target=dict(batch["target"], image=image))


def assert_trees_close(got, want, *, rtol=1e-4, atol=1e-7):
  for path, a in jax.tree_util.tree_leaves_with_path(got):
    b = want
    for k in path:
      b = b[k.key]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol, err_msg=str(path))


def tree_norm(tree) -> float:
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree))))


def half_l2(tree) -> float:
  """Σ ½‖W‖² over the leaves named 'kernel' (TF's l2_loss), written out."""
  return sum(0.5 * jnp.sum(jnp.square(leaf)) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
             if path[-1].key == "kernel")


# --- ADDA ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adda_parts():
  config = config_of(ADDA)
  return config, adda.init_state(jax.random.PRNGKey(0), config, INFO), jax.jit(adda.make_step(config, INFO))


def test_adda_sub_updates_change_only_what_they_own(adda_parts, batch):
  config, state, _ = adda_parts
  state = at_step(state, 2)
  key = jax.random.PRNGKey(3)

  @jax.jit   # one compilation for both sub-updates, each run on its own
  def sub_updates(state, batch, key):
    after_d, metrics = adda.disc_update(state, batch, key, config, INFO)
    return after_d, metrics, adda.encoder_update(after_d, batch, key, config, INFO)[0]

  after_d, metrics, after_e = sub_updates(state, batch, key)
  assert np.isfinite(float(metrics["loss_disc"]))
  assert every_leaf_changed(state.nets["disc"].params, after_d.nets["disc"].params)
  for part in ("params", "batch_stats", "opt_state", "step"):
    assert leaves_equal(getattr(state, part), getattr(after_d, part)), part
  assert leaves_equal(state.nets["source"], after_d.nets["source"])

  encoder = common.whole_encoder(config.model.depth)
  assert {n for n in state.params if encoder(n)} == {"down0", "down1", "bottleneck"}
  for name in state.params:
    if encoder(name):   # the target encoder: kernels, BN scales/offsets and running statistics move
      assert every_leaf_changed(after_d.params[name], after_e.params[name]), name
      assert every_leaf_changed(after_d.batch_stats[name], after_e.batch_stats[name]), name
    else:               # decoder (upconv*, up*) and head: bit-identical, statistics included
      assert leaves_equal(after_d.params[name], after_e.params[name]), name
      assert leaves_equal(after_d.batch_stats.get(name, {}), after_e.batch_stats.get(name, {})), name
  assert leaves_equal(after_d.nets, after_e.nets)            # D and the source model
  assert leaves_equal(after_d.opt_state["source"], after_e.opt_state["source"])


def test_adda_phase_switch_is_exact_and_the_source_model_stays_frozen(adda_parts, batch):
  config, state, step = adda_parts
  init = state
  for i in range(config.adda.pretrain_steps):
    assert int(adda.phase(state.step, config)) == 0
    state, metrics = step(state, batch, jax.random.PRNGKey(i))
    assert float(metrics["phase"]) == 0 and np.isnan(float(metrics["loss_disc"]))
    assert leaves_equal(state.nets["source"].params, state.params)
    assert leaves_equal(state.nets["source"].batch_stats, state.batch_stats)
  assert int(state.step) == config.adda.pretrain_steps and int(adda.phase(state.step, config)) == 1
  assert every_leaf_changed(init.params["head"], state.params["head"])   # phase 1 trained
  assert leaves_equal(init.nets["disc"], state.nets["disc"])               # ... and left D alone
  source = state.nets["source"]
  adapted, metrics = step(state, batch, jax.random.PRNGKey(9))
  assert float(metrics["phase"]) == 1 and np.isnan(float(metrics["loss_ce"]))
  assert int(adapted.first_bad_step) == 0 and int(adapted.step) == config.adda.pretrain_steps + 1
  assert leaves_equal(source, adapted.nets["source"])
  assert leaves_equal(state.params["head"], adapted.params["head"])
  assert not leaves_equal(state.params["down0"], adapted.params["down0"])


def test_adda_pmapped_adaptation_step_equals_one_device(adda_parts, batch):
  config, state, step = adda_parts
  state = at_step(state, config.adda.pretrain_steps)
  key = jax.random.PRNGKey(5)
  single, m1 = step(state, batch, key)
  runner = parallel.DataParallel(adda.make_step(config, AXIS_INFO), num_devices=2, donate=False)
  multi, m2 = runner.step(runner.replicate(state), batch, key)
  multi = runner.unreplicate(multi)
  np.testing.assert_allclose(m1["loss_disc"], m2["loss_disc"], rtol=1e-5)
  np.testing.assert_allclose(m1["loss_adv"], m2["loss_adv"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(multi)):
    np.testing.assert_allclose(np.asarray(a), b, atol=2e-6, rtol=1e-5)
  moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
              for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(single.params)))
  assert moved > 1e-4   # Adam's first step moves by ~learning_rate = 2e-4
  assert leaves_equal(state.nets["source"], single.nets["source"])


def test_adda_adaptation_step_is_sgd_on_the_hand_written_gan_losses(batch, monkeypatch):
  """Oracle (no library loss): with phase 2's optimizer factory `adda.adam` patched to SGD(1),
  D moves by −∇ψ[−mean log σ(D(f_s)) − mean log(1 − σ(D(f_t)))] (source = 1) and the target
  encoder by −∇θ[−mean log σ(D'(M_t(x_t)))] against the updated D' (inverted labels), on the
  encoder leaves only. D on the decoder block up1, so the frozen blocks get non-zero gradients."""
  monkeypatch.setattr(adda, "adam", lambda config: optax.sgd(1.0))
  config = config_of(ADDA, **{"adda.level": "up1"})
  state = at_step(adda.init_state(jax.random.PRNGKey(0), config, INFO), config.adda.pretrain_steps)
  # Two different segmenters for M_s (nets['source']) and M_t (top level), as after some adaptation.
  shifted = jax.tree.map(lambda p: p * 1.1 + 0.01, state.params)
  state = state.replace(params=shifted)
  new, metrics = jax.jit(lambda s, b, k: adda.adapt_step(s, b, k, config, INFO))(state, batch, jax.random.PRNGKey(1))
  assert int(new.first_bad_step) == 0

  model, disc = deepall.segmenter(config, INFO, train=True), adda.discriminator(config)

  def features(params, stats, images):   # train-mode BatchNorm, no dropout in the tiny U-Net
    (_, levels), _ = model.apply({"params": params, "batch_stats": stats}, images, train=True,
                                 return_levels=True, mutable=["batch_stats"])
    return levels["up1"]

  src = state.nets["source"]
  f_s = features(src.params, src.batch_stats, batch["source"]["image"])
  f_t = features(state.params, state.batch_stats, batch["target"]["image"])

  def disc_loss(psi):
    d_s, d_t = disc.apply({"params": psi}, f_s), disc.apply({"params": psi}, f_t)
    return jnp.mean(-jnp.log(jax.nn.sigmoid(d_s))) + jnp.mean(-jnp.log(1 - jax.nn.sigmoid(d_t)))

  psi = state.nets["disc"].params
  g_psi = jax.grad(disc_loss)(psi)
  assert tree_norm(g_psi) > 1e-3
  assert_trees_close(new.nets["disc"].params, jax.tree.map(lambda p, g: p - g, psi, g_psi))

  psi_new = new.nets["disc"].params

  def encoder_loss(params):
    d_t = disc.apply({"params": psi_new}, features(params, state.batch_stats, batch["target"]["image"]))
    return jnp.mean(-jnp.log(jax.nn.sigmoid(d_t)))

  g = jax.grad(encoder_loss)(state.params)
  encoder = {"down0", "down1", "bottleneck"}
  assert tree_norm({n: g[n] for n in state.params if n not in encoder}) > 1e-4   # frozen, yet reached
  for name in state.params:
    if name in encoder:
      assert_trees_close(new.params[name], jax.tree.map(lambda p, d: p - d, state.params[name], g[name]))
    else:
      assert leaves_equal(new.params[name], state.params[name]), name
  enc_norm = tree_norm({n: g[n] for n in encoder})
  np.testing.assert_allclose(metrics["encoder_grad_norm"], enc_norm, rtol=1e-4)   # the trainable part
  np.testing.assert_allclose(metrics["loss_adv"], encoder_loss(state.params), rtol=1e-5)
  np.testing.assert_allclose(metrics["loss_disc"], disc_loss(psi), rtol=1e-5)


def test_adda_adaptation_step_flags_a_non_finite_target(adda_parts, batch):
  config, state, step = adda_parts
  s = config.adda.pretrain_steps
  new, metrics = step(at_step(state, s), with_nan_target(batch), jax.random.PRNGKey(2))
  assert float(metrics["phase"]) == 1
  assert int(new.first_bad_step) == s + 1


def test_adda_validate_refuses_val_selection_and_pretrain_steps_outside_the_run():
  adda.validate(config_of(ADDA))
  with pytest.raises(ValueError, match=r"eval.selection='val'.*use eval.selection='last' \(or 'oracle'"):
    adda.validate(config_of(ADDA, **{"eval.selection": "val"}))
  for steps in (0, -1, 6, 7):   # num_steps = 6
    with pytest.raises(ValueError, match=f"adda.pretrain_steps={steps}"):
      adda.validate(config_of(dict(ADDA, **{"adda.pretrain_steps": steps})))


# --- PnP-AdaNet ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pnp_parts():
  config = config_of(PNP)
  return config, pnp_adanet.init_state(jax.random.PRNGKey(0), config, INFO), jax.jit(pnp_adanet.make_step(config, INFO))


def test_pnp_schedule_against_hand_lists():
  S, C, D = pnp_adanet.SOURCE, pnp_adanet.CRITIC, pnp_adanet.DAM
  got = pnp_adanet.schedule(np.arange(12), pretrain_steps=2, warmup_steps=1, critic_steps=2)
  assert list(np.asarray(got)) == [S, S, C, C, C, D, C, C, D, C, C, D]
  # growth: +1 critic step per cycle every 2 cycles: (C D) x2, (C C D) x2, (C C C D) x2, ...
  got = pnp_adanet.schedule(np.arange(20), pretrain_steps=1, warmup_steps=0, critic_steps=1, growth_every=2)
  assert list(np.asarray(got)) == [S, C, D, C, D, C, C, D, C, C, D, C, C, C, D, C, C, C, D, C]

  def reference(n, p, w, k, g):   # one cycle after another
    out, cycle = [S] * p + [C] * w, 0
    while len(out) < n:
      out += [C] * (k + (cycle // g if g else 0)) + [D]
      cycle += 1
    return out[:n]

  for k, g in ((20, 300), (3, 7), (20, 0)):
    got = pnp_adanet.schedule(np.arange(20_000), pretrain_steps=5, warmup_steps=11, critic_steps=k, growth_every=g)
    assert list(np.asarray(got)) == reference(20_000, 5, 11, k, g), (k, g)
  config = config_of(PNP)
  assert int(pnp_adanet.schedule_of(config, 5)) == D


def test_pnp_losses_by_hand():
  df_s, df_t = jnp.array([1.0, 3.0]), jnp.array([0.5, -1.5])       # means 2, -0.5
  dm_s, dm_t = jnp.array([[0.2], [0.4]]), jnp.array([[1.0], [2.0]])  # means 0.3, 1.5
  mu, lam = 0.002, 0.3
  expected = -mu * (2.0 - -0.5) + lam * -mu * (0.3 - 1.5) + 0.01 + lam * 0.02
  got = pnp_adanet.critic_loss(df_s, df_t, dm_s, dm_t, mu=mu, mask_weight=lam, l2_f=0.01, l2_m=0.02)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  np.testing.assert_allclose(pnp_adanet.generator_loss(df_t, dm_t, mu=mu, mask_weight=lam, l2=0.01),
                             -mu * -0.5 + lam * -mu * 1.5 + 0.01, rtol=1e-6)
  # the warm-up's λ_m = 0 leaves the feature critic only
  np.testing.assert_allclose(pnp_adanet.critic_loss(df_s, df_t, dm_s, dm_t, mu=mu, mask_weight=0.0),
                             -mu * 2.5, rtol=1e-6)


def test_pnp_feature_stack_pools_to_the_coarsest_level():
  x = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
  pooled = pnp_adanet.pool_to(x, 2)
  np.testing.assert_allclose(pooled[0, :, :, 0], [[2.5, 4.5], [10.5, 12.5]])   # means of 2x2 windows
  levels = {"down1": jnp.ones((2, 8, 8, 3)), "bottleneck": jnp.zeros((2, 4, 4, 5))}
  logits = jnp.zeros((2, 16, 16, 4))
  stack, probs = pnp_adanet.critic_inputs(logits, levels, ("down1", "bottleneck"))
  assert stack.shape == (2, 4, 4, 3 + 5 + 4) and probs.shape == (2, 16, 16, 4)
  np.testing.assert_allclose(stack[..., :3], 1.0)
  np.testing.assert_allclose(stack[..., 8:], 0.25)   # the pooled softmax of equal logits


def test_pnp_sub_updates_change_only_what_they_own(pnp_parts, batch):
  """Each PnP step runs one sub-update (critic_update or dam_update), so the jitted step shows
  each on its own (one compilation for both)."""
  config, state, step = pnp_parts
  state = at_step(state, 3)   # after the warm-up: λ_m > 0, both critics learn
  key = jax.random.PRNGKey(4)
  after_c, metrics = step(state, batch, key)
  assert float(metrics["phase"]) == pnp_adanet.CRITIC and np.isnan(float(metrics["loss_dam"]))
  assert float(metrics["mask_weight"]) == pytest.approx(config.pnp.mask_weight)
  for name in ("critic", "mask_critic"):
    assert not leaves_equal(state.nets[name].params, after_c.nets[name].params), name
    for path, leaf in jax.tree_util.tree_leaves_with_path(after_c.nets[name].params):
      if path[-1].key == "kernel":
        assert np.max(np.abs(leaf)) <= config.pnp.clip, (name, path)
  for part in ("params", "batch_stats", "opt_state"):
    assert leaves_equal(getattr(state, part), getattr(after_c, part)), part
  assert leaves_equal(state.nets["source"], after_c.nets["source"])

  after_d, metrics = step(at_step(after_c, 5), batch, key)
  assert float(metrics["phase"]) == pnp_adanet.DAM and np.isnan(float(metrics["loss_critic"]))
  assert every_leaf_changed(after_c.params["down0"], after_d.params["down0"])   # the DAM
  for name in after_c.params:
    if name != "down0":
      assert leaves_equal(after_c.params[name], after_d.params[name]), name
  assert leaves_equal(after_c.batch_stats, after_d.batch_stats)
  assert leaves_equal(after_c.nets, after_d.nets)   # both critics and the source model


def test_pnp_pmapped_critic_and_dam_steps_equal_one_device(pnp_parts, batch):
  config, state, step = pnp_parts
  state = at_step(state, 4)   # step 4: critic, step 5: DAM
  runner = parallel.DataParallel(pnp_adanet.make_step(config, AXIS_INFO), num_devices=2, donate=False)
  single, multi = state, runner.replicate(state)
  for s in (4, 5):
    key = jax.random.PRNGKey(s)
    single, m1 = step(single, batch, key)
    multi, m2 = runner.step(multi, batch, key)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    assert float(m1["phase"]) == (pnp_adanet.CRITIC if s == 4 else pnp_adanet.DAM)
  multi = runner.unreplicate(multi)
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(multi)):
    np.testing.assert_allclose(np.asarray(a), b, atol=2e-6, rtol=1e-5)
  for before, after in ((state.params["down0"], single.params["down0"]), (state.nets["critic"].params,
                                                                         single.nets["critic"].params)):
    moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    assert moved > 1e-3   # RMSProp's first step from a zero mean square: ~3·learning_rate
  assert int(single.first_bad_step) == 0


def _pnp_hand_inputs(config, params, batch_stats, images):
  """The critics' inputs written out: down1 average-pooled 2x2 to the bottleneck's 4x4, the
  bottleneck, the softmax pooled 4x4; and the full-resolution softmax (PNP levels)."""
  logits, levels = deepall.segmenter(config, INFO, train=False).apply(
      {"params": params, "batch_stats": batch_stats}, images, train=False, return_levels=True)
  probs = jax.nn.softmax(logits, axis=-1)
  pool = lambda x, f: x.reshape(x.shape[0], x.shape[1] // f, f, x.shape[2] // f, f, x.shape[3]).mean(axis=(2, 4))
  assert levels["bottleneck"].shape[1:3] == (4, 4)
  return jnp.concatenate([pool(levels["down1"], 2), levels["bottleneck"], pool(probs, 4)], axis=-1), probs


def _tf1_rmsprop_step(config, params, grads, clip=None):
  """TF1 RMSProp's first step: ms = 0.9·ms0 + 0.1·g², p − lr·g/√(ms + 1e-10), ms0 = the initial scale;
  then kernels clipped to ±clip."""
  c = config.pnp
  out = jax.tree.map(lambda p, g: p - c.learning_rate * g / jnp.sqrt(0.9 * c.rmsprop_initial_scale + 0.1 * g * g + 1e-10),
                     params, grads)
  if clip is None:
    return out
  return jax.tree_util.tree_map_with_path(lambda path, p: jnp.clip(p, -clip, clip) if path[-1].key == "kernel" else p, out)


def test_pnp_critic_step_is_tf1_rmsprop_on_the_hand_written_critic_loss(pnp_parts, batch):
  """Clip 1 (a no-op on the 0.02-scale kernels, so a step that does not learn cannot hide behind
  the clip): both critics move by one hand TF1-RMSProp step on
  μ[mean D_f(F_t) − mean D_f(F_s)] + λ_m μ[mean D_m(M_t) − mean D_m(M_s)] + w μ/K (Σ½‖W_f‖² + λ_m Σ½‖W_m‖²),
  every leaf (biases included) moves, and both Wasserstein estimates rise on the same batch."""
  base_config, state, _ = pnp_parts
  config = config_of(PNP, **{"pnp.clip": 1.0})
  state = at_step(state, 3)   # after the warm-up: λ_m = pnp.mask_weight
  src = state.nets["source"]
  # Distinct source and target networks (at init the target network is the source model's copy).
  state = state.replace(params=jax.tree.map(lambda p: p * 1.1 + 0.01, state.params))
  new, metrics = jax.jit(lambda s, b, k: pnp_adanet.critic_update(s, b, k, config, INFO))(
      state, batch, jax.random.PRNGKey(1))
  c, lam = config.pnp, config.pnp.mask_weight
  f_s, m_s = _pnp_hand_inputs(config, src.params, src.batch_stats, batch["source"]["image"])
  f_t, m_t = _pnp_hand_inputs(config, state.params, state.batch_stats, batch["target"]["image"])
  critic_f, critic_m = pnp_adanet.critics(config)

  def loss(psi_f, psi_m):
    mean_f = lambda x: jnp.mean(critic_f.apply({"params": psi_f}, x))
    mean_m = lambda x: jnp.mean(critic_m.apply({"params": psi_m}, x))
    return (c.mu * (mean_f(f_t) - mean_f(f_s)) + lam * c.mu * (mean_m(m_t) - mean_m(m_s))
            + c.weight_decay * c.mu / c.critic_steps * (half_l2(psi_f) + lam * half_l2(psi_m)))

  def wasserstein(psi_f, psi_m):
    w_f = jnp.mean(critic_f.apply({"params": psi_f}, f_s)) - jnp.mean(critic_f.apply({"params": psi_f}, f_t))
    w_m = jnp.mean(critic_m.apply({"params": psi_m}, m_s)) - jnp.mean(critic_m.apply({"params": psi_m}, m_t))
    return float(w_f), float(w_m)

  old_f, old_m = state.nets["critic"].params, state.nets["mask_critic"].params
  new_f, new_m = new.nets["critic"].params, new.nets["mask_critic"].params
  g_f, g_m = jax.grad(loss, argnums=(0, 1))(old_f, old_m)
  assert_trees_close(new_f, _tf1_rmsprop_step(config, old_f, g_f, c.clip), rtol=1e-4, atol=1e-8)
  assert_trees_close(new_m, _tf1_rmsprop_step(config, old_m, g_m, c.clip), rtol=1e-4, atol=1e-8)
  np.testing.assert_allclose(metrics["loss_critic"], loss(old_f, old_m), rtol=1e-5, atol=1e-7)
  for old, moved in ((old_f, new_f), (old_m, new_m)):
    # Every leaf moves, conv biases included; the head's bias cancels in mean D(s) − mean D(t)
    # (zero gradient, no L2 on biases) and stays.
    assert every_leaf_changed({k: v for k, v in old.items() if k != "head"},
                              {k: v for k, v in moved.items() if k != "head"})
    assert not np.array_equal(old["head"]["kernel"], moved["head"]["kernel"])
    assert np.array_equal(old["head"]["bias"], moved["head"]["bias"])
  (wf0, wm0), (wf1, wm1) = wasserstein(old_f, old_m), wasserstein(new_f, new_m)
  np.testing.assert_allclose(metrics["wasserstein"], wf0, rtol=1e-5, atol=1e-7)
  assert wf1 > wf0 and wm1 > wm0, (wf0, wf1, wm0, wm1)


def test_pnp_dam_step_is_tf1_rmsprop_on_the_hand_written_generator_loss(pnp_parts, batch):
  """The DAM (down0) moves by one hand TF1-RMSProp step on
  −μ mean D_f(F_t) − λ_m μ mean D_m(M_t) + w μ Σ½‖W_down0‖², which raises the critics' mean score
  of the target; dam_grad_norm is the norm of the DAM's gradient only."""
  config, state, step = pnp_parts
  state = at_step(state, 5)
  new, metrics = step(state, batch, jax.random.PRNGKey(1))
  assert float(metrics["phase"]) == pnp_adanet.DAM
  c, lam = config.pnp, config.pnp.mask_weight
  critic_f, critic_m = pnp_adanet.critics(config)
  psi_f, psi_m = state.nets["critic"].params, state.nets["mask_critic"].params

  def scores(params):
    f_t, m_t = _pnp_hand_inputs(config, params, state.batch_stats, batch["target"]["image"])
    return jnp.mean(critic_f.apply({"params": psi_f}, f_t)), jnp.mean(critic_m.apply({"params": psi_m}, m_t))

  def loss(params):
    s_f, s_m = scores(params)
    return -c.mu * s_f - lam * c.mu * s_m + c.weight_decay * c.mu * half_l2(params["down0"])

  g = jax.grad(loss)(state.params)
  assert tree_norm({n: v for n, v in g.items() if n != "down0"}) > 1e-4   # frozen, yet reached
  assert_trees_close(new.params["down0"], _tf1_rmsprop_step(config, state.params["down0"], g["down0"]),
                     rtol=1e-4, atol=1e-8)
  np.testing.assert_allclose(metrics["dam_grad_norm"], tree_norm(g["down0"]), rtol=1e-4)
  np.testing.assert_allclose(metrics["loss_dam"], loss(state.params), rtol=1e-5, atol=1e-7)
  (f0, m0), (f1, m1) = scores(state.params), scores(new.params)
  assert float(f1) > float(f0) and float(f1) + lam * float(m1) > float(f0) + lam * float(m0)


@pytest.mark.parametrize("at,phase", [(3, pnp_adanet.CRITIC), (5, pnp_adanet.DAM)], ids=["critic", "dam"])
def test_pnp_steps_flag_a_non_finite_target(pnp_parts, batch, at, phase):
  _, state, step = pnp_parts
  new, metrics = step(at_step(state, at), with_nan_target(batch), jax.random.PRNGKey(2))
  assert float(metrics["phase"]) == phase
  assert int(new.first_bad_step) == at + 1


def test_pnp_validate_refuses_val_selection_and_runs_without_a_dam_step():
  pnp_adanet.validate(config_of(PNP))   # 2 + 1 + 2 = 5 < num_steps = 6: step 5 is a DAM step
  with pytest.raises(ValueError, match=r"eval.selection='val'.*use eval.selection='last' \(or 'oracle'"):
    pnp_adanet.validate(config_of(PNP, **{"eval.selection": "val"}))
  for key, value in (("pnp.pretrain_steps", 0), ("pnp.pretrain_steps", 6)):
    with pytest.raises(ValueError, match=f"{key}={value}"):
      pnp_adanet.validate(config_of(dict(PNP, **{key: value})))
  for key, value in (("pnp.pretrain_steps", 3), ("pnp.critic_warmup_steps", 2), ("pnp.critic_steps", 3)):
    with pytest.raises(ValueError, match="no DAM step"):
      pnp_adanet.validate(config_of(dict(PNP, **{key: value})))


# --- End to end ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return make_sites_dataset(tmp_path_factory.mktemp("uda_adv") / "toy", sites=("A", "C"), cases=5)


# ADDA's end-to-end run is `slow`: its parts run in PnP-AdaNet's (two-stage state, source phase,
# Phases dispatch by the trainer, checkpoint of the whole state), which stays in the default run.
@pytest.mark.parametrize("overrides,label", [pytest.param(ADDA, "ADDA", marks=pytest.mark.slow),
                                             (PNP, "PnP-AdaNet")], ids=["adda", "pnp_adanet"])
def test_train_and_evaluate_end_to_end(dataset, tmp_path, overrides, label):
  config = config_of(overrides, dataset, **{"num_steps": 6, "eval_every": 6, "checkpoint.every": 6,
                                            "log_every": 3})
  result = train_lib.train_and_evaluate(config, tmp_path / "run")
  run = tmp_path / "run"
  for name in ("results.md", "results.csv", "results.json", "metrics.jsonl"):
    assert (run / name).is_file(), name
  assert f"| {label} |" in result["markdown"]
  assert {r["site"] for r in result["records"]} >= {"C"}
  train = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
  phases = [r["phase"] for r in train if r["kind"] == "train"]
  assert phases == ([1.0, 1.0] if label == "ADDA" else [pnp_adanet.CRITIC, pnp_adanet.DAM])
