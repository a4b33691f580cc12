"""Residual adapters (series, parallel; Rebuffi et al.) and per-site squeeze-and-excitation
(USE-Net) on the shared U-Net, against numpy computations written from the papers' equations
(the adapters' place relative to the block's norm included), the default U-Net's parameter tree
written by hand, hand parameter counts, the shared U-Net itself (zero-initialized adapters), and a
DeepAll step."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import leaves_equal, make_sites_dataset, tiny_config
from medgen_jax import config as config_lib
from medgen_jax import methods, parallel, train_lib
from medgen_jax.config import base_config
from medgen_jax.evaluation import load_trained_models
from medgen_jax.methods.deepall import make_train_step
from medgen_jax.models import UNet
from medgen_jax.models.adapters import ParallelAdapter, SeriesAdapter, SqueezeExcite
from medgen_jax.models.unet import ConvBlock
from medgen_jax.train_state import create_train_state, make_model, make_optimizer

REPO = Path(__file__).resolve().parents[1]
K, CLASSES, EPS = 3, 3, 1e-3
SMALL = dict(base_features=4, depth=2)
DOMAIN = np.array([0, 1, 2, 0, 1, 2], np.int32)   # a mixed batch, every domain present
RNG = np.random.default_rng(0)
IMAGES = RNG.normal(size=(6, 16, 16, 1)).astype(np.float32) * (1 + DOMAIN)[:, None, None, None]


def flat(tree):
  return tu.flatten_dict(jax.tree.map(np.asarray, dict(tree)))


def domain_specific(path) -> bool:
  """A leaf kept per domain (leading axis K): DSBN, adapters, per-domain SE."""
  return any(p in ("dsbn", "se") or p.startswith("adapter") for p in path)


def transplant(target, source):
  """`target` with every leaf that `source` has replaced by source's (the shared U-Net's
  parameters copied into the adapter U-Net); the leaves only target has are adapters."""
  out, src = flat(target), flat(source)
  assert set(src) <= set(out)
  assert all(any(p.startswith("adapter") for p in path) for path in set(out) - set(src))
  out.update(src)
  return tu.unflatten_dict(out)


def shapes(model, x_shape=(1, 16, 16, 1), **kw):
  """The model's variables as shapes (jax.eval_shape: nothing compiled)."""
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x_shape), train=False, **kw))


def draw(model, seed, *, zero_adapters=True, **kw):
  """Variables of `model` drawn with numpy: kernels ~ N(0, 0.3²) (adapter kernels 0 unless
  `zero_adapters` is False), BN scale and running variance in [0.5, 1.5], biases/means ~ N(0, 0.25)."""
  rng = np.random.default_rng(seed)
  out = {}
  for col, tree in shapes(model, **kw).items():
    leaves = {}
    for path, leaf in tu.flatten_dict(dict(tree)).items():
      value = rng.normal(size=leaf.shape).astype(np.float32) * (0.3 if path[-1] == "kernel" else 0.5)
      if path[-1] in ("var", "scale"):
        value = rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
      if zero_adapters and path[-2:] == ("conv1x1", "kernel"):
        value = np.zeros(leaf.shape, np.float32)
      leaves[path] = value
    out[col] = tu.unflatten_dict(leaves)
  return out


# --- Numpy references --------------------------------------------------------------------------


def np_conv3x3(x, kernel):
  """'SAME' cross-correlation, NHWC x HWIO."""
  b, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros((b, h, w, kernel.shape[-1]))
  for i in range(3):
    for j in range(3):
      out += np.einsum("bhwc,co->bhwo", xp[:, i:i + h, j:j + w], kernel[i, j])
  return out


def pick(table, d):
  """Row d of a per-domain table, the mean over rows for an unseen domain (-1)."""
  return table.mean(0) if d < 0 else table[d]


def np_bn_eval(x, d, scale, bias, mean, var):
  return (x - pick(mean, d)) / np.sqrt(pick(var, d) + EPS) * pick(scale, d) + pick(bias, d)


