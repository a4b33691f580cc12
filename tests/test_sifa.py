"""SIFA's training step (methods/uda/sifa.py) against hand computations written from the released
code (cchen-cc/SIFA master main.py::compute_losses / train, methods.md §3.5, §1.3): each of the
seven updates changes exactly what it owns, one SGD(1) step of each equals −∇ of the hand-written
loss (seg loss with every term, G_A, G_B, D_A with its auxiliary head, D_B, D_P/D_P_ll on
LOGITS), the iteration is the sub-updates in the released order with fresh forwards, pmap =
one device, the w_P ramp, the SIFA-v1 switch, the config checks and the evaluated network.

The networks themselves are tested in test_sifa_models.py; here they are only applied. Each
jitted function compiles once per module (SIFA compiles slowly)."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import every_leaf_changed, leaves_equal, tiny_config
from medgen_jax import losses, parallel
from medgen_jax import config as config_lib
from medgen_jax.methods.base import RunInfo
from medgen_jax.methods.uda import sifa, translation
from medgen_jax.models.gan import PatchGAN, ResNetGenerator
from medgen_jax.models.sifa import PixelClassifier, SIFADecoder, SIFAEncoder, SIFASegmenter

INFO = RunInfo(num_classes=4, input_shape=(16, 16, 1))
AXIS_INFO = RunInfo(num_classes=4, input_shape=(16, 16, 1), axis_name=parallel.AXIS_NAME)
TINY = {"data.sites": ("A",), "data.held_out": ("C",), "data.target_adaptation": True,
        "eval.selection": "last", "method": "sifa", "data.normalization.name": "site_range",
        "gan.gen_features": 4, "gan.gen_blocks": 1, "gan.disc_features": 4, "gan.disc_layers": 2,
        "gan.pool_size": 2, "sifa.encoder_features": 2, "sifa.decoder_features": 4,
        "sifa.decoder_blocks": 1}
# SGD(1) (momentum 0.9: a first step is −∇, and the optimizer state moves) for the segmenter;
# the GAN Adam is patched to the same.
LR = 1.0
SGD = {"optimizer.name": "sgd", "optimizer.learning_rate": LR, "optimizer.momentum": 0.9,
       "optimizer.schedule": "constant"}
ROOT = pathlib.Path(__file__).resolve().parents[1]
GAN_ADAM = translation.gan_adam   # the real one (the `parts` fixture patches it for the module)


def config_of(**more):
  return tiny_config("unused", **{**TINY, **more})


def make_batch(seed=0, channels=1):
  rng = np.random.default_rng(seed)
  image = lambda: np.tanh(rng.normal(size=(4, 16, 16, channels))).astype(np.float32)
  return {"source": {"image": image(), "label": rng.integers(0, 4, size=(4, 16, 16)).astype(np.int32),
                     "domain": np.zeros(4, np.int32)},
          "target": {"image": image(), "domain": np.ones(4, np.int32)}}


def max_abs(tree) -> float:
  return max(float(np.max(np.abs(np.asarray(x)))) for x in jax.tree.leaves(tree))


def assert_sgd_step(new, old, grad, *, rel=2e-3):
  """new == old − LR·grad (a first SGD step), leaf by leaf, to `rel` of the largest step of that leaf; every
  leaf gets a non-zero step."""
  for path, n in jax.tree_util.tree_leaves_with_path(new):
    o, g = old, grad
    for k in path:
      o, g = o[k.key], g[k.key]
    n, o, g = (np.asarray(x, np.float64) for x in (n, o, g))
    scale = np.max(np.abs(g))
    assert scale > 0, path
    np.testing.assert_allclose(n, o - LR * g, rtol=0, atol=rel * LR * scale + 1e-7, err_msg=str(path))


# --- Hand-written forward graph and losses (model.get_outputs, main.py::compute_losses) -----------


def lsg(d):    # LSGAN generator: mean((D(fake) − 1)²)
  return jnp.mean((d - 1.0) ** 2)


def lsd(real, fake):    # LSGAN discriminator: ½[mean((D(real) − 1)²) + mean(D(fake)²)]
  return 0.5 * (jnp.mean((real - 1.0) ** 2) + jnp.mean(fake ** 2))


def l1(x, y, weight=10.0):
  return weight * jnp.mean(jnp.abs(x - y))


def half_l2(tree):
  """The release's L2 (main.py): tf.nn.l2_loss of EVERY trainable variable under e_B/s_B/s_B_ll,
  the BatchNorm γ and β included."""
  return sum(0.5 * jnp.sum(leaf ** 2) for leaf in jax.tree.leaves(tree))


def test_l2_covers_every_parameter_as_released():
  params = {"encoder": {"c1": {"kernel": np.ones((2,), np.float32)},
                        "c1_norm": {"bn": {"scale": np.full((3,), 2.0, np.float32), "bias": np.ones((1,), np.float32)}}},
            "classifier": {"c8": {"kernel": np.full((1,), 3.0, np.float32)}}}
  # 1e-4 · (2·1 + 3·4 + 1·1 + 9) / 2: the BN scale and bias count, as tf.trainable_variables() did.
  np.testing.assert_allclose(float(sifa.l2_all(params, coefficient=1e-4)), 1e-4 * 24 / 2, rtol=1e-6)


class Hand:
  """SIFA's networks built from the flax modules as sifa.py configures them (SIFA's choices:
  zero-padded skip generator, skip decoder, bias-free PatchGANs with pad 2), applied by hand."""

  def __init__(self, config, info):
    g, s = config.gan, config.sifa
    self.config, self.info = config, info
    self.gen = ResNetGenerator(base_features=g.gen_features, num_blocks=g.gen_blocks, skip=True,
                               padding_mode="constant")
    self.seg = SIFASegmenter(num_classes=info.num_classes, base_features=s.encoder_features,
                             deep_supervision=s.deep_supervision, dropout_rate=s.dropout)
    self.dec = SIFADecoder(features=s.decoder_features, num_blocks=s.decoder_blocks,
                           out_channels=info.input_shape[-1], skip=True)
    disc = lambda out: PatchGAN(features=g.disc_features, num_layers=g.disc_layers, out_features=out,
                                pad=2, use_bias=False)
    self.d_A, self.d_1 = disc(2), disc(1)

  def d(self, params, x, two=False):
    return (self.d_A if two else self.d_1).apply({"params": params}, x, train=True)

  def forward(self, g_A, seg, stats, de_B, batch):
    x_A, x_B = batch["source"]["image"], batch["target"]["image"]
    G = lambda x: self.gen.apply({"params": g_A}, x, train=True)
    D = lambda z, x: self.dec.apply({"params": de_B}, z, x, train=True)

    def E(x, stats):   # training mode: batch statistics (TF is_training=True)
      out, upd = self.seg.apply({"params": seg, "batch_stats": stats}, x, train=True, return_all=True,
                                mutable=["batch_stats"])
      return out, upd["batch_stats"]

    fake_B = G(x_A)
    out_B, stats = E(x_B, stats)
    fake_A = D(out_B["latent"], x_B)
    out_fB, stats = E(fake_B, stats)
    cyc_A = D(out_fB["latent"], fake_B)
    cyc_B = G(fake_A)
    return dict(fake_B=fake_B, fake_A=fake_A, cyc_A=cyc_A, cyc_B=cyc_B, pred_B=out_B["logits"],
                pred_fB=out_fB["logits"], pred_B_ll=out_B.get("logits_ll"),
                pred_fB_ll=out_fB.get("logits_ll")), stats

  def cycles(self, batch, o):
    return l1(batch["source"]["image"], o["cyc_A"]) + l1(batch["target"]["image"], o["cyc_B"])

  def seg_term(self, logits, labels):   # WCE + Dice (losses.segmentation_loss: tested elsewhere)
    c = self.config.loss
    return losses.segmentation_loss(logits, labels, num_classes=self.info.num_classes,
                                    ce_weight=c.ce_weight, dice_weight=c.dice_weight,
                                    dice_variant=c.dice_variant, include_background=c.include_background,
                                    class_weights=c.class_weights, ce_clip=c.ce_clip)[0]

  def seg_loss(self, seg, state, batch, weights):
    """The released seg_loss_B; `weights` = (0.1 G_B, 0.1 mask, 0.1 aux) so a test can zero one."""
    w_gB, w_mask, w_aux = weights
    nets = state.nets
    o, _ = self.forward(nets["g_A"].params, seg, state.batch_stats, nets["de_B"].params, batch)
    y = batch["source"]["label"]
    d_fake_A = self.d(nets["d_A"].params, o["fake_A"], two=True)
    g_B = self.cycles(batch, o) + lsg(d_fake_A[..., 0])
    return (self.seg_term(o["pred_fB"], y) + 1e-4 * half_l2(seg)
            + 0.1 * self.seg_term(o["pred_fB_ll"], y)
            + w_gB * g_B
            + w_mask * lsg(self.d(nets["d_P"].params, o["pred_B"]))
            + 0.01 * lsg(self.d(nets["d_P_ll"].params, o["pred_B_ll"]))
            + w_aux * lsg(d_fake_A[..., 1]))

  def g_A_loss(self, g_A, state, batch):
    nets = state.nets
    o, _ = self.forward(g_A, state.params, state.batch_stats, nets["de_B"].params, batch)
    return self.cycles(batch, o) + lsg(self.d(nets["d_B"].params, o["fake_B"]))

  def g_B_loss(self, de_B, state, batch):
    nets = state.nets
    o, _ = self.forward(nets["g_A"].params, state.params, state.batch_stats, de_B, batch)
    return self.cycles(batch, o) + lsg(self.d(nets["d_A"].params, o["fake_A"], two=True)[..., 0])

  def outputs(self, state, batch):
    nets = state.nets
    return self.forward(nets["g_A"].params, state.params, state.batch_stats, nets["de_B"].params, batch)

  def d_A_loss(self, psi, x_A, pooled, cyc_A):
    real, fake, cyc = (self.d(psi, x, two=True) for x in (x_A, pooled, cyc_A))
    return lsd(real[..., 0], fake[..., 0]) + lsd(cyc[..., 1], fake[..., 1])

  def d_B_loss(self, psi, x_B, pooled):
    return lsd(self.d(psi, x_B), self.d(psi, pooled))

  def d_P_loss(self, psi, pred_fB, pred_B):   # real = translated source, fake = target (logits)
    return lsd(self.d(psi, pred_fB), self.d(psi, pred_B))


# --- Fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch():
  return make_batch()


def released_order(sub, state, batch, key, order=("g_A", "d_B", "seg", "g_B", "d_A", "d_P")):
  """The sub-updates in `order` with iteration's keys; returns ([state after each], {fakes})."""
  keys = jax.random.split(key, 8)
  slot = {"g_A": 0, "d_B": 1, "seg": 2, "g_B": 3, "d_A": 4, "d_P": 5}
  states, fakes = [], {}
  for name in order:
    k = keys[slot[name]]
    if name in ("g_A", "g_B"):
      state, _, fakes[name] = sub[name](state, batch, k)
    elif name == "d_B":
      state, _ = sub[name](state, batch, fakes["g_A"], k)
    elif name == "d_A":
      state, _ = sub[name](state, batch, fakes["g_B"], k)
    else:
      state, _ = sub[name](state, batch, k)
    states.append(state)
  return states, fakes


