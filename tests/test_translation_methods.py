"""Image-level UDA (methods/uda/translation.py, cyclegan.py, seuda.py, cycada.py): the losses and
the image pool against numpy written from their formulas (SIFA's fake_image_pool), each
sub-update changes exactly the networks it owns, one generator step against SGD on the
hand-written CycleGAN objective (flax modules applied here), SeUDA's mask term through the frozen
segmenter, CyCADA's labels from the frozen source model, pmap = one device, the config checks,
SeUDA's test-time network and CycleGAN end to end on a tiny two-site dataset."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import every_leaf_changed, leaves_equal, make_sites_dataset, tiny_config
from medgen_jax import losses, methods, parallel, train_lib
from medgen_jax.data.sampler import SourceTargetSampler
from medgen_jax.methods import deepall
from medgen_jax.methods.base import RunInfo, init_net
from medgen_jax.methods.uda import cycada, cyclegan, seuda, translation
from medgen_jax.models.gan import PatchGAN, ResNetGenerator

INFO = RunInfo(num_classes=4, input_shape=(16, 16, 1))
AXIS_INFO = RunInfo(num_classes=4, input_shape=(16, 16, 1), axis_name=parallel.AXIS_NAME)
UDA = {"data.sites": ("A",), "data.held_out": ("C",), "data.target_adaptation": True,
       "eval.selection": "last", "data.normalization.name": "site_range"}
IDENTITY = 5.0   # CycleGAN's optional identity loss on (λ_idt·λ = 0.5·10), so that it is tested too
GAN = {"gan.gen_features": 4, "gan.gen_blocks": 1, "gan.disc_features": 4, "gan.disc_layers": 2,
       "gan.pool_size": 2, "gan.identity_weight": IDENTITY}
CYCLEGAN = {"method": "cyclegan"}
SEUDA = {"method": "seuda", "seuda.pretrain_steps": 2, "seuda.mask_disc_features": 4}
CYCADA = {"method": "cycada", "cycada.pretrain_steps": 2, "cycada.disc_features": 4, "cycada.disc_layers": 2,
          "cycada.semantic_weight": 10.0}
GAN_NETS = ("g_st", "g_ts", "d_s", "d_t")
TRANSLATION_NETS = GAN_NETS + ("pool_s", "pool_t")

# The networks of the tiny GAN config, built here from models/gan.py (not translation.py's
# factories): SIFA's generator (zero padding, tanh(x + out)) and bias-free PatchGANs.
GEN = ResNetGenerator(base_features=4, num_blocks=1, skip=True, padding_mode="constant")
DISC = PatchGAN(features=4, num_layers=2, pad=2, use_bias=False)
MASK_DISC = PatchGAN(features=4, num_layers=2, pad=2, use_bias=False)


def config_of(method, root="unused", **more):
  return tiny_config(root, **{**UDA, **GAN, **method, **more})


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  return {"source": {"image": np.tanh(rng.normal(size=(4, 16, 16, 1))).astype(np.float32),
                     "label": rng.integers(0, 4, size=(4, 16, 16)).astype(np.int32),
                     "domain": np.zeros(4, np.int32)},
          "target": {"image": np.tanh(0.5 * rng.normal(size=(4, 16, 16, 1)) + 0.4).astype(np.float32),
                     "domain": np.ones(4, np.int32)}}


# --- Helpers -------------------------------------------------------------------------------------


def tree_norm(tree) -> float:
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree))))


def tree_diff(a, b):
  return jax.tree.map(lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64), a, b)


def at_step(state, step):
  return state.replace(step=jnp.asarray(step, jnp.int32))


def with_sgd(state, names):
  """GAN networks `names` with SGD's (empty) optimizer state, for translation.gan_adam = SGD(1)."""
  return state.replace(nets=dict(state.nets, **{n: state.nets[n].replace(opt_state=optax.sgd(1.0).init(
      state.nets[n].params)) for n in names}))


def init_with_nets_of(module, config, donor, key=1):
  """`module.init_state` whose translation networks and pools are `donor`'s (same gan config):
  the comparisons with CycleGAN's step need them, and it skips four network initializations."""
  mp = pytest.MonkeyPatch()
  mp.setattr(cyclegan, "init_translation_nets", lambda key, config, info: {n: donor.nets[n] for n in TRANSLATION_NETS})
  try:
    return module.init_state(jax.random.PRNGKey(key), config, INFO)
  finally:
    mp.undo()