def np_bn_train(x, domain, scale, bias):
  """Per-domain BatchNorm with the batch statistics of each domain's samples."""
  y = np.empty_like(x)
  for k in np.unique(domain):
    rows = domain == k
    xs = x[rows]
    y[rows] = (xs - xs.mean((0, 1, 2))) / np.sqrt(xs.var((0, 1, 2)) + EPS) * scale[k] + bias[k]
  return y


def np_se(x, d, w1, w2):
  """Hu et al. Eqs. 2-4: z = mean_hw x, s = sigmoid(W2 relu(W1 z)), y = s * x."""
  z = x.mean(axis=(0, 1))
  s = 1 / (1 + np.exp(-(np.maximum(z @ w1, 0) @ w2)))
  return x * s


# --- The default U-Net is unchanged -------------------------------------------------------------


# The default U-Net's variables, written by hand from the architecture (models/unet.py) for
# base_features 4, depth 2, 1 input channel, CLASSES = 3 classes and model.norm 'batch': blocks
# down0 (1 -> 4), down1 (4 -> 8), bottleneck (8 -> 16), up1 (8 up-sampled + 8 skip -> 8), up0
# (4 + 4 -> 4), each 2 x (3x3 conv kernel [3, 3, C_in, F] without bias -> norm{i} with flax's
# BatchNorm 'bn' scale/bias [F] and running mean/var [F]); 2x2 transposed convs upconv1 (16 -> 8),
# upconv0 (8 -> 4) with bias; the 1x1 head 4 -> 3 (a Dense [4, 3] with fast_ops, else a 1x1 conv
# [1, 1, 4, 3]). norm 'dsbn' with K domains: 'dsbn' instead of 'bn', every scale/bias/mean/var [K, F].
DEFAULT_PARAMS = {
    "down0/conv0/kernel": (3, 3, 1, 4), "down0/conv1/kernel": (3, 3, 4, 4),
    "down0/norm0/bn/scale": (4,), "down0/norm0/bn/bias": (4,),
    "down0/norm1/bn/scale": (4,), "down0/norm1/bn/bias": (4,),
    "down1/conv0/kernel": (3, 3, 4, 8), "down1/conv1/kernel": (3, 3, 8, 8),
    "down1/norm0/bn/scale": (8,), "down1/norm0/bn/bias": (8,),
    "down1/norm1/bn/scale": (8,), "down1/norm1/bn/bias": (8,),
    "bottleneck/conv0/kernel": (3, 3, 8, 16), "bottleneck/conv1/kernel": (3, 3, 16, 16),
    "bottleneck/norm0/bn/scale": (16,), "bottleneck/norm0/bn/bias": (16,),
    "bottleneck/norm1/bn/scale": (16,), "bottleneck/norm1/bn/bias": (16,),
    "upconv1/kernel": (2, 2, 16, 8), "upconv1/bias": (8,),
    "up1/conv0/kernel": (3, 3, 16, 8), "up1/conv1/kernel": (3, 3, 8, 8),
    "up1/norm0/bn/scale": (8,), "up1/norm0/bn/bias": (8,),
    "up1/norm1/bn/scale": (8,), "up1/norm1/bn/bias": (8,),
    "upconv0/kernel": (2, 2, 8, 4), "upconv0/bias": (4,),
    "up0/conv0/kernel": (3, 3, 8, 4), "up0/conv1/kernel": (3, 3, 4, 4),
    "up0/norm0/bn/scale": (4,), "up0/norm0/bn/bias": (4,),
    "up0/norm1/bn/scale": (4,), "up0/norm1/bn/bias": (4,),
    "head/kernel": (4, 3), "head/bias": (3,),
}
DEFAULT_STATS = {
    "down0/norm0/bn/mean": (4,), "down0/norm0/bn/var": (4,), "down0/norm1/bn/mean": (4,), "down0/norm1/bn/var": (4,),
    "down1/norm0/bn/mean": (8,), "down1/norm0/bn/var": (8,), "down1/norm1/bn/mean": (8,), "down1/norm1/bn/var": (8,),
    "bottleneck/norm0/bn/mean": (16,), "bottleneck/norm0/bn/var": (16,),
    "bottleneck/norm1/bn/mean": (16,), "bottleneck/norm1/bn/var": (16,),
    "up1/norm0/bn/mean": (8,), "up1/norm0/bn/var": (8,), "up1/norm1/bn/mean": (8,), "up1/norm1/bn/var": (8,),
    "up0/norm0/bn/mean": (4,), "up0/norm0/bn/var": (4,), "up0/norm1/bn/mean": (4,), "up0/norm1/bn/var": (4,),
}