@pytest.fixture(scope="module")
def parts(batch):
  """SGD(LR, momentum 0.9) for every network: config.optimizer, and `translation.gan_adam`
  patched while the module's functions are traced. A first step of SGD with momentum is exactly
  −LR·∇ (the trace starts at 0) and leaves a trace in the optimizer state, so both the hand
  gradients and the ownership of optimizer states can be checked on one set of compilations.
  Each sub-update is jitted on its own: any order composes without a new compilation."""
  config = config_of(**SGD)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(translation, "gan_adam", lambda config: optax.sgd(LR, momentum=0.9))
    state = sifa.init_state(jax.random.PRNGKey(0), config, INFO)
    sub = {"g_A": jax.jit(lambda s, b, k: sifa.g_A_update(s, b, k, config, INFO)),
           "d_B": jax.jit(lambda s, b, f, k: sifa.d_B_update(s, b, f, k, config, INFO)),
           "seg": jax.jit(lambda s, b, k: sifa.seg_update(s, b, k, config, INFO)),
           "g_B": jax.jit(lambda s, b, k: sifa.g_B_update(s, b, k, config, INFO)),
           "d_A": jax.jit(lambda s, b, f, k: sifa.d_A_update(s, b, f, k, config, INFO)),
           "d_P": jax.jit(lambda s, b, k: sifa.d_P_updates(s, b, k, config, INFO))}
    chain, fakes = released_order(sub, state, batch, jax.random.PRNGKey(3))
    step = jax.jit(sifa.make_step(config, INFO))
    runner = parallel.DataParallel(sifa.make_step(config, AXIS_INFO), num_devices=2, donate=False)
    yield config, state, sub, step, runner, chain, fakes