def gen(p, x):
  return GEN.apply({"params": p}, x, train=True)


def disc(p, x):
  return DISC.apply({"params": p}, x, train=True)


def hand_generator_loss(nets, p_st, p_ts, x_s, x_t, *, cycle=10.0, identity=IDENTITY):
  """L_G written out: LSGAN both ways, λ·L1 cycles, w_idt·L1 identities (Zhu et al. eq. 3)."""
  fake_t, fake_s = gen(p_st, x_s), gen(p_ts, x_t)
  adv = (jnp.mean(jnp.square(disc(nets["d_t"].params, fake_t) - 1.0))
         + jnp.mean(jnp.square(disc(nets["d_s"].params, fake_s) - 1.0)))
  cyc = cycle * (jnp.mean(jnp.abs(x_s - gen(p_ts, fake_t))) + jnp.mean(jnp.abs(x_t - gen(p_st, fake_s))))
  idt = identity * (jnp.mean(jnp.abs(gen(p_st, x_t) - x_t)) + jnp.mean(jnp.abs(gen(p_ts, x_s) - x_s)))
  return adv + cyc + idt, (adv, cyc, idt)


def hand_lsd(d, real, fake):
  """½[mean (D(real) − 1)² + mean D(fake)²]."""
  return 0.5 * (jnp.mean(jnp.square(d(real) - 1.0)) + jnp.mean(jnp.square(d(fake))))


def segment(config, params, batch_stats, x):
  """The U-Net in inference mode (the frozen segmenters of SeUDA / CyCADA)."""
  return deepall.segmenter(config, INFO, train=False).apply({"params": params, "batch_stats": batch_stats}, x,
                                                             train=False)


def assert_sgd_step(new, old, delta, *, rel=1e-4):
  """new == old − delta up to float32 round-off: the error is below `rel` times the step (1e-2
  where `delta` is one term's part of a step taken from another method's result)."""
  error = tree_norm(tree_diff(new, jax.tree.map(lambda p, d: p - d, old, delta)))
  size = tree_norm(delta)
  assert size > 1e-6, size
  assert error < rel * size, (error, size)


def sgd_patch():
  """translation.gan_adam -> SGD(1) (every GAN network); trace the jitted steps inside it."""
  mp = pytest.MonkeyPatch()
  mp.setattr(translation, "gan_adam", lambda config: optax.sgd(1.0))
  return mp


def perturbed_stats(batch_stats, seed):
  """BatchNorm running statistics as after training: means moved a little, variances scaled."""
  rng = np.random.default_rng(seed)
  noise = lambda s: rng.normal(size=s.shape).astype(np.float32)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: s + 0.01 * noise(s) if path[-1].key == "mean" else s * (1 + 0.5 * np.abs(noise(s))),
      batch_stats)


# --- 1. Losses by hand ---------------------------------------------------------------------------


def test_semantic_consistency_cycle_and_identity_losses_by_hand():
  logits = np.array([[[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]],
                     [[-2.0, 1.0, 0.0], [0.0, 0.0, 0.0]]], np.float32)   # [2, 2, C=3]
  labels = np.array([[0, 1], [1, 2]])
  # log softmax by hand: z − log Σ exp z, picked at the label, averaged over the 4 pixels
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -np.mean([logp[0, 0, 0], logp[0, 1, 1], logp[1, 0, 1], logp[1, 1, 2]])
  np.testing.assert_allclose(losses.semantic_consistency_loss(jnp.asarray(logits), labels), want, rtol=1e-6)
  # pixel 2 of row 1: uniform logits -> −log(1/3); one pixel, by hand
  np.testing.assert_allclose(losses.semantic_consistency_loss(logits[1:, 1:], labels[1:, 1:]), np.log(3.0),
                             rtol=1e-6)
  # confident and right -> ~0; confident and wrong -> ~the margin
  np.testing.assert_allclose(losses.semantic_consistency_loss(jnp.array([[30.0, 0.0]]), jnp.array([0])), 0.0,
                             atol=1e-6)
  np.testing.assert_allclose(losses.semantic_consistency_loss(jnp.array([[30.0, 0.0]]), jnp.array([1])), 30.0,
                             rtol=1e-6)

  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(2, 8, 8, 1)).astype(np.float32), rng.normal(size=(2, 8, 8, 1)).astype(np.float32)
  assert float(losses.cycle_loss(x, x)) == 0.0
  np.testing.assert_allclose(losses.cycle_loss(x, y), 10.0 * np.mean(np.abs(x - y)), rtol=1e-6)
  np.testing.assert_allclose(losses.cycle_loss(x, y, weight=2.5), 2.5 * np.mean(np.abs(x - y)), rtol=1e-6)
  np.testing.assert_allclose(translation.identity_loss(x, y, weight=5.0), 5.0 * np.mean(np.abs(y - x)), rtol=1e-6)
  assert float(translation.identity_loss(x, x, weight=5.0)) == 0.0