def expected_tree(norm: str, fast_ops: bool) -> dict:
  """DEFAULT_PARAMS / DEFAULT_STATS for `norm` ('batch' | 'dsbn' with K domains) and `fast_ops`."""
  def variant(table):
    out = {}
    for path, shape in table.items():
      if norm == "dsbn" and "/bn/" in path:
        path, shape = path.replace("/bn/", "/dsbn/"), (K, *shape)
      if not fast_ops and path == "head/kernel":
        shape = (1, 1, *shape)
      out[tuple(path.split("/"))] = shape
    return out
  return {"params": variant(DEFAULT_PARAMS), "batch_stats": variant(DEFAULT_STATS)}


@pytest.mark.parametrize("fast_ops", [True, False])
@pytest.mark.parametrize("norm", ["batch", "dsbn"])
def test_default_model_has_exactly_the_old_parameter_tree(norm, fast_ops):
  """The default U-Net (no adapter, no SE) built from the config: key paths and shapes equal the
  hand-written tree above, so a change of the default path (a renamed, added or reshaped leaf)
  is caught; checkpoints of older runs restore into it."""
  config = base_config()
  config.model.base_features, config.model.depth = 4, 2
  config.model.norm, config.model.fast_ops = norm, fast_ops
  tree = lambda v: {col: {p: x.shape for p, x in tu.flatten_dict(dict(t)).items()} for col, t in v.items()}
  got = tree(shapes(make_model(config.model, num_classes=CLASSES, num_domains=K if norm == "dsbn" else 1)))
  assert got == expected_tree(norm, fast_ops)
  # sensitivity: an option on adds leaves
  assert set(tree(shapes(UNet(CLASSES, **SMALL, norm=norm, num_domains=K, se="shared")))["params"]) > set(got["params"])


def test_default_model_initializes_as_the_plain_unet():
  """The values too (same names -> same initializer keys): the config's default model and the
  U-Net constructed with its defaults draw the same initial parameters."""
  config = base_config()
  config.model.base_features, config.model.depth = 4, 2
  init = lambda m: jax.jit(lambda key: m.init(key, jnp.zeros((1, 16, 16, 1)), train=False))(jax.random.PRNGKey(0))
  assert leaves_equal(init(UNet(CLASSES, **SMALL)), init(make_model(config.model, num_classes=CLASSES)))


# --- Zero-initialized adapters = the shared U-Net; one domain's adapter moves only its samples ---


