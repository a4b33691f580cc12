"""ADDA and PnP-AdaNet (methods/uda/adda.py, pnp_adanet.py): each sub-update changes exactly the
parameters it owns, the phase switch, the PnP schedule and losses by hand, pmap = one device,
and both methods end to end on a tiny source + target dataset."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import make_sites_dataset, tiny_config
from medgen_jax import parallel, train_lib
from medgen_jax.methods.base import RunInfo
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
  return tiny_config(root, **UDA, **method_overrides, **more)


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  return {"source": {"image": rng.normal(size=(4, 16, 16, 1)).astype(np.float32),
                     "label": rng.integers(0, 4, size=(4, 16, 16)).astype(np.int32),
                     "domain": np.zeros(4, np.int32)},
          "target": {"image": (0.5 * rng.normal(size=(4, 16, 16, 1)) + 1.0).astype(np.float32),
                     "domain": np.ones(4, np.int32)}}


def leaves_equal(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def every_leaf_changed(a, b) -> bool:
  return all(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def at_step(state, step):
  return state.replace(step=jnp.asarray(step, jnp.int32))


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


# --- End to end ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return make_sites_dataset(tmp_path_factory.mktemp("uda_adv") / "toy", sites=("A", "C"), cases=5)


@pytest.mark.parametrize("overrides,label", [(ADDA, "ADDA"), (PNP, "PnP-AdaNet")], ids=["adda", "pnp_adanet"])
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