@pytest.fixture(scope="module")
def hand_grads(parts):
  """Every loss of the release written out at a given state, with its gradient over the network
  it trains; `weights` = (G_B, mask, aux) weights of the seg loss, so a test can zero one."""
  config = parts[0]
  hand = Hand(config, INFO)

  @jax.jit
  def grads(state, batch, fake_A, fake_B, weights):
    o, stats = hand.outputs(state, batch)
    nets = state.nets
    vg = jax.value_and_grad
    return {"seg": vg(hand.seg_loss)(state.params, state, batch, weights), "stats": stats,
            "fake_A": o["fake_A"], "fake_B": o["fake_B"],
            "g_A": vg(hand.g_A_loss)(nets["g_A"].params, state, batch),
            "g_B": vg(hand.g_B_loss)(nets["de_B"].params, state, batch),
            "d_A": vg(hand.d_A_loss)(nets["d_A"].params, batch["source"]["image"], fake_A, o["cyc_A"]),
            "d_B": vg(hand.d_B_loss)(nets["d_B"].params, batch["target"]["image"], fake_B),
            "d_P": vg(hand.d_P_loss)(nets["d_P"].params, o["pred_fB"], o["pred_B"]),
            "d_P_ll": vg(hand.d_P_loss)(nets["d_P_ll"].params, o["pred_fB_ll"], o["pred_B_ll"])}

  return grads