@pytest.mark.parametrize("adapter", ["series", "parallel"])
@pytest.mark.parametrize("norm", ["dsbn", "batch"])
def test_zero_adapters_equal_the_shared_unet_and_only_their_domain_moves(adapter, norm):
  shared_model = UNet(CLASSES, **SMALL, norm=norm, num_domains=K)
  model = UNet(CLASSES, **SMALL, norm=norm, num_domains=K, adapter=adapter)
  shared = draw(shared_model, 1)   # random per-domain DSBN parameters/statistics: the domains differ
  variables = {col: transplant(tree, shared[col]) for col, tree in draw(model, 7).items()}
  kernels = [p for p in flat(variables["params"]) if p[-2:] == ("conv1x1", "kernel")]
  assert len(kernels) == 2 * 5 and all(not flat(variables["params"])[p].any() for p in kernels)

  def outputs(model):   # (inference, training) logits, one compiled program
    return jax.jit(lambda v, x, d: (model.apply(v, x, train=False, domain=d),
                                    model.apply(v, x, train=True, domain=d, mutable=["batch_stats"])[0]))

  run, run_shared = outputs(model), outputs(shared_model)
  for got, want in zip(run(variables, IMAGES, DOMAIN), run_shared(shared, IMAGES, DOMAIN)):
    np.testing.assert_allclose(got, want, atol=1e-6)

  # domain 1's adapter kernels non-zero: only domain 1's samples change
  params = flat(variables["params"])
  for p in kernels:
    params[p] = params[p].copy()
    params[p][1] = RNG.normal(size=params[p].shape[1:]) * 0.5
  moved = dict(variables, params=tu.unflatten_dict(params))
  outs_before, outs_after = run(variables, IMAGES, DOMAIN), run(moved, IMAGES, DOMAIN)
  for mode in ((0, 1) if norm == "dsbn" else (0,)):   # shared BN mixes the domains' train statistics
    before, after = np.asarray(outs_before[mode]), np.asarray(outs_after[mode])
    other = DOMAIN != 1
    np.testing.assert_allclose(after[other], before[other], atol=1e-6)
    assert np.abs(after[~other] - before[~other]).max(axis=(1, 2, 3)).min() > 1e-3   # every domain-1 sample


@pytest.mark.parametrize("adapter", ["series", "parallel"])
def test_adapter_kernels_initialize_to_zero_with_a_domain_axis(adapter):
  block = ConvBlock(4, norm="dsbn", num_domains=K, adapter=adapter)
  x = jnp.ones((2, 4, 4, 3))
  params = flat(block.init(jax.random.PRNGKey(0), x, train=False)["params"])
  assert [params[(f"adapter{i}", "conv1x1", "kernel")].shape for i in range(2)] == (
      [(K, 4, 4)] * 2 if adapter == "series" else [(K, 3, 4), (K, 4, 4)])
  assert not any(params[(f"adapter{i}", "conv1x1", "kernel")].any() for i in range(2))
  assert params[("conv0", "kernel")].any()   # the shared conv is not


# --- Adapter and SE arithmetic against numpy ---------------------------------------------------


def test_series_adapter_against_numpy():
  x = RNG.normal(size=(4, 3, 5, 3)).astype(np.float32)
  v = {"params": {"bn": {"scale": RNG.uniform(0.5, 2, (K, 3)), "bias": RNG.normal(size=(K, 3))},
                  "conv1x1": {"kernel": RNG.normal(size=(K, 3, 3))}},
       "batch_stats": {"bn": {"mean": RNG.normal(size=(K, 3)), "var": RNG.uniform(0.5, 2, (K, 3))}}}
  v = jax.tree.map(lambda a: np.asarray(a, np.float32), v)
  p, s = v["params"], v["batch_stats"]
  w = p["conv1x1"]["kernel"]
  domain = np.array([2, 0, -1, 0])   # inference, an unseen sample included
  y = SeriesAdapter(K).apply(v, x, train=False, domain=domain)
  for b, d in enumerate(domain):
    h = np_bn_eval(x[b], d, p["bn"]["scale"], p["bn"]["bias"], s["bn"]["mean"], s["bn"]["var"])
    np.testing.assert_allclose(y[b], x[b] + h @ pick(w, d), rtol=1e-5, atol=1e-5)
  domain = np.array([1, 0, 1, 0])    # training: each domain's own batch statistics
  y, _ = SeriesAdapter(K).apply(v, x, train=True, domain=domain, mutable=["batch_stats"])
  h = np_bn_train(x.astype(np.float64), domain, p["bn"]["scale"], p["bn"]["bias"])
  want = x + np.einsum("bhwc,bco->bhwo", h, w[domain])
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