# --- 2. Image pool -------------------------------------------------------------------------------

POOL = 3


def _pool_batches(n, rows=4):
  """Batch i: rows of the constant 10·i + row, so every output names the batch it came from."""
  return [np.broadcast_to((10.0 * i + np.arange(rows))[:, None, None, None], (rows, 2, 2, 1)).astype(np.float32)
          for i in range(n)]


def _empty_pool(rows=4, size=POOL):
  return init_net({}, {"images": jnp.zeros((size, rows, 2, 2, 1), jnp.float32), "count": jnp.zeros((), jnp.int32)},
                  None)


def sifa_fake_image_pool(batches, keys, size):
  """SIFA's fake_image_pool (main.py) in numpy, its two random draws (random.random() > 0.5,
  random.randint) taken from jax.random on the halves of the step's key."""
  stored, count, outs = [None] * size, 0, []
  for new, key in zip(batches, keys):
    if count < size:
      stored[count] = new
      count += 1
      outs.append(new)
    else:
      coin_key, index_key = jax.random.split(key)
      if float(jax.random.uniform(coin_key)) > 0.5:
        i = int(jax.random.randint(index_key, (), 0, size))
        outs.append(stored[i])
        stored[i] = new
      else:
        outs.append(new)
  return outs, stored, count


@pytest.fixture(scope="module")
def pool_query_one():
  return jax.jit(lambda pool, images, key: translation.pool_query(pool, images, key, size=POOL, axis_name=None))


def test_pool_fills_then_matches_sifas_fake_image_pool(pool_query_one):
  n = 40
  batches, keys = _pool_batches(n), [jax.random.PRNGKey(100 + i) for i in range(n)]
  pool, outs = _empty_pool(), []
  for i, (b, k) in enumerate(zip(batches, keys)):
    pool, out = pool_query_one(pool, b, k)
    outs.append(np.asarray(out))
    if i < POOL:   # filling: the new batch is returned and stored at index count
      np.testing.assert_array_equal(outs[-1], b)
      np.testing.assert_array_equal(pool.batch_stats["images"][i], b)
      assert int(pool.batch_stats["count"]) == i + 1
  want, stored, count = sifa_fake_image_pool(batches, keys, POOL)
  for i, (got, w) in enumerate(zip(outs, want)):
    np.testing.assert_array_equal(got, w, err_msg=f"call {i}")
  np.testing.assert_array_equal(pool.batch_stats["images"], np.stack(stored))
  assert int(pool.batch_stats["count"]) == count == POOL
  assert sum(not np.array_equal(o, b) for o, b in zip(outs, batches)) >= 5   # the history was used


def test_pool_structure_and_frequencies(pool_query_one):
  """Without the key derivation: after filling, each call returns either the new batch (pool
  unchanged) or a stored batch, and then exactly that slot now holds the new batch; the stored
  batch comes back about half the time, from every slot."""
  n = 300
  batches = _pool_batches(n)
  pool = _empty_pool()
  swaps, slots = 0, set()
  for i, b in enumerate(batches):
    before = np.asarray(pool.batch_stats["images"]).copy()
    pool, out = pool_query_one(pool, b, jax.random.PRNGKey(7000 + i))
    out, after = np.asarray(out), np.asarray(pool.batch_stats["images"])
    if i < POOL:
      continue
    if np.array_equal(out, b):
      np.testing.assert_array_equal(after, before)
    else:
      hits = [j for j in range(POOL) if np.array_equal(out, before[j])]
      assert len(hits) == 1, i
      j = hits[0]
      np.testing.assert_array_equal(after[j], b)
      np.testing.assert_array_equal(np.delete(after, j, 0), np.delete(before, j, 0))
      swaps += 1
      slots.add(j)
  assert 0.4 < swaps / (n - POOL) < 0.6, swaps
  assert slots == set(range(POOL))


