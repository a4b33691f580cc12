"""Epi-FCR (methods/epi_fcr.py) against hand compositions written from the paper's eqs. 1-7 and
the released HAHA-DL/Episodic-DG code: every loss term from plain U-Net applies on hand-merged
parameter dicts (parts listed by name here, not by the method's split), which groups each term's
gradient reaches (the fixed parts exactly none), a full step = the domain-specific SGD update then
the aggregated one with the updated domain-specific parts, the warm-up (aggregated L_agg only),
BatchNorm running statistics, the random decoder never changing, the episode draw (the same on
every device), and one run through the trainer. The full step runs pmapped over 2 devices and the
warm-up step on one, each against the same one-device hand arithmetic (so 2 devices == 1 device
is part of the full-step check, without compiling the full step twice)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import every_leaf_changed, leaves_equal, make_sites_dataset, tiny_config
from medgen_jax import parallel, train_lib
from medgen_jax.config import base_config, validate
from medgen_jax.methods import deepall, epi_fcr
from medgen_jax.methods.base import RunInfo
from medgen_jax.models import UNet

K, C, EPS, N = 2, 3, 1e-7, 4   # 2 sites: fewer per-site forwards to compile
WF, WC, WR, WD = 0.7, 0.3, 0.2, 0.05
ENC = ("down0", "bottleneck")                    # depth 1: the U-Net's feature extractor
DEC = ("upconv0", "up0", "head")                 # ... and its classifier
LR = 0.5
INFO = RunInfo(num_classes=C, input_shape=(16, 16, 1), domains=("A", "B"))


def make_config(**overrides):
  c = base_config()
  c.method = "epi_fcr"
  c.model.base_features = 4
  c.model.depth = 1              # few layers to compile (compilation is this file's time)
  c.loss.ce_weight = 0.0         # Dice-B alone: a loss short enough to write by hand below
  c.loss.dice_variant = "linear"
  c.loss.weight_decay = WD       # large enough for the L2 term to matter
  c.num_steps = 10
  c.epi_fcr.warmup_steps = 1
  c.epi_fcr.epif_weight, c.epi_fcr.epic_weight, c.epi_fcr.epir_weight = WF, WC, WR
  for key, value in overrides.items():
    target = c
    *path, last = key.split(".")
    for p in path:
      target = target[p]
    target[last] = value
  return c


def make_batch(seed=0, n=N):
  rng = np.random.default_rng(seed)
  domain = np.arange(n, dtype=np.int32) % K                    # interleaved, as the sampler
  image = (rng.normal(size=(n, 16, 16, 1)) * (1 + domain[:, None, None, None])
           + 2 * domain[:, None, None, None]).astype(np.float32)
  label = rng.integers(0, C, size=(n, 16, 16)).astype(np.int32)
  return {"image": image, "label": label, "domain": domain}


# --- Hand-written losses (plain U-Net, parts merged by name) -------------------------------------

UNET = UNet(C, base_features=4, depth=1)


def run(params, stats, x):
  """Plain U-Net forward in training mode: (logits, new batch_stats)."""
  out, upd = UNET.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
  return out, upd["batch_stats"]


def parts(tree, names):
  return {n: tree[n] for n in names}


def dice_b(logits, labels):
  """1 − mean_c 2Σpg / (Σp + Σg + 1e-7), sums over the given samples (methods.md §1.1 Dice-B)."""
  p = jax.nn.softmax(logits, axis=-1)
  g = jax.nn.one_hot(labels, C)
  inter = jnp.sum(p * g, axis=(0, 1, 2))
  return 1.0 - jnp.mean(2 * inter / (jnp.sum(p, axis=(0, 1, 2)) + jnp.sum(g, axis=(0, 1, 2)) + EPS))


def l2(params):
  return WD * sum(jnp.sum(w ** 2) for path, w in jax.tree_util.tree_leaves_with_path(params)
                  if path[-1].key == "kernel") / 2


class Hand:
  def __init__(self, state, batch):
    self.batch, self.stats = batch, state.batch_stats
    self.ds_stats = state.nets["domain_specific"].batch_stats
    self.rand_stats = state.nets["random_decoder"].batch_stats
    self.rows = [np.flatnonzero(batch["domain"] == k) for k in range(K)]
    self.x = [batch["image"][r] for r in self.rows]
    self.y = [batch["label"][r] for r in self.rows]

  def ds_loss(self, ds):
    """eq. 1: Σ_k S(ψ_k∘θ_k, x_k) + L2, model k on site k's slices; aux: model k's new BN
    statistics (running averages over site k's slices)."""
    out = {f"domain_{k}": run(ds[f"domain_{k}"], self.ds_stats[f"domain_{k}"], self.x[k]) for k in range(K)}
    loss = sum(dice_b(out[f"domain_{k}"][0], self.y[k]) for k in range(K)) + l2(ds)
    return loss, {name: o[1] for name, o in out.items()}

  def terms(self, agg, ds, rand, i, j):
    """(L_agg, L_epir, L_epic, L_epif) at episode (i, j) (python ints), and the aggregated
    model's new BN statistics (its forward on the whole batch)."""
    logits, agg_stats = run(agg, self.stats, self.batch["image"])
    loss_agg = sum(dice_b(logits[self.rows[k]], self.y[k]) for k in range(K))
    rand_net = {**parts(agg, ENC), **rand}
    rand_logits, _ = run(rand_net, {**parts(self.stats, ENC), **self.rand_stats}, self.batch["image"])
    loss_epir = sum(dice_b(rand_logits[self.rows[k]], self.y[k]) for k in range(K))
    dj, sj = ds[f"domain_{j}"], self.ds_stats[f"domain_{j}"]
    epif_net = {**parts(agg, ENC), **parts(dj, DEC)}        # θ with model j's classifier
    loss_epif = dice_b(run(epif_net, {**parts(self.stats, ENC), **parts(sj, ("up0",))}, self.x[i])[0], self.y[i])
    epic_net = {**parts(dj, ENC), **parts(agg, DEC)}        # ψ on model j's features
    loss_epic = dice_b(run(epic_net, {**parts(sj, ENC), **parts(self.stats, ("up0",))}, self.x[i])[0], self.y[i])
    return (loss_agg, loss_epir, loss_epic, loss_epif), agg_stats

  def agg_loss(self, agg, ds, rand, episodic, i, j):
    """eq. 7: L_agg + WR·L_epir + WC·L_epic + WF·L_epif + L2(θ, ψ) (episodic = 1), or the
    warm-up's L_agg + L2(θ, ψ) (episodic = 0: a traced factor, so both share one compile);
    aux: (the four terms, the aggregated model's new BN statistics)."""
    (a, r, c, f), agg_stats = self.terms(agg, ds, rand, i, j)
    return a + episodic * (WR * r + WC * c + WF * f) + l2(agg), ((a, r, c, f), agg_stats)


@pytest.fixture(scope="module")
def setup():
  config = make_config()
  tx = optax.sgd(LR)   # the hand step below: p − LR·g, no optimizer state to model
  state = epi_fcr.init_epi_fcr_state(jax.random.PRNGKey(0), deepall.segmenter(config, INFO, train=False), tx, tx,
                                     input_shape=(1, 16, 16, 1), num_domains=K)
  batch = make_batch()
  hand = Hand(state, batch)
  jitted = {"ds": jax.jit(jax.value_and_grad(hand.ds_loss, has_aux=True)),
            "agg": jax.jit(jax.value_and_grad(hand.agg_loss, has_aux=True), static_argnums=(4, 5))}
  return config, tx, state, batch, jitted


@pytest.fixture(scope="module")
def steps(setup):
  """(Phases, the warm-up step jitted on one device, the full step pmapped over 2 devices x one
  slice of each site). Each phase compiles once; the full step is checked against the same
  one-device hand arithmetic, so 2 devices == 1 device is part of that check."""
  config, tx, _, _, _ = setup
  step = epi_fcr.make_train_step(deepall.segmenter(config, INFO, train=True), tx, tx, config,
                                 num_classes=C, num_domains=K)
  info = RunInfo(C, (16, 16, 1), axis_name=parallel.AXIS_NAME, domains=INFO.domains)
  multi = epi_fcr.make_train_step(deepall.segmenter(config, info, train=True), tx, tx, config,
                                  num_classes=C, num_domains=K, axis_name=parallel.AXIS_NAME,
                                  bn_sync=deepall.bn_synced(config, info))
  return step, jax.jit(step.steps[0]), parallel.DataParallel(multi.steps[1], num_devices=2)


@pytest.fixture(scope="module")
def full_result(setup, steps):
  """One full step from the initial state on 2 devices (its episode (i, j) is the one every hand
  composition below uses: one compile of the hand loss)."""
  _, _, state, batch, _ = setup
  runner = steps[2]
  # step_on_devices, as the trainer and the test below: one compile (runner.step's host batch
  # layout would be another)
  new, metrics = runner.step_on_devices(runner.replicate(state), runner.put(batch), jax.random.PRNGKey(7))
  metrics = parallel.DataParallel.unreplicate(metrics)
  return (parallel.DataParallel.unreplicate(new), metrics,
          (int(metrics["episode_i"]), int(metrics["episode_j"])))


def sgd(params, grads):
  return jax.tree.map(lambda p, g: p - LR * g, params, grads)


def max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def all_zero(tree):
  return all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(tree))