def test_parallel_adapter_against_numpy():
  x = RNG.normal(size=(4, 3, 5, 2)).astype(np.float32)
  w = RNG.normal(size=(K, 2, 6)).astype(np.float32)
  domain = np.array([2, -1, 1, 0])
  y = ParallelAdapter(6, K).apply({"params": {"conv1x1": {"kernel": w}}}, x, domain=domain)
  for b, d in enumerate(domain):
    np.testing.assert_allclose(y[b], x[b] @ pick(w, d), rtol=1e-5, atol=1e-5)


def np_block_norm(x, d, p, s, name, norm):
  """The block's norm{i} in inference mode on one sample of domain d: DSBN (per-domain tables
  [K, C]) or one BatchNorm ([C])."""
  sub = "dsbn" if norm == "dsbn" else "bn"
  table = lambda col, leaf: col[(name, sub, leaf)] if norm == "dsbn" else col[(name, sub, leaf)][None]
  return np_bn_eval(x, d if norm == "dsbn" else 0, table(p, "scale"), table(p, "bias"), table(s, "mean"),
                    table(s, "var"))


@pytest.mark.parametrize("norm", ["dsbn", "batch"])
@pytest.mark.parametrize("adapter", ["series", "parallel"])
def test_adapter_placement_in_a_conv_block_against_numpy(adapter, norm):
  """Inference mode, random running statistics and scales, so where the adapter sits relative to
  the block's norm matters: series y = relu(N_d(x' + BN^a_d(x') W_d)), x' = conv(x); parallel
  y = relu(N_d(conv(x) + x W_d)); twice (the block's two convs); N_d the block's norm{i}
  (DSBN: domain d's; batch: the shared one)."""
  block = ConvBlock(4, norm=norm, num_domains=2, adapter=adapter)
  x = RNG.normal(size=(2, 5, 6, 3)).astype(np.float32)
  domain = np.array([1, 0])
  v = draw(block, 3, zero_adapters=False, x_shape=x.shape, domain=domain)
  y = block.apply(v, x, train=False, domain=domain)
  p, s = flat(v["params"]), flat(v["batch_stats"])
  h = x.astype(np.float64)
  for i in range(2):
    conv = np_conv3x3(h, p[(f"conv{i}", "kernel")])
    w = p[(f"adapter{i}", "conv1x1", "kernel")]
    for b, d in enumerate(domain):
      if adapter == "series":
        a = np_bn_eval(conv[b], d, p[(f"adapter{i}", "bn", "scale")], p[(f"adapter{i}", "bn", "bias")],
                       s[(f"adapter{i}", "bn", "mean")], s[(f"adapter{i}", "bn", "var")])
        conv[b] = conv[b] + a @ w[d]
      else:
        conv[b] = conv[b] + h[b] @ w[d]
      conv[b] = np_block_norm(conv[b], d, p, s, f"norm{i}", norm)
    h = np.maximum(conv, 0)
  np.testing.assert_allclose(y, h, rtol=1e-4, atol=1e-4)


def test_squeeze_excitation_per_domain_against_numpy():
  x = RNG.normal(size=(5, 3, 4, 6)).astype(np.float32) + 0.3
  w1 = RNG.normal(size=(2, 6, 3)).astype(np.float32)   # reduction 2: C/r = 3
  w2 = RNG.normal(size=(2, 3, 6)).astype(np.float32)
  domain = np.array([0, 1, 1, 0, -1])                  # two domains in one batch, and an unseen one
  v = {"params": {"squeeze": {"kernel": w1}, "excite": {"kernel": w2}}}
  y = SqueezeExcite(2, reduction=2).apply(v, x, domain=domain)
  for b, d in enumerate(domain):
    np.testing.assert_allclose(y[b], np_se(x[b], d, pick(w1, d), pick(w2, d)), rtol=1e-5, atol=1e-5)
  shared = {"params": {"squeeze": {"kernel": w1[0]}, "excite": {"kernel": w2[0]}}}
  y = SqueezeExcite(reduction=2, per_domain=False).apply(shared, x)
  for b in range(len(x)):
    np.testing.assert_allclose(y[b], np_se(x[b], 0, w1[0], w2[0]), rtol=1e-5, atol=1e-5)