FULL = np.array([0.1, 0.1, 0.1], np.float32)   # the released 0.1 G_B, 0.1 mask, 0.1 aux
OWNS = {"g_A": ({"g_A"}, False), "d_B": ({"d_B", "pool_B"}, False), "seg": (set(), True),
        "g_B": ({"de_B"}, False), "d_A": ({"d_A", "pool_A"}, False), "d_P": ({"d_P", "d_P_ll"}, False)}


# --- 1. Ownership ----------------------------------------------------------------------------------


def test_each_sub_update_changes_exactly_the_networks_it_owns(parts):
  """G_A → g_A; D_B → d_B + pool_B; Seg → the top level (params, BN statistics, optimizer);
  G_B → de_B; D_A → d_A + pool_A; D_P → d_P, d_P_ll. Params AND optimizer state (and pool
  contents) of everything else bit-identical; every leaf of what it owns changed."""
  _, state, _, _, _, chain, _ = parts
  assert set(state.nets) == {"g_A", "de_B", "d_A", "d_B", "d_P", "d_P_ll", "pool_A", "pool_B"}
  before = state
  for name, after in zip(("g_A", "d_B", "seg", "g_B", "d_A", "d_P"), chain):
    nets, top = OWNS[name]
    for net in state.nets:
      if net in nets:
        assert jax.tree.leaves(after.nets[net].opt_state) or net.startswith("pool"), (name, net)
        assert every_leaf_changed(before.nets[net], after.nets[net]), (name, net)
      else:
        assert leaves_equal(before.nets[net], after.nets[net]), (name, net)
    for part in ("params", "batch_stats", "opt_state"):
      if top:   # the encoder's BN statistics move here and only here
        assert every_leaf_changed(getattr(before, part), getattr(after, part)), (name, part)
      else:
        assert leaves_equal(getattr(before, part), getattr(after, part)), (name, part)
    assert int(after.step) == int(state.step), name      # the iteration adds 1 at its end
    assert int(after.first_bad_step) == 0, name
    before = after


