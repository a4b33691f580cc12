"""UMMKD (methods/multisite/ummkd.py) and the shared-stream U-Nets (models/multimodal.py) against
hand computations written from methods.md §1.1, §1.2, §1.5, §1.7 and the released `_get_kd_cost`
(carrenD/ummkd network.py): the KD loss in numpy, its gradient by finite differences, the total
loss, a hand SGD step, the per-modality grouping, the Y/X parameter trees, pmap, end to end."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import make_sites_dataset, tiny_config
from medgen_jax import parallel, train_lib
from medgen_jax.config import base_config
from medgen_jax.evaluation import load_trained_models
from medgen_jax.losses.distillation import unmasked_kd_loss
from medgen_jax.methods import label as method_label
from medgen_jax.methods.multisite import ummkd
from medgen_jax.models import UNet
from medgen_jax.models.domains import UNSEEN
from medgen_jax.models.multimodal import MultiModalUNet
from medgen_jax.train_state import create_train_state, make_optimizer

C = 4  # classes in the loss tests


# --- Hand computations (numpy; `xp=jnp` only where a hand gradient is needed) -------------------


def softmax(z, xp=np):
  e = xp.exp(z - z.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def hand_kd_terms(za, ya, zb, yb, num_classes, temperature=2.0, eps=1e-6, xp=np):
  """Per class c: ½ [KL(q_c^a‖q_c^b) + KL(q_c^b‖q_c^a)], q_c = softmax(z̄_c / T), z̄_c the mean
  logit vector of the class-c pixels (sum / (count + eps)): the released _get_kd_cost loop."""
  za, zb = za.reshape(-1, num_classes), zb.reshape(-1, num_classes)
  ya, yb = np.asarray(ya).reshape(-1), np.asarray(yb).reshape(-1)
  terms = []
  for c in range(num_classes):
    ma, mb = (ya == c).astype(np.float64)[:, None], (yb == c).astype(np.float64)[:, None]
    qa = softmax((ma * za).sum(0) / (ma.sum() + eps) / temperature, xp)
    qb = softmax((mb * zb).sum(0) / (mb.sum() + eps) / temperature, xp)
    terms.append(((qa * xp.log(qa / qb)).sum() + (qb * xp.log(qb / qa)).sum()) / 2.0)
  return terms


def hand_kd(za, ya, zb, yb, num_classes, **kw):
  return sum(hand_kd_terms(za, ya, zb, yb, num_classes, **kw)) / num_classes


def hand_seg(z, y, num_classes, xp=np):
  """§1.2 class-balanced CE (weights 1 − n_c/N, clip 0.005) + §1.1 squared Dice (1 − mean_c)."""
  p = softmax(z, xp)
  g = np.eye(num_classes)[np.asarray(y)]
  n = g.reshape(-1, num_classes).sum(0)
  w = 1 - n / n.sum()
  ce = xp.mean(xp.sum(-w * g * xp.log(xp.clip(p, 0.005, 1.0)), axis=-1))
  axes = tuple(range(p.ndim - 1))
  dice = 2 * (p * g).sum(axes) / ((p * p).sum(axes) + g.sum(axes) + 1e-7)
  return ce + 1 - dice.mean()


def hand_total(logits, labels, domain, kernels, *, num_classes, kd_weight=0.5, xp=np):
  """Σ_m seg_m + kd_weight · mean over modality pairs of KD + 1e-4 · Σ ‖kernel‖² / 2."""
  k = int(np.max(domain)) + 1
  rows = [np.flatnonzero(np.asarray(domain) == m) for m in range(k)]
  seg = sum(hand_seg(logits[r], labels[r], num_classes, xp) for r in rows)
  pairs = [(a, b) for a in range(k) for b in range(a + 1, k)]
  kd = sum(hand_kd(logits[rows[a]], labels[rows[a]], logits[rows[b]], labels[rows[b]], num_classes, xp=xp)
           for a, b in pairs) / len(pairs)
  return seg + kd_weight * kd + 1e-4 * sum((w ** 2).sum() for w in kernels) / 2


def onehot(y, c=C):
  return jax.nn.one_hot(jnp.asarray(y), c)


@pytest.fixture(scope="module")
def kd_case():
  """Modality a has every class; modality b has no class 3; class counts differ."""
  rng = np.random.default_rng(0)
  ya = rng.integers(0, C, size=(2, 5, 5))
  yb = rng.integers(0, C - 1, size=(3, 4, 5))
  za = (rng.normal(size=(2, 5, 5, C)) * 2).astype(np.float32)
  zb = (rng.normal(size=(3, 4, 5, C)) * 2 + np.eye(C)[yb]).astype(np.float32)
  return za, ya, zb, yb


# --- The KD loss ----------------------------------------------------------------------------------


def test_kd_loss_is_the_released_one(kd_case):
  za, ya, zb, yb = kd_case
  terms = hand_kd_terms(za.astype(np.float64), ya, zb.astype(np.float64), yb, C)
  got = float(unmasked_kd_loss(za, onehot(ya), zb, onehot(yb)))
  np.testing.assert_allclose(got, sum(terms) / C, rtol=1e-5)   # ½ sym. KL, T = 2, /C incl. background
  assert terms[C - 1] > 1e-3   # class 3 is absent from b: no mask, its uniform q_c^b still pulls a
  # through the method's wrapper ([K, n, C]: 50 pixels of each modality): the same value, and
  # MASF's mask (class_mask=True) drops exactly the absent class's term
  za50, ya50 = za.reshape(-1, C)[:50], ya.reshape(-1)[:50]
  zb50, yb50 = zb.reshape(-1, C)[:50], yb.reshape(-1)[:50]
  z, y = jnp.stack([za50, zb50]), jnp.stack([onehot(ya50), onehot(yb50)])
  t50 = hand_kd_terms(za50.astype(np.float64), ya50, zb50.astype(np.float64), yb50, C)
  np.testing.assert_allclose(float(ummkd.kd_loss(z, y, temperature=2.0)), sum(t50) / C, rtol=1e-5)
  np.testing.assert_allclose(float(ummkd.kd_loss(z, y, temperature=2.0, class_mask=True)),
                             sum(t50[:C - 1]) / C, rtol=1e-5)
  # the temperature matters (sensitivity of the comparison above)
  at_t1 = float(unmasked_kd_loss(za, onehot(ya), zb, onehot(yb), temperature=1.0))
  np.testing.assert_allclose(at_t1, hand_kd(za.astype(np.float64), ya, zb.astype(np.float64), yb, C,
                                            temperature=1.0), rtol=1e-5)
  assert abs(at_t1 - got) > 1e-3


def test_kd_loss_gradient_matches_finite_differences():
  rng = np.random.default_rng(4)
  ya, yb = rng.integers(0, 4, size=(1, 3, 3)), rng.integers(0, 3, size=(1, 3, 4))   # class 3 absent in b
  with jax.enable_x64(True):
    za = jnp.asarray(rng.normal(size=(1, 3, 3, 4)) * 2, jnp.float64)
    zb = jnp.asarray(rng.normal(size=(1, 3, 4, 4)) * 2, jnp.float64)
    oha = jax.nn.one_hot(jnp.asarray(ya), 4, dtype=jnp.float64)
    ohb = jax.nn.one_hot(jnp.asarray(yb), 4, dtype=jnp.float64)
    f = lambda a, b: unmasked_kd_loss(a, oha, b, ohb)
    ga, gb = (np.asarray(g) for g in jax.grad(f, argnums=(0, 1))(za, zb))
    h = 1e-6
    for z, g, which in ((za, ga, 0), (zb, gb, 1)):
      steps = h * jnp.eye(z.size, dtype=jnp.float64).reshape(z.size, *z.shape)
      g_of = (lambda z_: f(z_, zb)) if which == 0 else (lambda z_: f(za, z_))
      values = jax.jit(jax.vmap(g_of))
      numeric = (np.asarray(values(z + steps)) - np.asarray(values(z - steps))) / (2 * h)
      np.testing.assert_allclose(g.reshape(-1), numeric, rtol=1e-5, atol=1e-9)
    # the class-3 pixels of a get a gradient (pulled towards b's uniform q_3): no mask
    assert np.abs(ga[np.asarray(ya) == 3]).max() > 1e-4


# --- The total loss -------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3])
def test_total_loss_is_the_hand_sum(k):
  """Σ_m (WCE + Dice) per modality + 0.5 · KD (mean over the pairs for 3 modalities) + 1e-4 L2 on
  kernels only; the modalities interleaved in the batch in no particular order."""
  rng = np.random.default_rng(1)
  domain = np.array([1, 0, 0, 1, 1, 0] + ([2, 2, 2] if k == 3 else []), np.int32)
  b = len(domain)
  labels = rng.integers(0, C, size=(b, 4, 4))
  labels[domain == 1] = np.minimum(labels[domain == 1], C - 2)   # class 3 absent from modality 1
  logits = (rng.normal(size=(b, 4, 4, C)) * 2).astype(np.float32)
  params = {"conv": {"kernel": rng.normal(size=(3, 3, 2, 2)).astype(np.float32)},
            "norm": {"scale": rng.normal(size=(k, 2)).astype(np.float32)},   # not a kernel: no L2
            "head": {"kernel": rng.normal(size=(2, C)).astype(np.float32), "bias": np.ones(C, np.float32)}}
  config = base_config()
  loss, metrics = ummkd.objective(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(domain), params, config,
                                  num_classes=C, num_modalities=k)
  want = hand_total(logits.astype(np.float64), labels, domain,
                    [params["conv"]["kernel"], params["head"]["kernel"]], num_classes=C)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss_seg_m0"]),
                             hand_seg(logits[domain == 0].astype(np.float64), labels[domain == 0], C), rtol=1e-5)
  assert float(metrics["loss_kd"]) > 1e-3


# --- One training step on a tiny Chilopod U-Net -------------------------------------------------


def tiny_batch(seed, b=4, classes=3, k=2):
  rng = np.random.default_rng(seed)
  domain = np.tile(np.arange(k, dtype=np.int32), b // k)
  scale = 1 + 2 * domain[:, None, None, None]   # the modalities differ in contrast
  return {"image": (rng.normal(size=(b, 16, 16, 1)) * scale).astype(np.float32),
          "label": rng.integers(0, classes, size=(b, 16, 16)).astype(np.int32), "domain": domain}


def sgd_config(kd_weight=0.5):
  config = base_config()
  config.optimizer.name, config.optimizer.momentum, config.optimizer.learning_rate = "sgd", 0.0, 0.5
  config.ummkd.kd_weight = kd_weight
  return config


CHILOPOD = UNet(3, base_features=4, depth=2, norm="dsbn", num_domains=2)
SGD = make_optimizer(sgd_config().optimizer, num_steps=10)


@pytest.fixture(scope="module")
def chilopod_step():
  """(init, state after one SGD step with kd_weight 0.5, hand SGD steps {kd_weight: params}) of
  the tiny Chilopod U-Net on tiny_batch(0)."""
  init = create_train_state(0, CHILOPOD, SGD, input_shape=(1, 16, 16, 1))
  step = jax.jit(ummkd.make_train_step(CHILOPOD, SGD, sgd_config(), num_classes=3, num_modalities=2))
  after = step(init, tiny_batch(0), jax.random.PRNGKey(1))[0]
  return init, after, {w: hand_sgd(init, tiny_batch(0), w) for w in (0.0, 0.5)}


def hand_sgd(init, batch, kd_weight, lr=0.5):
  """params − lr · ∇(hand_total) through the same network (its forward is not under test)."""
  def total(params, kd_weight):
    logits, _ = CHILOPOD.apply({"params": params, "batch_stats": init.batch_stats}, batch["image"], train=True,
                               domain=batch["domain"], mutable=["batch_stats"])
    kernels = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params) if path[-1].key == "kernel"]
    return hand_total(logits, batch["label"], batch["domain"], kernels, num_classes=3, kd_weight=kd_weight, xp=jnp)
  grads = _hand_grad(total)(init.params, kd_weight)
  return jax.tree.map(lambda p, g: p - lr * g, init.params, grads)


_GRADS = {}


def _hand_grad(total):   # one compilation for both KD weights (the weight is traced)
  return _GRADS.setdefault("total", jax.jit(jax.grad(total)))


def test_step_is_a_hand_sgd_step_on_the_hand_loss_and_kd_changes_it(chilopod_step):
  init, after, hand = chilopod_step
  for a, b in zip(jax.tree.leaves(after.params), jax.tree.leaves(hand[0.5])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # the KD term changes the update: the hand step without it is elsewhere
  diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(jax.tree.leaves(after.params), jax.tree.leaves(hand[0.0])))
  assert diff > 1e-5


def test_kd_weight_zero_is_the_hand_sum_without_kd():
  rng = np.random.default_rng(3)
  domain = np.array([0, 1, 1, 0], np.int32)
  labels, logits = rng.integers(0, C, size=(4, 4, 4)), rng.normal(size=(4, 4, 4, C)).astype(np.float32)
  loss, metrics = ummkd.objective(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(domain), {}, sgd_config(0.0),
                                  num_classes=C, num_modalities=2)
  np.testing.assert_allclose(float(loss), hand_total(logits.astype(np.float64), labels, domain, [], num_classes=C,
                                                     kd_weight=0.0), rtol=1e-5)
  assert float(metrics["loss_kd"]) > 1e-3   # still reported


def test_kernels_are_shared_and_bn_is_per_modality(chilopod_step):
  init, after, _ = chilopod_step
  # one kernel tree (that of a plain U-Net), per-modality BN rows
  plain = jax.eval_shape(UNet(3, base_features=4, depth=2, norm="batch").init, jax.random.PRNGKey(0),
                         jnp.zeros((1, 16, 16, 1)))
  kernels = lambda tree: {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(tree)
                          if p[-1].key == "kernel"}
  assert kernels(init.params) == kernels(plain["params"]) and len(kernels(init.params)) == 13   # 5 blocks x 2, 2 upconvs, head
  dsbn = [(p, x) for p, x in jax.tree_util.tree_leaves_with_path(after.params) if "dsbn" in jax.tree_util.keystr(p)]
  assert len(dsbn) == 2 * 2 * 5 and all(x.shape[0] == 2 for _, x in dsbn)   # scale, bias of 10 norms
  old = dict(jax.tree_util.tree_leaves_with_path(init.params))
  for p, x in dsbn:   # both modalities' rows moved: each modality's slices trained its own BN
    assert all(np.abs(np.asarray(x)[m] - np.asarray(old[p])[m]).max() > 0 for m in (0, 1))


def test_perturbing_one_modality_leaves_the_others_terms_unchanged():
  batch = tiny_batch(2, b=6)
  noise = np.random.default_rng(9).normal(size=batch["image"].shape).astype(np.float32)
  perturbed = dict(batch, image=batch["image"] + noise * (batch["domain"] == 1)[:, None, None, None])
  config = base_config()

  def terms(model):
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)))
    loss_fn = jax.jit(ummkd.make_loss_fn(model, config, num_classes=3, num_modalities=2))
    return [loss_fn(variables["params"], variables["batch_stats"], b, jax.random.PRNGKey(0))[1][0]
            for b in (batch, perturbed)]

  a, b = terms(CHILOPOD)
  np.testing.assert_allclose(a["loss_seg_m0"], b["loss_seg_m0"], rtol=1e-6)
  assert abs(float(a["loss_seg_m1"]) - float(b["loss_seg_m1"])) > 1e-4
  # sensitivity: a shared (pooled) BatchNorm lets modality 1 change modality 0's term
  a, b = terms(UNet(3, base_features=4, depth=2, norm="batch"))
  assert abs(float(a["loss_seg_m0"]) - float(b["loss_seg_m0"])) > 1e-5


# --- Y/X-shaped networks ----------------------------------------------------------------------------


SPECIFIC = {   # written from the docstring's table, for depth 2
    "all": set(),
    "encoder": {"upconv0", "upconv1", "up0", "up1", "head"},
    "decoder": {"down0", "down1"},
    "middle": {"down0", "down1", "upconv0", "upconv1", "up0", "up1", "head"},
}
BLOCKS = {"down0", "down1", "bottleneck", "upconv1", "up1", "upconv0", "up0", "head"}


def multimodal(shared, norm="dsbn"):
  return MultiModalUNet(3, 2, shared=shared, base_features=4, depth=2, norm=norm)


@pytest.mark.parametrize("shared", ["all", "encoder", "decoder", "middle"])
def test_per_modality_parameters_exactly_where_documented(shared):
  variables = multimodal(shared).init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)))
  want = {b for b in BLOCKS - SPECIFIC[shared]} | {f"{b}_m{m}" for b in SPECIFIC[shared] for m in (0, 1)}
  assert set(variables["params"]) == want
  # per-modality blocks have a plain BN; shared blocks a BN per modality (norm 'dsbn')
  for name, tree in variables["params"].items():
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      if "dsbn" in jax.tree_util.keystr(path):
        assert "_m" not in name and leaf.shape[0] == 2
      if "_m" in name and path[-1].key == "scale":
        assert leaf.ndim == 1
  if shared == "all":   # the plain U-Net's tree
    plain = UNet(3, base_features=4, depth=2, norm="dsbn", num_domains=2).init(jax.random.PRNGKey(0),
                                                                               jnp.zeros((1, 16, 16, 1)))
    assert jax.tree.map(jnp.shape, plain["params"]) == jax.tree.map(jnp.shape, variables["params"])


@pytest.mark.parametrize("shared", [pytest.param("decoder", marks=pytest.mark.slow), "middle"])
def test_per_modality_blocks_see_only_their_modality(shared):
  model = multimodal(shared)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)))
  batch = tiny_batch(3, b=4)
  domain = jnp.asarray(batch["domain"])

  @jax.jit
  def logits(params, image):
    return model.apply({"params": params, "batch_stats": variables["batch_stats"]}, image, train=True,
                       domain=domain, mutable=["batch_stats"])[0]

  # modality 0's output has no gradient into modality 1's blocks, and some into its own
  rows0 = np.flatnonzero(batch["domain"] == 0)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(logits(p, batch["image"])[rows0] ** 2)))(variables["params"])
  for name, tree in grads.items():
    norm = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(tree))
    assert (norm == 0) == name.endswith("_m1"), name
  # modality 1's images do not change modality 0's logits (BN statistics per modality everywhere)
  noise = np.random.default_rng(9).normal(size=batch["image"].shape).astype(np.float32)
  other = batch["image"] + noise * (batch["domain"] == 1)[:, None, None, None]
  a, b = logits(variables["params"], batch["image"]), logits(variables["params"], other)
  np.testing.assert_allclose(a[domain == 0], b[domain == 0], rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(a[domain == 1] - b[domain == 1])).max() > 1e-3
  # inference: the id picks the modality's blocks (swapping the m0/m1 subtrees swaps the outputs)
  x = batch["image"][:2]
  swap = lambda tree: {(n[:-1] + ("1" if n.endswith("0") else "0")) if "_m" in n else n: s for n, s in tree.items()}
  v_swapped = {"params": swap(variables["params"]), "batch_stats": swap(variables["batch_stats"])}
  infer = jax.jit(lambda v, d: model.apply(v, x, domain=d))
  as_1 = infer(variables, jnp.array(1))
  np.testing.assert_array_equal(infer(v_swapped, jnp.array(0)), as_1)
  as_0 = infer(variables, jnp.array(0))
  assert np.abs(np.asarray(as_0 - as_1)).max() > 1e-4
  # ... and modality 1's blocks do not touch modality 0's output
  moved = {"params": {n: jax.tree.map(lambda t: t * 1.5 if n.endswith("_m1") else t, p)
                      for n, p in variables["params"].items()}, "batch_stats": variables["batch_stats"]}
  np.testing.assert_array_equal(infer(moved, jnp.array(0)), as_0)
  assert np.abs(np.asarray(infer(moved, jnp.array(1)) - as_1)).max() > 1e-4
  assert np.isfinite(np.asarray(infer(variables, jnp.array(UNSEEN)))).all()


def test_unseen_modality_takes_the_mean_of_the_per_modality_outputs():
  """`per_modality` at inference: each sample its modality's block, UNSEEN the mean of the blocks'
  outputs; in training: block k on modality k's samples only, rows back in batch order."""
  from medgen_jax.models.multimodal import per_modality
  blocks = [lambda x: x * 2.0, lambda x: x + 1.0]
  x = jnp.arange(6.0).reshape(3, 2)
  out = per_modality(blocks, x, jnp.array([0, 1, UNSEEN]), train=False)
  np.testing.assert_array_equal(out, [[0, 2], [3, 4], [(8 + 5) / 2, (10 + 6) / 2]])
  grouped = per_modality(blocks, x[:2], jnp.array([1, 0]), train=True)
  np.testing.assert_array_equal(grouped, [[1, 2], [4, 6]])