def test_pool_size_zero_is_the_identity():
  pool = _empty_pool(size=1)
  b = _pool_batches(2)[1]
  new, out = translation.pool_query(pool, jnp.asarray(b), jax.random.PRNGKey(0), size=0, axis_name=None)
  np.testing.assert_array_equal(out, b)
  assert leaves_equal(new, pool)


def test_pool_under_pmap_equals_one_device_and_replicas_agree(pool_query_one):
  devices = jax.local_devices()[:2]
  query = jax.pmap(lambda pool, images, key: translation.pool_query(pool, images, key, size=POOL,
                                                                    axis_name=parallel.AXIS_NAME),
                   axis_name=parallel.AXIS_NAME, in_axes=(0, 0, None), devices=devices)
  one = _empty_pool()
  two = jax.tree.map(lambda x: jnp.stack([x, x]), _empty_pool())
  swaps = 0
  for i, b in enumerate(_pool_batches(14)):
    key = jax.random.PRNGKey(300 + i)
    one, out1 = pool_query_one(one, b, key)
    two, out2 = query(two, b.reshape(2, 2, 2, 2, 1), key)   # rows 0-1 on device 0, 2-3 on device 1
    np.testing.assert_array_equal(np.asarray(out2).reshape(out1.shape), out1, err_msg=f"call {i}")
    for r in (0, 1):
      np.testing.assert_array_equal(two.batch_stats["images"][r], one.batch_stats["images"])
      assert int(two.batch_stats["count"][r]) == int(one.batch_stats["count"])
    swaps += not np.array_equal(np.asarray(out1), b)
  assert swaps >= 3   # the random branch ran


# --- CycleGAN: ownership, SGD oracle, pmap -------------------------------------------------------


@pytest.fixture(scope="module")
def cyclegan_parts():
  config = config_of(CYCLEGAN)
  return config, cyclegan.init_state(jax.random.PRNGKey(0), config, INFO), jax.jit(cyclegan.make_step(config, INFO))


@pytest.fixture(scope="module")
def cyclegan_sgd(cyclegan_parts, batch):
  """Each sub-update run on its own from the initial state, every GAN optimizer SGD(1) (one
  compilation for the three): (state, after_g, metrics_g, fake_t, after_d, metrics_d, after_s)."""
  config, state, _ = cyclegan_parts
  state = with_sgd(state, GAN_NETS)
  mp = sgd_patch()
  try:
    @jax.jit
    def subs(state, batch, key):
      after_g, m_g, (fake_t, _) = cyclegan.generator_update(state, batch, key, config, INFO)
      after_d, m_d = cyclegan.discriminator_update(state, "d_t", "pool_t", batch["target"]["image"], fake_t, key,
                                                   config, INFO)
      after_s, _ = cyclegan.segmenter_update(state, fake_t, batch["source"]["label"], key, config, INFO)
      return after_g, m_g, fake_t, after_d, m_d, after_s

    return (state, *subs(state, batch, jax.random.PRNGKey(3)))
  finally:
    mp.undo()


def test_cyclegan_sub_updates_change_only_what_they_own(cyclegan_sgd):
  state, after_g, _, fake_t, after_d, _, after_s = cyclegan_sgd
  top = ("params", "batch_stats", "opt_state", "step")
  # generators: g_st and g_ts move; nothing else
  for name in ("g_st", "g_ts"):
    assert every_leaf_changed(state.nets[name].params, after_g.nets[name].params), name
  for name in ("d_s", "d_t", "pool_s", "pool_t"):
    assert leaves_equal(state.nets[name], after_g.nets[name]), name
  for part in top:
    assert leaves_equal(getattr(state, part), getattr(after_g, part)), part
  # D_t: d_t and pool_t only; the empty pool stores the fakes at index 0
  assert every_leaf_changed(state.nets["d_t"].params, after_d.nets["d_t"].params)
  np.testing.assert_array_equal(after_d.nets["pool_t"].batch_stats["images"][0], fake_t)
  assert int(after_d.nets["pool_t"].batch_stats["count"]) == 1
  for name in ("g_st", "g_ts", "d_s", "pool_s"):
    assert leaves_equal(state.nets[name], after_d.nets[name]), name
  for part in top:
    assert leaves_equal(getattr(state, part), getattr(after_d, part)), part
  # segmenter: the top level only (params, BN statistics, Adam state, step + 1)
  for part in ("params", "batch_stats", "opt_state"):
    assert every_leaf_changed(getattr(state, part), getattr(after_s, part)), part
  assert int(after_s.step) == int(state.step) + 1
  assert leaves_equal(state.nets, after_s.nets)