def test_iteration_changes_every_network_and_counts_the_step(parts, batch):
  config, state, _, step, _, _, _ = parts
  new, metrics = step(state, batch, jax.random.PRNGKey(3))
  assert int(new.step) == int(state.step) + 1 and int(new.first_bad_step) == 0
  for part in ("params", "batch_stats", "opt_state"):
    assert every_leaf_changed(getattr(state, part), getattr(new, part)), part
  for net in state.nets:
    assert every_leaf_changed(state.nets[net], new.nets[net]), net
  for name in ("loss_g_A", "loss_d_B", "loss", "loss_g_B", "loss_d_A", "loss_d_P", "loss_d_P_ll"):
    assert np.isfinite(float(metrics[name])), name
  assert float(metrics["mask_weight"]) == pytest.approx(config.sifa.mask_weight)


def test_a_non_finite_target_flags_the_step(parts, batch):
  _, state, _, step, _, _, _ = parts
  image = np.array(batch["target"]["image"])
  image[0, 3, 3, 0] = np.nan
  new, _ = step(state, dict(batch, target=dict(batch["target"], image=image)), jax.random.PRNGKey(3))
  assert int(new.first_bad_step) == int(state.step) + 1


# --- 5. The order ----------------------------------------------------------------------------------


def test_iteration_is_the_sub_updates_in_the_released_order(parts, batch):
  """The jitted iteration = G_A → D_B → Seg → G_B → D_A → D_P(+ll), each with a fresh forward at
  the parameters the previous updates left; Seg before G_A gives a different result."""
  _, state, sub, step, _, chain, _ = parts
  key = jax.random.PRNGKey(3)
  new, _ = step(state, batch, key)
  by_hand = chain[-1].replace(step=state.step + 1)
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(by_hand)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  swapped = released_order(sub, state, batch, key, order=("seg", "g_A", "d_B", "g_B", "d_A", "d_P"))[0][-1]
  # D_B sees x_B and G_A's fake_B at the g_A it started from: the same in both orders.
  assert leaves_equal(new.nets["d_B"], swapped.nets["d_B"])
  for net in ("g_A", "de_B", "d_A", "d_P", "d_P_ll"):   # every later forward sees another segmenter
    diff = max_abs(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), new.nets[net].params,
                                swapped.nets[net].params))
    assert diff > 1e-3 * max_abs(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b),
                                              new.nets[net].params, state.nets[net].params)), net
  assert not leaves_equal(new.params, swapped.params)   # ... and Seg another g_A


# --- 2.–4. Each update is SGD on the hand-written loss --------------------------------------------


def test_seg_update_is_sgd_on_the_hand_written_seg_loss(parts, hand_grads, batch):
  """Seg: params − LR·∇[WCE+Dice(pred_fB) + 1e-4 Σ½‖W‖² + 0.1 [WCE+Dice](pred_fB_ll)
  + 0.1 (cyc_A + cyc_B + LSG(d_A.img(fake_A))) + 0.1 LSG(d_P(pred_B)) + 0.01 LSG(d_P_ll(pred_B_ll))
  + 0.1 LSG(d_A.aux(fake_A))] over e_B, s_B, s_B_ll (through de_B and d_A, which stay), at the
  state D_B left; the BN statistics after the x_B pass then the fake_B pass."""
  _, _, sub, _, _, chain, fakes = parts
  state = chain[1]
  new, metrics = sub["seg"](state, batch, jax.random.PRNGKey(0))   # (dropout off: any key)
  expected = hand_grads(state, batch, fakes["g_B"], fakes["g_A"], FULL)
  loss, grad = expected["seg"]
  assert set(grad) == {"encoder", "classifier", "classifier_ll"}
  assert_sgd_step(new.params, state.params, grad)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(new.batch_stats), jax.tree.leaves(expected["stats"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_seg_loss_terms_are_each_measurable(parts, hand_grads, batch):
  """Zeroing the G_B, mask or aux weight moves the hand gradient by far more than the tolerance
  of the test above: dropping any one term from sifa.py would fail it."""
  _, _, _, _, _, chain, fakes = parts
  state = chain[1]
  _, full = hand_grads(state, batch, fakes["g_B"], fakes["g_A"], FULL)["seg"]
  for i, term in enumerate(("G_B", "mask", "aux")):
    weights = FULL.copy()
    weights[i] = 0.0
    _, without = hand_grads(state, batch, fakes["g_B"], fakes["g_A"], weights)["seg"]
    worst = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(a))))
                for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(without)))
    assert worst > 2e-2, (term, worst)   # ≥ 10× the 2e-3 tolerance on some leaf