def any_nonzero(tree):
  return all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(tree))


# --- Parts ----------------------------------------------------------------------------------------


def test_parts_are_the_unet_encoder_and_decoder(setup):
  _, _, state, _, _ = setup
  enc, dec = epi_fcr.split_parts(state.params)
  assert sorted(enc) == sorted(ENC) and sorted(dec) == sorted(DEC)
  assert leaves_equal(epi_fcr.merge(enc, dec), state.params)
  assert sorted(state.nets["random_decoder"].params) == sorted(DEC)
  assert state.nets["random_decoder"].opt_state == ()          # no optimizer: never trained
  assert sorted(state.nets["domain_specific"].params) == [f"domain_{k}" for k in range(K)]
  # every model its own initialization
  ds = state.nets["domain_specific"].params
  assert not np.allclose(ds["domain_0"]["head"]["kernel"], ds["domain_1"]["head"]["kernel"])
  assert not np.allclose(state.params["head"]["kernel"], state.nets["random_decoder"].params["head"]["kernel"])


# --- The objective --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def objective(setup, full_result):
  """The method's aggregated objective at the initial state and the full step's episode:
  (params, episode, metrics, ∇ of each episodic term w.r.t. EVERY group), jitted once."""
  config, _, state, batch, _ = setup
  _, agg_objective = epi_fcr.make_objectives(deepall.segmenter(config, INFO, train=True), config,
                                             num_classes=C, num_domains=K)
  params = {"aggregated": state.params, "domain_specific": state.nets["domain_specific"].params,
            "random_decoder": state.nets["random_decoder"].params}
  stats = {"aggregated": state.batch_stats, "domain_specific": state.nets["domain_specific"].batch_stats,
           "random_decoder": state.nets["random_decoder"].batch_stats}
  episode = full_result[2]

  names = ("loss_epif", "loss_epic", "loss_epir")

  @jax.jit
  def evaluate(params):
    f = lambda p: agg_objective(p, stats, batch, episode, jax.random.PRNGKey(0))[1][0]
    terms = lambda p: jnp.stack([f(p)[n] for n in names])
    metrics, (pullback,) = f(params), jax.vjp(terms, params)[1:]
    # each term's gradient: one batched backward pass (one compile) over the 3 unit cotangents
    return metrics, jax.vmap(pullback)(jnp.eye(len(names)))[0]

  metrics, stacked = evaluate(params)
  grads = {n: jax.tree.map(lambda g, r=r: g[r], stacked) for r, n in enumerate(names)}
  return params, episode, metrics, grads