def test_cyclegan_generator_and_discriminator_steps_are_sgd_on_the_hand_written_losses(cyclegan_sgd, batch):
  """SGD(1): g_st, g_ts move by −∇ of L_G written out (LSGAN both ways, 10·L1 cycles, 5·L1
  identities, G and D applied here), D_t by −∇ ½[mean (D(x_t) − 1)² + mean D(G_st(x_s))²] (the
  filling pool returns the fakes); the logged terms are the hand values."""
  state, after_g, metrics, _, after_d, m_d, _ = cyclegan_sgd
  x_s, x_t = batch["source"]["image"], batch["target"]["image"]
  nets = state.nets

  @jax.jit
  def hand(nets):
    (loss, terms), grads = jax.value_and_grad(
        lambda a, b: hand_generator_loss(nets, a, b, x_s, x_t), argnums=(0, 1), has_aux=True)(
            nets["g_st"].params, nets["g_ts"].params)
    fake_t = gen(nets["g_st"].params, x_s)
    loss_d, g_d = jax.value_and_grad(lambda p: hand_lsd(lambda x: disc(p, x), x_t, fake_t))(nets["d_t"].params)
    return loss, terms, grads, loss_d, g_d

  loss, (adv, cyc, idt), grads, loss_d, g_d = hand(nets)
  assert float(idt) > 1e-3 and float(cyc) > 0.1   # untrained generators: neither term is ~0
  for name, g in zip(("g_st", "g_ts"), grads):
    assert_sgd_step(after_g.nets[name].params, nets[name].params, g)
  np.testing.assert_allclose(metrics["loss_gen"], loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss_gen_adv"], adv, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss_cycle"], cyc, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss_identity"], idt, rtol=1e-5)
  np.testing.assert_allclose(metrics["gen_grad_norm"], tree_norm(grads), rtol=1e-4)
  assert_sgd_step(after_d.nets["d_t"].params, nets["d_t"].params, g_d)
  np.testing.assert_allclose(m_d["loss_d_t"], loss_d, rtol=1e-5)


@pytest.mark.slow  # ~35 s; the pmapped CycleGAN step runs in CI in the end-to-end test (4 devices),
# its math in the hand-written-loss tests, and device equality for a dozen other steps
def test_cyclegan_step_on_two_devices_equals_one_device(cyclegan_parts, batch):
  """Three full steps (Adam): generators, D_t, D_s with the pools past filling, the U-Net with
  its BatchNorm; both replicas identical."""
  config, state, step = cyclegan_parts
  runner = parallel.DataParallel(cyclegan.make_step(config, AXIS_INFO), num_devices=2, donate=False)
  one, two = state, runner.replicate(state)
  for i in range(3):
    key = jax.random.PRNGKey(20 + i)
    one, m1 = step(one, batch, key)
    two, m2 = runner.step(two, batch, key)
    for name in ("loss", "loss_gen", "loss_d_t", "loss_d_s"):
      np.testing.assert_allclose(m2[name], m1[name], rtol=1e-4, err_msg=name)
  replicas = [jax.tree.map(lambda x, r=r: np.asarray(x[r]), two) for r in (0, 1)]
  assert leaves_equal(replicas[0], replicas[1])
  two = replicas[0]
  assert int(one.first_bad_step) == 0 and int(two.step) == 3
  groups = {"segmenter": (state.params, one.params, two.params),
            "batch_stats": (state.batch_stats, one.batch_stats, two.batch_stats)}
  groups.update({n: (state.nets[n].params, one.nets[n].params, two.nets[n].params) for n in GAN_NETS})
  for name, (before, a, b) in groups.items():
    change = tree_norm(tree_diff(a, before))
    assert change > 1e-4, name
    assert tree_norm(tree_diff(a, b)) < 1e-3 * change, name
  for name in ("pool_s", "pool_t"):
    np.testing.assert_allclose(two.nets[name].batch_stats["images"], one.nets[name].batch_stats["images"], atol=1e-5)
    assert int(two.nets[name].batch_stats["count"]) == int(one.nets[name].batch_stats["count"]) == 2