def test_g_A_and_g_B_updates_are_sgd_on_the_hand_written_generator_losses(parts, hand_grads, batch):
  """G_A = cyc_A + cyc_B + LSG(d_B(fake_B)) over g_A only; G_B = cyc_A + cyc_B +
  LSG(d_A[..., 0](fake_A)) over de_B only (the released g_loss_A, g_loss_B), each at the state
  the previous update left, with the fake it returns."""
  _, state0, sub, _, _, chain, fakes = parts
  for name, net, before, after in (("g_A", "g_A", state0, chain[0]), ("g_B", "de_B", chain[2], chain[3])):
    expected = hand_grads(before, batch, fakes["g_B"], fakes["g_A"], FULL)
    loss, grad = expected[name]
    assert_sgd_step(after.nets[net].params, before.nets[net].params, grad)
    _, metrics, fake = sub[name](before, batch, jax.random.PRNGKey(0))
    np.testing.assert_allclose(metrics[f"loss_{name}"], loss, rtol=1e-5)
    hand_fake = expected["fake_B" if name == "g_A" else "fake_A"]   # at the parameters before it
    np.testing.assert_allclose(fake, hand_fake, rtol=1e-5, atol=1e-6)


def test_discriminator_updates_are_sgd_on_the_hand_written_lsgan_losses(parts, hand_grads, batch):
  """D_B = LSD(d_B(x_B), d_B(pool_B)); D_A = LSD(d_A.img(x_A), d_A.img(pool_A)) +
  LSD(d_A.aux(cyc_A), d_A.aux(pool_A)) with cyc_A from a fresh forward; D_P = LSD(d_P(pred_fB),
  d_P(pred_B)) and D_P_ll on the ll heads, on LOGITS (no softmax). The pools are fresh, so they
  return (and store) the batch G_A / G_B just made."""
  _, _, sub, _, _, chain, fakes = parts
  for name, nets, before, after in (("d_B", ("d_B",), chain[0], chain[1]), ("d_A", ("d_A",), chain[3], chain[4]),
                                    ("d_P", ("d_P", "d_P_ll"), chain[4], chain[5])):
    expected = hand_grads(before, batch, fakes["g_B"], fakes["g_A"], FULL)
    for net in nets:
      loss, grad = expected[net]
      assert_sgd_step(after.nets[net].params, before.nets[net].params, grad)
    if name != "d_P":
      pool = after.nets[f"pool_{name[-1]}"].batch_stats
      fake = fakes["g_A" if name == "d_B" else "g_B"]
      assert int(pool["count"]) == 1 and np.array_equal(pool["images"][0], fake)
      _, metrics = sub[name](before, batch, fake, jax.random.PRNGKey(0))
    else:
      _, metrics = sub[name](before, batch, jax.random.PRNGKey(0))
    for net in nets:
      np.testing.assert_allclose(metrics[f"loss_{net}"], expected[net][0], rtol=1e-5)


# --- 6. pmap -------------------------------------------------------------------------------------