def test_se_placement_enc_and_enc_dec():
  def se_blocks(**kw):
    return sorted(name for name, sub in shapes(UNet(CLASSES, **SMALL, **kw))["params"].items() if "se" in sub)
  assert se_blocks(se="domain", num_domains=K) == ["bottleneck", "down0", "down1", "up0", "up1"]
  assert se_blocks(se="domain", num_domains=K, se_blocks="encoder") == ["bottleneck", "down0", "down1"]


# --- Unseen domain = the mean of the domain parameters ------------------------------------------


@pytest.mark.parametrize("kw", [dict(adapter="series", norm="dsbn", se="domain"), dict(adapter="parallel")],
                         ids=["series-dsbn-se", "parallel"])
def test_unseen_domain_is_the_network_with_the_mean_parameters(kw):
  """The K-domain network at id -1 equals a one-domain network whose every domain-specific
  parameter and statistic is the mean over the K domains (computed here with numpy)."""
  model, single = UNet(CLASSES, **SMALL, num_domains=K, **kw), UNet(CLASSES, **SMALL, num_domains=1, **kw)
  variables = draw(model, 4, zero_adapters=False)
  mean = {col: tu.unflatten_dict({p: v.mean(0, keepdims=True) if domain_specific(p) else v
                                  for p, v in flat(tree).items()}) for col, tree in variables.items()}
  apply = jax.jit(model.apply, static_argnames="train")
  unseen = apply(variables, IMAGES, train=False, domain=np.full(6, -1))
  want = jax.jit(single.apply, static_argnames="train")(mean, IMAGES, train=False, domain=np.zeros(6, np.int32))
  scale = np.abs(want).max()   # random weights: logits of order 10; float32 rounding of the means
  np.testing.assert_allclose(unseen, want, atol=1e-4 * scale)
  # sensitivity: a trained domain's parameters give another output
  assert np.abs(np.asarray(unseen) - apply(variables, IMAGES, train=False, domain=np.zeros(6, np.int32))).max() > 0.1 * scale


# --- Parameter counts ---------------------------------------------------------------------------


BLOCKS = {"down0": (1, 4), "down1": (4, 8), "bottleneck": (8, 16), "up1": (16, 8), "up0": (8, 4)}  # (C_in, F)
SHARED_REST = (2 * 2 * 16 * 8 + 8) + (2 * 2 * 8 * 4 + 4) + (4 * CLASSES + CLASSES)               # upconvs, head