# --- pmap, config checks, end to end ---------------------------------------------------------------


def test_ummkd_step_pmapped_equals_one_device(chilopod_step):
  """The fixture's one-device step against the same step pmapped over 2 devices (shards [0, 1]
  each: per-modality sums, the KD's class means and the DSBN statistics are global)."""
  init, after, _ = chilopod_step
  model = UNet(3, base_features=4, depth=2, norm="dsbn", num_domains=2, bn_axis_name=parallel.AXIS_NAME)
  runner = parallel.DataParallel(ummkd.make_train_step(model, SGD, sgd_config(), num_classes=3, num_modalities=2,
                                                       axis_name=parallel.AXIS_NAME), num_devices=2)
  host = runner.unreplicate(runner.step(runner.replicate(init), tiny_batch(0), jax.random.PRNGKey(1))[0])
  for a, b, c in zip(jax.tree.leaves(after.params), jax.tree.leaves(host.params), jax.tree.leaves(init.params)):
    np.testing.assert_allclose(a, b, atol=2e-5)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-5
  for a, b in zip(jax.tree.leaves(after.batch_stats), jax.tree.leaves(host.batch_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_x_shaped_step_pmapped_equals_one_device():
  """Per-modality blocks inside pmap (their plain BN synchronized over the devices); two steps."""
  config = base_config()
  tx = make_optimizer(config.optimizer, num_steps=10)
  build = lambda axis: MultiModalUNet(3, 2, shared="middle", base_features=4, depth=2, norm="dsbn", bn_axis_name=axis)
  init = create_train_state(0, build(None), tx, input_shape=(1, 16, 16, 1))
  single_step = jax.jit(ummkd.make_train_step(build(None), tx, config, num_classes=3, num_modalities=2))
  runner = parallel.DataParallel(ummkd.make_train_step(build(parallel.AXIS_NAME), tx, config, num_classes=3,
                                                       num_modalities=2, axis_name=parallel.AXIS_NAME), num_devices=2)
  single, multi = init, runner.replicate(init)
  for seed in (5, 6):
    batch = tiny_batch(seed, b=8)
    single, _ = single_step(single, batch, jax.random.PRNGKey(1))
    multi, _ = runner.step(multi, batch, jax.random.PRNGKey(1))
  host = runner.unreplicate(multi)
  for a, b, c in zip(jax.tree.leaves(single.params), jax.tree.leaves(host.params), jax.tree.leaves(init.params)):
    np.testing.assert_allclose(a, b, atol=2e-5)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-4
  for a, b in zip(jax.tree.leaves(single.batch_stats), jax.tree.leaves(host.batch_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_unbalanced_shard_is_a_clear_error():
  with pytest.raises(ValueError, match="multiple of 2"):
    ummkd.objective(jnp.zeros((3, 4, 4, C)), jnp.zeros((3, 4, 4), jnp.int32), jnp.array([0, 1, 0]), {}, base_config(),
                    num_classes=C, num_modalities=2)


def test_validate_and_labels():
  config = base_config()
  config.method = "ummkd"
  config.model.norm = "dsbn"
  assert method_label(config, ["MR", "CT"]) == "UMMKD"
  config.ummkd.kd_weight = 0.0
  assert method_label(config, ["MR", "CT"]) == "Chilopod"
  config.ummkd.shared = "decoder"
  assert method_label(config, ["MR", "CT"]) == "Y-shaped"
  config.ummkd.shared, config.ummkd.kd_weight = "middle", 0.5
  assert method_label(config, ["MR", "CT"]) == "X-shaped + KD"
  config.ummkd.shared = "left"
  with pytest.raises(ValueError, match=r"config.ummkd.shared.*use one of"):
    ummkd.validate(config)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return make_sites_dataset(tmp_path_factory.mktemp("data") / "toy2", sites=("A", "B"), cases=4)


def test_ummkd_run_tests_each_modality_with_its_own_bn(dataset, tmp_path):
  config = tiny_config(dataset, **{"method": "ummkd", "model.norm": "dsbn", "data.held_out": (),
                                   "batch_size": 8, "eval.selection": "last", "num_steps": 3})
  result = train_lib.train_and_evaluate(config, tmp_path / "run")
  assert "| UMMKD" in (tmp_path / "run" / "results.md").read_text()
  assert {r["site"] for r in result["records"]} == {"A", "B"}
  assert all(r["role"] == "in-domain" and r["method"] == "UMMKD" for r in result["records"])
  _, _, (trained,) = load_trained_models(tmp_path / "run")
  _, domain_of = trained.predictor()
  assert trained.sources == ["A", "B"] and [domain_of(s) for s in ("A", "B")] == [0, 1]