@pytest.mark.slow   # a third compilation of the whole iteration (~60 s on the loaded 2-core CPU)
def test_pmapped_iteration_equals_one_device(parts, batch):
  """2 devices (synchronised BN, instance norm per image, all-gathered pools) = one device:
  every network's params and the BN statistics, to 1 % of what the iteration changed."""
  _, state, _, step, runner, _, _ = parts
  key = jax.random.PRNGKey(3)
  single, m1 = step(state, batch, key)
  multi, m2 = runner.step(runner.replicate(state), batch, key)
  multi = runner.unreplicate(multi)
  for name in ("loss", "loss_g_A", "loss_g_B", "loss_d_A", "loss_d_B", "loss_d_P", "loss_d_P_ll"):
    np.testing.assert_allclose(m1[name], m2[name], rtol=1e-4, err_msg=name)
  pairs = [("params", state.params, single.params, multi.params),
           ("batch_stats", state.batch_stats, single.batch_stats, multi.batch_stats)]
  pairs += [(net, state.nets[net].params, single.nets[net].params, multi.nets[net].params)
            for net in state.nets if net.startswith(("g_", "de_", "d_"))]
  pairs += [(net, state.nets[net].batch_stats, single.nets[net].batch_stats, multi.nets[net].batch_stats)
            for net in ("pool_A", "pool_B")]
  for name, before, one, two in pairs:
    moved = max_abs(jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b), one, before))
    assert moved > 0, name
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-2 * moved, err_msg=name)
  assert int(multi.step) == 1 and int(multi.first_bad_step) == 0


# --- 7. w_P ramp -----------------------------------------------------------------------------------


def test_mask_weight_ramp():
  ramp = config_of(**{"sifa.mask_ramp_start": 10, "sifa.mask_ramp_end": 30})
  steps = np.array([0, 5, 9, 10, 15, 20, 29, 30, 31, 1000])
  want = 0.1 * np.clip((steps - 10) / 20, 0, 1)
  got = [float(sifa.mask_weight_at(ramp, s)) for s in steps]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
  assert got[:4] == [0.0] * 4 and got[-3:] == pytest.approx([0.1] * 3)
  constant = config_of(**{"sifa.mask_weight": 0.3})
  assert [float(sifa.mask_weight_at(constant, s)) for s in (0, 7, 10_000)] == pytest.approx([0.3] * 3)


# --- 8. SIFA-v1 ------------------------------------------------------------------------------------


@pytest.mark.slow   # its own init + iteration compilation, dropout on (~140 s on the loaded 2-core CPU)
def test_sifa_v1_has_no_deep_supervision_and_runs_on_three_slices():
  config = config_of(**{"sifa.deep_supervision": False, "sifa.dropout": 0.25, "data.context_slices": 3,
                        "sifa.mask_ramp_start": 1, "sifa.mask_ramp_end": 3})
  info = RunInfo(num_classes=4, input_shape=(16, 16, 3))
  sifa.validate(config)
  assert sifa.label(config, ()) == "SIFA w/o deep supervision"
  assert sifa.label(config_of(), ()) == "SIFA"
  with pytest.MonkeyPatch.context() as mp:   # the released optimizers, whatever ran before
    mp.setattr(translation, "gan_adam", GAN_ADAM)
    state = sifa.init_state(jax.random.PRNGKey(0), config, info)
    batch = make_batch(1, channels=3)
    new, metrics = jax.jit(sifa.make_step(config, info))(state, batch, jax.random.PRNGKey(2))
  assert isinstance(state.nets["g_A"].opt_state[0], optax.ScaleByAdamState)
  assert "d_P_ll" not in state.nets and set(state.params) == {"encoder", "classifier"}
  assert set(sifa.discriminators(config)) == {"d_A", "d_B", "d_P"}
  assert "loss_d_P_ll" not in metrics and "loss_seg_ll" not in metrics
  for name, value in metrics.items():
    if name.startswith("loss"):
      assert np.isfinite(float(value)), name
  assert float(metrics["mask_weight"]) == 0.0          # step 0 < mask_ramp_start
  assert int(new.first_bad_step) == 0 and int(new.step) == 1
  assert new.nets["g_A"].params["conv_out"]["kernel"].shape[-1] == 3   # all 3 slices translated
  for net in state.nets:
    assert every_leaf_changed(state.nets[net], new.nets[net]), net


# --- 9. Config checks ------------------------------------------------------------------------------