# --- SeUDA ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seuda_sgd(cyclegan_sgd, batch):
  """SeUDA's phase-1 step, every GAN optimizer SGD(1), λ_sem = 0.5, from CycleGAN's initial
  translation networks; the segmenter with trained-like BN statistics."""
  config = config_of(SEUDA, **{"seuda.semantic_weight": 0.5})
  state = at_step(init_with_nets_of(seuda, config, cyclegan_sgd[0]), config.seuda.pretrain_steps)
  assert set(state.nets) == {"source", "d_mask", *TRANSLATION_NETS}
  state = with_sgd(state.replace(batch_stats=perturbed_stats(state.batch_stats, 5)), ("d_mask",))
  mp = sgd_patch()
  try:
    new, metrics = jax.jit(lambda s, b, k: seuda.adapt_step(s, b, k, config, INFO))(state, batch, jax.random.PRNGKey(3))
  finally:
    mp.undo()
  return config, state, new, metrics


def test_seuda_phase1_changes_the_translation_networks_and_freezes_the_segmenter(seuda_sgd):
  config, state, new, metrics = seuda_sgd
  assert int(new.step) == config.seuda.pretrain_steps + 1 and int(new.first_bad_step) == 0
  for name in GAN_NETS + ("d_mask",):
    assert every_leaf_changed(state.nets[name].params, new.nets[name].params), name
  for name in ("pool_s", "pool_t"):
    assert int(new.nets[name].batch_stats["count"]) == 1, name
  for part in ("params", "batch_stats", "opt_state"):   # f_S: frozen
    assert leaves_equal(getattr(state, part), getattr(new, part)), part
  assert leaves_equal(state.nets["source"], new.nets["source"])
  assert np.isfinite(float(metrics["loss_gen_mask"])) and np.isfinite(float(metrics["loss_d_mask"]))


def test_seuda_mask_term_reaches_g_ts_through_the_frozen_segmenter(seuda_sgd, cyclegan_sgd, batch):
  """From the same networks, SeUDA's SGD(1) step is CycleGAN's (g_st: equal, i.e. λ_sem = 0 is
  CycleGAN) plus, on g_ts only, −λ·∇ mean (D_m(softmax f_S(G_ts(x_t))) − 1)², f_S the frozen
  segmenter in inference mode; D_m moves by −∇ LSD(D_m(softmax f_S(x_s)), D_m(softmax
  f_S(G_ts'(x_t)))) with the UPDATED G_ts'."""
  config, state, new, metrics = seuda_sgd
  plain = cyclegan_sgd[1]   # CycleGAN's generator update from the same g_st, g_ts, d_s, d_t
  x_s, x_t = batch["source"]["image"], batch["target"]["image"]
  lam, psi = config.seuda.semantic_weight, state.nets["d_mask"].params
  d_m = lambda p, probs: MASK_DISC.apply({"params": p}, probs, train=True)

  @jax.jit
  def hand(p_ts, p_ts_new):
    probs = lambda x: jax.nn.softmax(segment(config, state.params, state.batch_stats, x), axis=-1)
    mask_term = lambda p: jnp.mean(jnp.square(d_m(psi, probs(gen(p, x_t))) - 1.0))
    term, g_mask = jax.value_and_grad(mask_term)(p_ts)
    real_m, fake_m = probs(x_s), probs(gen(p_ts_new, x_t))
    loss_m, g_psi = jax.value_and_grad(lambda p: hand_lsd(lambda x: d_m(p, x), real_m, fake_m))(psi)
    return term, g_mask, loss_m, g_psi

  term, g_mask, loss_m, g_psi = hand(state.nets["g_ts"].params, new.nets["g_ts"].params)
  assert_sgd_step(new.nets["g_ts"].params, plain.nets["g_ts"].params, jax.tree.map(lambda g: lam * g, g_mask),
                  rel=1e-2)
  for a, b in zip(jax.tree.leaves(new.nets["g_st"].params), jax.tree.leaves(plain.nets["g_st"].params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(metrics["loss_gen_mask"], term, rtol=1e-5)
  assert_sgd_step(new.nets["d_mask"].params, psi, g_psi)
  np.testing.assert_allclose(metrics["loss_d_mask"], loss_m, rtol=1e-5)


def test_seuda_eval_network_segments_the_translated_target(seuda_sgd, batch):
  """segmenter(G_ts(x)) in inference mode, from state.params/batch_stats and nets['g_ts']."""
  config, _, state, _ = seuda_sgd   # after a phase-1 step: a trained g_ts, non-trivial BN statistics
  model, variables_of = seuda.eval_network(config, INFO)

  @jax.jit
  def both(state, x):
    got = model.apply(variables_of(state), x, train=False)
    translated = GEN.apply({"params": state.nets["g_ts"].params}, x, train=False)
    return (got, segment(config, state.params, state.batch_stats, translated),
            segment(config, state.params, state.batch_stats, x))

  got, want, direct = both(state, batch["target"]["image"])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(direct - want))) > 1e-4   # the translator matters