def hand_count(norm_sets, adapter=None, se=None, r=8):
  """Shared 3x3 kernels + norms (norm_sets copies of scale and bias) + the options, by hand."""
  total = SHARED_REST
  for cin, f in BLOCKS.values():
    total += 9 * cin * f + 9 * f * f + 2 * norm_sets * 2 * f
    if adapter == "series":     # per conv: W_k [F, F] + the adapter BN's scale and bias [F]
      total += 2 * K * (f * f + 2 * f)
    elif adapter == "parallel":  # per conv: W_k [C_in of that conv, F]
      total += K * (cin * f + f * f)
    if se:
      total += (K if se == "domain" else 1) * 2 * f * max(f // r, 1)
  return total


@pytest.mark.parametrize("kw, want", [
    (dict(), hand_count(1)),
    (dict(norm="dsbn", num_domains=K), hand_count(K)),
    (dict(norm="dsbn", num_domains=K, adapter="series"), hand_count(K, adapter="series")),
    (dict(norm="dsbn", num_domains=K, adapter="parallel"), hand_count(K, adapter="parallel")),
    (dict(num_domains=K, se="domain", se_reduction=2), hand_count(1, se="domain", r=2)),
    (dict(se="shared"), hand_count(1, se="shared")),
], ids=["unet", "dsbn", "series", "parallel", "se-domain", "se-shared"])
def test_parameter_counts(kw, want):
  v = shapes(UNet(CLASSES, **SMALL, **kw))
  assert sum(x.size for x in jax.tree.leaves(v["params"])) == want


def test_series_adapter_keeps_per_domain_statistics():
  v = shapes(UNet(CLASSES, **SMALL, norm="dsbn", num_domains=K, adapter="series"))
  # 5 blocks x 2 convs x (block DSBN + adapter BN) x (mean, var) [K, F]
  assert sum(x.size for x in jax.tree.leaves(v["batch_stats"])) == sum(2 * 2 * 2 * K * f for _, f in BLOCKS.values())


# --- The DeepAll step ---------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ["series", pytest.param("parallel", marks=pytest.mark.slow)])
def test_deepall_step_updates_each_domains_adapter_from_its_own_samples(adapter):
  """SGD (update = -lr · gradient), CE without class weights (a sum of per-sample terms), DSBN:
  a domain's adapter gradient comes from its samples only. Domains 0 and 1 in the batch, 2 absent."""
  config = base_config()
  config.optimizer.name, config.optimizer.momentum, config.optimizer.learning_rate = "sgd", 0.0, 0.5
  config.loss.dice_weight, config.loss.class_weights = 0.0, "none"
  tx = make_optimizer(config.optimizer, num_steps=10)
  model = UNet(CLASSES, **SMALL, norm="dsbn", num_domains=K, adapter=adapter)
  state = create_train_state(0, model, tx, input_shape=(1, 16, 16, 1))
  step = jax.jit(make_train_step(model, tx, config, num_classes=CLASSES))
  domain = np.array([0, 1, 0, 1], np.int32)
  batch = {"image": IMAGES[:4], "label": RNG.integers(0, CLASSES, (4, 16, 16)).astype(np.int32), "domain": domain}
  # the same batch with domain 1's images replaced
  other = dict(batch, image=np.where((domain == 1)[:, None, None, None], IMAGES[2:6] * 2 + 1, IMAGES[:4]))
  key = jax.random.PRNGKey(1)
  new, new_other = step(state, batch, key)[0], step(state, other, key)[0]

  def rows(tree, k):
    return {p: v[k] for p, v in flat(tree).items() if any(q.startswith("adapter") for q in p)}

  for col in ("params", "batch_stats"):
    # the absent domain's adapter (kernels, BN scale/bias, statistics) bit-identical
    assert leaves_equal(rows(getattr(new, col), 2), rows(getattr(state, col), 2))
  kernels = lambda tree, k: {p: v for p, v in rows(tree, k).items() if p[-1] == "kernel"}
  for k in (0, 1):   # present domains: every adapter kernel moved
    for p, v in kernels(new.params, k).items():
      assert np.abs(v - kernels(state.params, k)[p]).max() > 1e-6, p
  # domain 0's update does not depend on domain 1's samples; domain 1's does
  for p, v in kernels(new.params, 0).items():
    np.testing.assert_allclose(v, kernels(new_other.params, 0)[p], rtol=1e-5, atol=1e-7)
  assert max(np.abs(v - kernels(new_other.params, 1)[p]).max() for p, v in kernels(new.params, 1).items()) > 1e-4


def test_pmapped_series_adapter_statistics_are_those_of_the_global_batch():
  """With bn_sync the adapter's BN statistics under pmap are those of the global batch: two
  devices whose shards hold different domain mixes give the one-device training forward."""
  kw = dict(norm="dsbn", num_domains=K, adapter="series", **SMALL)
  variables = draw(UNet(CLASSES, **kw), 5, zero_adapters=False)
  domain = np.array([0, 1, 0, 2, 1, 0], np.int32)
  single = jax.jit(lambda v, x, d: UNet(CLASSES, **kw).apply(v, x, train=True, domain=d, mutable=["batch_stats"]))
  want, want_stats = single(variables, IMAGES, domain)
  multi = jax.pmap(lambda x, d: UNet(CLASSES, **kw, bn_axis_name=parallel.AXIS_NAME).apply(
      variables, x, train=True, domain=d, mutable=["batch_stats"]), axis_name=parallel.AXIS_NAME)
  got, got_stats = multi(IMAGES.reshape(2, 3, 16, 16, 1), domain.reshape(2, 3))
  np.testing.assert_allclose(np.asarray(got).reshape(want.shape), want, rtol=1e-4, atol=1e-4)
  for path, value in flat(want_stats["batch_stats"]).items():
    if any(p.startswith("adapter") for p in path):
      np.testing.assert_allclose(flat(got_stats["batch_stats"])[path][1], value, rtol=1e-4, atol=1e-5,
                                 err_msg=str(path))


# --- Configs, labels, validation, end to end ----------------------------------------------------


def load_config(name, arg="quick"):
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / "multisite" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_configs_labels_and_validation():
  sites = ["site1", "site2"]
  for name, label in (("series_adapter", "Series-Adapter"), ("parallel_adapter", "Parallel-Adapter"),
                      ("usenet", "USE-Net"), ("dsbn", "DSBN"), ("joint", "Joint")):
    config = load_config(name)
    config_lib.validate(config)
    assert methods.label(config, sites) == label
    assert methods.uses_domains(config) == (name != "joint")
  assert load_config("series_adapter").model.norm == "dsbn"
  config = load_config("usenet")
  config.model.se = "shared"
  assert methods.label(config, sites) == "USE-Net (shared SE)" and not methods.uses_domains(config)
  config = load_config("series_adapter")
  config.model.norm = "batch"   # the adapters alone make the network domain-specific
  assert methods.label(config, sites) == "Series-Adapter (shared BN)" and methods.uses_domains(config)
  config.model.adapter = "parallel"
  assert methods.label(config, sites) == "Parallel-Adapter (shared BN)" and methods.uses_domains(config)
  config.method = "separate"
  assert methods.label(config, ["site1"]) == "Separate (site1)"
  for key, value in (("adapter", "serial"), ("se", "yes"), ("se_blocks", "decoder"), ("se_reduction", 0)):
    config = load_config("joint")
    config.model[key] = value
    with pytest.raises(ValueError, match=f"model.{key}"):
      config_lib.validate(config)
  config = load_config("parallel_adapter")
  config.method, config.model.norm, config.batch_size = "mldg", "batch", 6
  with pytest.raises(ValueError, match="model.adapter.*deepall"):
    config_lib.validate(config)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return make_sites_dataset(tmp_path_factory.mktemp("data") / "toy", sites=("A", "B", "C"), cases=4)


def test_series_adapter_run_end_to_end(dataset, tmp_path):
  config = tiny_config(dataset, **{"data.held_out": (), "model.norm": "dsbn", "model.adapter": "series",
                                   "eval.selection": "last", "num_steps": 3, "batch_size": 12})
  train_lib.train_and_evaluate(config, tmp_path / "run")
  assert "| Series-Adapter |" in (tmp_path / "run" / "results.md").read_text()
  _, _, (trained,) = load_trained_models(tmp_path / "run")
  assert trained.sources == ["A", "B", "C"]
  assert [trained.predictor()[1](s) for s in ("A", "B", "C", "D")] == [0, 1, 2, -1]
  kernel = flat(trained.variables["params"])[("down0", "adapter0", "conv1x1", "kernel")]
  assert kernel.shape == (3, 4, 4) and np.abs(kernel).max(axis=(1, 2)).min() > 0   # every site's adapter trained