def test_validate_refuses_what_sifa_cannot_train():
  sifa.validate(config_of())
  cases = [({"data.normalization.name": "whitening"}, r"normalization.name='whitening'"),
           ({"data.in_plane_shape": (20, 20)}, r"in_plane_shape=\(20, 20\).*multiples of 8"),
           ({"model.norm": "instance"}, r"model.norm='instance'.*BatchNorm")]
  for overrides, message in cases:
    with pytest.raises(ValueError, match=message):
      sifa.validate(config_of(**overrides))


def load_config(name, arg):
  spec = importlib.util.spec_from_file_location(f"test_{name}", ROOT / "configs" / "uda" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("name", ["sifa", "sifa_v1"])
def test_shipped_configs_validate_and_carry_the_released_hyper_parameters(name):
  for arg in ("quick", None):
    config = load_config(name, arg)
    config_lib.validate(config)
    assert config.method == "sifa" and config.data.normalization.name == "site_range"
    assert config.eval.selection == "last"
    assert config.sifa.deep_supervision == (name == "sifa")
  full = load_config(name, None)
  g = full.gan
  assert (g.learning_rate, g.b1, g.cycle_weight, g.pool_size) == (2e-4, 0.5, 10.0, 50)
  assert (g.gen_features, g.gen_blocks, g.disc_features, g.skip) == (32, 9, 64, True)
  assert full.batch_size == 8 and full.num_steps == 20_000 and tuple(full.data.in_plane_shape) == (256, 256)
  s = full.sifa
  assert (s.encoder_features, s.decoder_features, s.decoder_blocks) == (16, 32, 4)
  assert (s.ll_seg_weight, s.gen_b_weight, s.aux_weight, s.mask_weight, s.mask_ll_weight) == (0.1, 0.1, 0.1, 0.1, 0.01)
  assert full.loss.weight_decay == 1e-4
  o = full.optimizer
  if name == "sifa":   # TMI: the seg optimizer is Adam(2e-4), TF's b1 0.9, no decay, no dropout
    assert (o.name, o.learning_rate, o.b1, o.schedule) == ("adam", 2e-4, 0.9, "constant")
    assert s.dropout == 0.0 and (s.mask_ramp_start, s.mask_ramp_end) == (0, 0)
  else:                # v1: Adam 1e-3 × 0.9 every 2 "epochs", keep 0.75, w_P ramp, 3 slices
    assert (o.name, o.learning_rate, o.b1, o.schedule, o.decay_rate, o.decay_steps) == (
        "adam", 1e-3, 0.9, "exponential", 0.9, 2000)
    assert s.dropout == 0.25 and full.data.context_slices == 3
    assert (s.mask_ramp_start, s.mask_ramp_end) == (4000, 7000)


# --- 10. Evaluation -------------------------------------------------------------------------------


def test_eval_network_is_encoder_and_s_B_in_inference_mode(parts, batch):
  """The evaluated model on target images = e_B + s_B logits computed by hand from the state's
  params and (running) BN statistics, in inference mode (after one Seg update, so the
  statistics are not the initial ones)."""
  config, chain = parts[0], parts[5]
  state = chain[2]
  model, variables_of = sifa.eval_network(config, INFO)
  x = batch["target"]["image"]
  got = model.apply(variables_of(state), x, train=False)
  encoder = SIFAEncoder(base_features=config.sifa.encoder_features)
  latent, _ = encoder.apply({"params": state.params["encoder"], "batch_stats": state.batch_stats["encoder"]},
                            x, train=False)
  want = PixelClassifier(4, (16, 16)).apply({"params": state.params["classifier"]}, latent, train=False)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  assert got.shape == (4, 16, 16, 4)
  (latent, _), _ = encoder.apply({"params": state.params["encoder"], "batch_stats": state.batch_stats["encoder"]},
                                 x, train=True, mutable=["batch_stats"])
  training = PixelClassifier(4, (16, 16)).apply({"params": state.params["classifier"]}, latent)
  assert not np.allclose(np.asarray(got), np.asarray(training), atol=1e-4)   # running statistics used