# --- CyCADA --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cycada_sgd(cyclegan_sgd, batch):
  """CyCADA's phase-1 step (GAN optimizers SGD(1); the task model's and D_f's Adam untouched)
  from CycleGAN's initial translation networks, f_T = f_S as after the source phase; and the
  same step with a different task model f_T, and with a different frozen source model f_S."""
  config = config_of(CYCADA)
  state = at_step(init_with_nets_of(cycada, config, cyclegan_sgd[0]), config.cycada.pretrain_steps)
  assert set(state.nets) == {"source", "d_feat", *TRANSLATION_NETS}
  stats = perturbed_stats(state.batch_stats, 6)
  state = state.replace(batch_stats=stats)
  state = state.replace(nets=dict(state.nets, source=state.nets["source"].replace(batch_stats=stats)))
  rng = np.random.default_rng(9)
  shift = lambda tree: jax.tree.map(lambda p: p + 0.1 * rng.normal(size=p.shape).astype(np.float32), tree)
  src = state.nets["source"]
  variants = {"base": state, "other_task": state.replace(params=shift(state.params)),
              "other_source": state.replace(nets=dict(state.nets, source=src.replace(params=shift(src.params))))}
  mp = sgd_patch()
  try:
    step = jax.jit(lambda s, b, k: cycada.adapt_step(s, b, k, config, INFO))
    return config, variants, {k: step(s, batch, jax.random.PRNGKey(3)) for k, s in variants.items()}
  finally:
    mp.undo()


def test_cycada_phase1_ownership(cycada_sgd):
  config, variants, results = cycada_sgd
  state, (new, metrics) = variants["base"], results["base"]
  assert leaves_equal(state.params, state.nets["source"].params)
  assert int(new.first_bad_step) == 0 and int(new.step) == config.cycada.pretrain_steps + 1
  assert leaves_equal(state.nets["source"], new.nets["source"])           # f_S frozen
  assert every_leaf_changed(state.params, new.params)                     # f_T trained
  assert every_leaf_changed(state.batch_stats, new.batch_stats)
  assert every_leaf_changed(state.opt_state["target"], new.opt_state["target"])
  assert leaves_equal(state.opt_state["source"], new.opt_state["source"])
  for name in GAN_NETS + ("d_feat",):
    assert every_leaf_changed(state.nets[name].params, new.nets[name].params), name
  for name in ("loss_semantic", "loss_d_feat", "loss_feat_adv", "loss"):
    assert np.isfinite(float(metrics[name])), name


def test_cycada_semantic_term_uses_the_frozen_source_models_labels(cycada_sgd, cyclegan_sgd, batch):
  """SGD(1): CyCADA's generator step = CycleGAN's from the same networks (λ_sem = 0) − λ_sem·∇
  [CE(f_S(G_st(x_s)), argmax f_S(x_s)) + CE(f_S(G_ts(x_t)), argmax f_S(x_t))], f_S = nets['source']
  in inference mode, log-softmax written out; a different task model f_T leaves the generator
  step bit-identical, a different f_S changes it."""
  config, variants, results = cycada_sgd
  state, (new, metrics) = variants["base"], results["base"]
  plain = cyclegan_sgd[1]
  lam, src = config.cycada.semantic_weight, state.nets["source"]
  x_s, x_t = batch["source"]["image"], batch["target"]["image"]

  @jax.jit
  def hand(p_st, p_ts):
    f_s = lambda x: segment(config, src.params, src.batch_stats, x)

    def ce(logits, labels):
      z = logits - jnp.max(logits, axis=-1, keepdims=True)
      logp = z - jnp.log(jnp.sum(jnp.exp(z), axis=-1, keepdims=True))
      return -jnp.mean(jnp.sum(logp * jax.nn.one_hot(labels, logits.shape[-1]), axis=-1))

    y_s, y_t = jnp.argmax(f_s(x_s), -1), jnp.argmax(f_s(x_t), -1)
    term = lambda a, b: ce(f_s(gen(a, x_s)), y_s) + ce(f_s(gen(b, x_t)), y_t)
    return jax.value_and_grad(term, argnums=(0, 1))(p_st, p_ts), (y_s, y_t)

  (term, grads), labels = hand(state.nets["g_st"].params, state.nets["g_ts"].params)
  assert all(len(np.unique(y)) > 1 for y in labels)   # non-trivial labels
  np.testing.assert_allclose(metrics["loss_semantic"], term, rtol=1e-5)
  for name, g in zip(("g_st", "g_ts"), grads):
    assert_sgd_step(new.nets[name].params, plain.nets[name].params, jax.tree.map(lambda x: lam * x, g), rel=1e-2)
  other_task, other_source = results["other_task"][0], results["other_source"][0]
  assert not leaves_equal(new.params, other_task.params)
  for name in ("g_st", "g_ts"):
    assert leaves_equal(new.nets[name].params, other_task.nets[name].params), name
    assert not leaves_equal(new.nets[name].params, other_source.nets[name].params), name