def test_loss_terms_equal_hand_composition(setup, objective):
  _, _, _, _, hand = setup
  params, (i, j), metrics, _ = objective
  (total, (want, _)), _ = hand["agg"](params["aggregated"], params["domain_specific"], params["random_decoder"], 1.0, i, j)
  for name, w in zip(("loss_aggregated", "loss_epir", "loss_epic", "loss_epif"), want):
    np.testing.assert_allclose(metrics[name], w, rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(metrics["loss_agg_objective"], total, rtol=1e-5)   # its gradient: the step test
  # the total is not the unweighted sum (each weight is where the formula puts it)
  assert abs(float(total) - float(sum(want) + l2(params["aggregated"]))) > 1e-2
  # model j's parts enter: another domain's model gives other episodic terms
  other = hand["agg"](params["aggregated"], dict(params["domain_specific"], **{f"domain_{j}": params["domain_specific"][f"domain_{i}"]}),
                      params["random_decoder"], 1.0, i, j)[0][1][0]
  assert abs(float(other[3]) - float(want[3])) > 1e-3 and abs(float(other[2]) - float(want[2])) > 1e-3


def test_gradients_reach_only_the_aggregated_parts_they_should(objective):
  _, _, _, term = objective
  enc = lambda g: parts(g["aggregated"], ENC)
  dec = lambda g: parts(g["aggregated"], DEC)
  # the fixed parts: exactly no gradient from anything (stop_gradient / no path)
  for g in term.values():
    assert all_zero(g["domain_specific"]) and all_zero(g["random_decoder"])
  # epif trains the aggregated feature extractor only (model j's classifier is fixed)
  assert any_nonzero(enc(term["loss_epif"])) and all_zero(dec(term["loss_epif"]))
  # epic trains the aggregated classifier only (model j's extractor is fixed)
  assert any_nonzero(dec(term["loss_epic"])) and all_zero(enc(term["loss_epic"]))
  # epir trains the aggregated feature extractor only (the random classifier is fixed)
  assert any_nonzero(enc(term["loss_epir"])) and all_zero(dec(term["loss_epir"]))


# --- The step -------------------------------------------------------------------------------------


def test_full_step_is_domain_specific_update_then_aggregated_update(setup, full_result):
  _, _, state, _, hand = setup
  new, metrics, (i, j) = full_result
  assert int(new.step) == 1 and int(metrics["phase"]) == 1
  assert i != j
  ds0, agg0, rand = state.nets["domain_specific"].params, state.params, state.nets["random_decoder"].params
  (loss_ds, want_ds), g_ds = hand["ds"](ds0)
  ds1 = sgd(ds0, g_ds)                                                # 1. train_ds_nn
  (loss_a, (terms, want_agg)), g_a = hand["agg"](agg0, ds1, rand, 1.0, i, j)   # 2. with model j just updated
  agg1 = sgd(agg0, g_a)
  assert max_diff(new.nets["domain_specific"].params, ds1) < 3e-5
  assert max_diff(new.params, agg1) < 3e-5
  np.testing.assert_allclose(metrics["loss_domain_specific"], loss_ds, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss_agg_objective"], loss_a, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], loss_ds + loss_a, rtol=1e-5)
  for name, want in zip(("loss_aggregated", "loss_epir", "loss_epic", "loss_epif"), terms):
    np.testing.assert_allclose(metrics[name], want, rtol=1e-5, err_msg=name)   # global, not per device
  assert leaves_equal(new.nets["random_decoder"], state.nets["random_decoder"])
  # sensitivity: the aggregated update with the OLD domain-specific parts is another step
  assert max_diff(sgd(agg0, hand["agg"](agg0, ds0, rand, 1.0, i, j)[1]), agg1) > 1e-4

  # BatchNorm running statistics (momentum 0.9): the aggregated model's from its forward on the
  # whole batch at agg0, model k's from site k's slices at ds0; the episodic forwards none
  # (want_agg: the hand forward at agg0; want_ds: at ds0)
  assert max_diff(new.batch_stats, want_agg) < 3e-5          # synchronized over the 2 devices
  assert max_diff(new.nets["domain_specific"].batch_stats, want_ds) < 3e-5
  assert max_diff(want_agg, state.batch_stats) > 1e-2


def test_warmup_step_trains_domain_specific_and_aggregated_without_episodic_terms(setup, steps, full_result):
  config, _, state, batch, hand = setup
  step, warm, _ = steps
  assert [int(step.schedule(s)) for s in (0, 1, 2, 9)] == [0, 1, 1, 1]   # warmup_steps = 1
  assert [int(epi_fcr.phase_at(s, 501)) for s in (0, 500, 501)] == [0, 0, 1]   # released: ite <= 500
  new, metrics = warm(state, batch, jax.random.PRNGKey(3))
  assert int(metrics["phase"]) == 0 and "loss_epif" not in metrics and "episode_i" not in metrics
  ds0, agg0 = state.nets["domain_specific"].params, state.params
  (_, want_ds), g_ds = hand["ds"](ds0)
  assert max_diff(new.nets["domain_specific"].params, sgd(ds0, g_ds)) < 2e-5
  # L_agg + L2 alone (episodic factor 0; the episode is then irrelevant: the full step's, one compile)
  (loss, (_, want_agg)), g = hand["agg"](agg0, ds0, state.nets["random_decoder"].params, 0.0, *full_result[2])
  assert max_diff(new.params, sgd(agg0, g)) < 2e-5
  assert max_diff(new.batch_stats, want_agg) < 2e-5
  assert max_diff(new.nets["domain_specific"].batch_stats, want_ds) < 2e-5
  np.testing.assert_allclose(metrics["loss_agg_objective"], loss, rtol=1e-5)
  assert leaves_equal(new.nets["random_decoder"], state.nets["random_decoder"])


def test_random_decoder_never_changes_while_everything_else_trains(setup, steps):
  """Several full steps on 2 devices: ψ_r bit-identical, everything trained changes, and every
  device trains on the same episode (one draw from the replicated key, not one per device)."""
  _, _, state, _, _ = setup
  runner = steps[2]
  new, episodes = runner.replicate(state), []
  for t in range(6):
    new, metrics = runner.step_on_devices(new, runner.put(make_batch(seed=t)), jax.random.PRNGKey(10 + t))
    pairs = np.stack([np.asarray(metrics["episode_i"]), np.asarray(metrics["episode_j"])], axis=1)
    assert np.all(pairs == pairs[0]), pairs    # per device [(i, j), (i, j)]
    episodes.append(tuple(pairs[0]))
  assert len(set(episodes)) == K               # both episodes occur (a draw, not a constant)
  new = parallel.DataParallel.unreplicate(new)
  assert int(new.step) == 6 and int(new.first_bad_step) == 0
  assert leaves_equal(new.nets["random_decoder"], state.nets["random_decoder"])
  assert every_leaf_changed(new.params, state.params)
  assert every_leaf_changed(new.nets["domain_specific"].params, state.nets["domain_specific"].params)


@pytest.mark.parametrize("sites", [2, 3, 5])
def test_episode_draw_is_uniform_over_ordered_pairs_of_distinct_sites(sites):
  i, j = jax.jit(jax.vmap(lambda k: epi_fcr.draw_episode(k, sites)))(jax.random.split(jax.random.PRNGKey(0), 4000))
  i, j = np.asarray(i), np.asarray(j)
  assert np.all(i != j) and set(i) == set(j) == set(range(sites))
  freq = np.array([np.mean((i == a) & (j == b)) for a in range(sites) for b in range(sites) if a != b])
  np.testing.assert_allclose(freq, 1 / (sites * (sites - 1)), atol=0.02)


def test_validate_refuses_settings_epi_fcr_cannot_honour():
  with pytest.raises(ValueError, match="epi_fcr.warmup_steps"):
    validate(make_config(**{"epi_fcr.warmup_steps": 10}))
  with pytest.raises(ValueError, match="epi_fcr.epif_weight"):
    validate(make_config(**{"epi_fcr.epif_weight": -1.0}))
  with pytest.raises(ValueError, match="model"):
    validate(make_config(**{"model.norm": "dsbn"}))
  validate(make_config())
  assert base_config().epi_fcr.to_dict() == {"epif_weight": 2.0, "epic_weight": 0.05, "epir_weight": 0.1,
                                             "warmup_steps": 501}


def test_run_end_to_end_through_the_registry(tmp_path):
  root = make_sites_dataset(tmp_path / "toy", sites=("A", "B", "C"), cases=3)
  config = tiny_config(root, **{"method": "epi_fcr", "model.depth": 1, "batch_size": 8, "num_steps": 1,
                                # warm-up 0: one phase to compile (the schedule is tested above)
                                "epi_fcr.warmup_steps": 0, "eval_every": 1, "checkpoint.every": 1,
                                "eval.selection": "last", "data.split.val_fraction": 0.0,
                                "eval.distances": False})
  result = train_lib.train_and_evaluate(config, tmp_path / "run")
  assert "| Epi-FCR |" in (tmp_path / "run" / "results.md").read_text()
  assert {r["site"] for r in result["records"]} >= {"C"}
  assert all(np.isfinite(r["dice"]).all() for r in result["records"])