# --- 8. Config checks ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", [CYCLEGAN, SEUDA, CYCADA], ids=lambda m: m["method"])
def test_validate_refuses_whitening_augmentation_and_val_selection(method):
  module = methods.get(method["method"])
  module.validate(config_of(method))
  with pytest.raises(ValueError, match=r"normalization.name='whitening'.*site_range"):
    module.validate(config_of(method, **{"data.normalization.name": "whitening"}))
  with pytest.raises(ValueError, match="site_range"):
    module.validate(config_of(method, **{"data.normalization.output_range": (0.0, 1.0)}))
  with pytest.raises(ValueError, match=r"augment.enabled=True"):
    module.validate(config_of(method, **{"augment.enabled": True}))
  with pytest.raises(ValueError, match="data.target_adaptation=True"):
    module.validate(config_of(method, **{"data.target_adaptation": False}))
  with pytest.raises(ValueError, match="in_plane_shape"):
    module.validate(config_of(method, **{"data.in_plane_shape": (18, 16)}))
  val = config_of(method, **{"eval.selection": "val"})
  if method is CYCLEGAN:
    module.validate(val)   # one phase: the best source-validation checkpoint is a CycleGAN one
  else:
    with pytest.raises(ValueError, match=r"eval.selection='val'"):
      module.validate(val)


# --- 10. End to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory):
  return make_sites_dataset(tmp_path_factory.mktemp("translation") / "toy", sites=("A", "C"), cases=4)


def test_cyclegan_trains_end_to_end_without_target_labels(two_sites, tmp_path, monkeypatch):
  seen = []
  original = SourceTargetSampler.batch_at

  def recording(self, step, **kw):
    out = original(self, step, **kw)
    seen.append((out, all(self.adapt_cache.sites[s].labels is None for s in self.targets)))
    return out

  monkeypatch.setattr(SourceTargetSampler, "batch_at", recording)
  config = config_of(CYCLEGAN, two_sites, **{"num_steps": 3, "log_every": 1, "eval_every": 3,
                                              "checkpoint.every": 3, "eval.distances": False})
  result = train_lib.train_and_evaluate(config, tmp_path / "run")
  run = tmp_path / "run"
  for name in ("results.md", "results.csv", "results.json", "metrics.jsonl"):
    assert (run / name).is_file(), name
  assert "| CycleGAN |" in result["markdown"]
  assert (run / "cyclegan" / "translation_preview.png").is_file()
  assert {r["site"] for r in result["records"]} >= {"C"}
  assert all(np.all(np.isfinite(r["dice"])) for r in result["records"])
  train = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in train if r["kind"] == "train"]
  assert len(train) == 3
  for r in train:
    for name in ("loss", "loss_gen", "loss_cycle", "loss_d_t", "loss_d_s"):
      assert r[name] is not None and np.isfinite(r[name]), (name, r)
  assert len(seen) >= 3
  for b, unlabelled in seen:
    assert unlabelled and set(b["target"]) == {"image", "domain"} and "label" in b["source"]
    for half in ("source", "target"):   # site_range: images in [-1, 1]
      assert -1.0 - 1e-6 <= b[half]["image"].min() and b[half]["image"].max() <= 1.0 + 1e-6
