"""MS-Net (methods/multisite/msnet.py): the knowledge-transfer loss against numpy, the argmax target
without gradient, the released step order against a hand composition of two SGD(1) updates of
hand-written per-site losses (the TF way: one network call per site), the BatchNorm running
statistics of a warm-up and a full step against numpy momentum updates, the warm-up, each Adam's
own bias-correction count (first updates of exactly lr), per-site auxiliary decoders, pmap == one
device, and a run end to end that writes both branches' tables."""

from __future__ import annotations

import json

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import every_leaf_changed, leaves_equal, make_sites_dataset, tiny_config
from medgen_jax import parallel, train_lib
from medgen_jax.config import base_config, validate
from medgen_jax.evaluation import evaluate_models, restore_models
from medgen_jax.data.pipeline import prepare_data
from medgen_jax.methods.base import RunInfo
from medgen_jax.methods.multisite import msnet
from medgen_jax.models import UNet
from medgen_jax.models.msnet import parts
from medgen_jax.runs import load_run_config

K, C, EPS = 2, 3, 1e-7
TEACHERS = ("encoder", "teachers_0", "teachers_1")
STUDENT = ("encoder", "student")


def make_config(**overrides):
  c = base_config()
  c.method = "msnet"
  c.model.norm = "dsbn"
  c.model.base_features = 4
  c.model.depth = 1             # fewer layers to compile (compilation is this file's time)
  c.loss.ce_weight = 0.0
  c.loss.dice_variant = "linear"
  c.num_steps = 10
  c.msnet.warmup_steps = 1
  c.loss.weight_decay = 0.05   # large enough for the L2 term to matter in the hand step
  for key, value in overrides.items():
    target = c
    *path, last = key.split(".")
    for p in path:
      target = target[p]
    target[last] = value
  return c


def make_batch(seed=0, n=4):
  rng = np.random.default_rng(seed)
  domain = np.arange(n, dtype=np.int32) % K                    # interleaved, as the sampler
  image = (rng.normal(size=(n, 16, 16, 1)) * (1 + 2 * domain[:, None, None, None])
           + 3 * domain[:, None, None, None]).astype(np.float32)
  label = rng.integers(0, C, size=(n, 16, 16)).astype(np.int32)
  return {"image": image, "label": label, "domain": domain}


INFO = RunInfo(num_classes=C, input_shape=(16, 16, 1), domains=("A", "B"))


@pytest.fixture(scope="module")
def setup():
  config = make_config()
  state = msnet.init_state(jax.random.PRNGKey(0), config, INFO)
  return config, state, make_batch()


# --- Hand-written per-site losses: one call of each part per site (the released graph) -----------


def dice_b(logits, labels):
  """1 − mean_c 2Σpg / (Σp + Σg + 1e-7), sums over the given samples (methods.md §1.1 Dice-B)."""
  p = jax.nn.softmax(logits, axis=-1)
  g = jax.nn.one_hot(labels, C)
  inter = jnp.sum(p * g, axis=(0, 1, 2))
  return 1.0 - jnp.mean(2 * inter / (jnp.sum(p, axis=(0, 1, 2)) + jnp.sum(g, axis=(0, 1, 2)) + EPS))


def l2(params, names, coefficient):
  leaves = [w for name in names for path, w in jax.tree_util.tree_leaves_with_path(params[name])
            if path[-1].key == "kernel"]
  return coefficient * sum(jnp.sum(w ** 2) for w in leaves) / 2


class Hand:
  """L_teacher, the auxiliary targets and L_student written per site."""

  def __init__(self, config, state, batch):
    self.enc, self.teacher, self.student = parts(msnet.network(config, INFO, train=False))
    self.stats, self.batch, self.wd = state.batch_stats, batch, config.loss.weight_decay
    self.rows = [np.flatnonzero(batch["domain"] == k) for k in range(K)]

  def features(self, params, k):
    x = self.batch["image"][self.rows[k]]
    out, _ = self.enc.apply({"params": params["encoder"], "batch_stats": self.stats["encoder"]}, x, train=True,
                            domain=np.full(len(x), k), mutable=["batch_stats"])
    return out

  def aux(self, params, k):
    name = f"teachers_{k}"
    out, _ = self.teacher.apply({"params": params[name], "batch_stats": self.stats[name]},
                                self.features(params, k), train=True, mutable=["batch_stats"])
    return out

  def univ(self, params, k):
    out, _ = self.student.apply({"params": params["student"], "batch_stats": self.stats["student"]},
                                self.features(params, k), train=True, domain=np.full(len(self.rows[k]), k),
                                mutable=["batch_stats"])
    return out

  def teacher_loss(self, params):
    return sum(dice_b(self.aux(params, k), self.batch["label"][self.rows[k]]) for k in range(K)) \
        + l2(params, TEACHERS, self.wd)

  def student_loss(self, params, targets):
    return sum(0.5 * dice_b(self.univ(params, k), self.batch["label"][self.rows[k]])
               + 0.5 * dice_b(self.univ(params, k), targets[k]) for k in range(K)) + l2(params, STUDENT, self.wd)

  def norm_inputs(self, params):
    """{(part, block, norm): [input of that BatchNorm on site k's rows, k = 0..K-1]} at `params`,
    each part applied per site as above; a norm's input is the output of the conv before it
    (conv{i} -> norm{i}), read with flax's capture_intermediates. Part 'teachers' = teachers_k on
    site k."""
    out = {}

    def collect(part, intermediates):
      for path, value in flax.traverse_util.flatten_dict(intermediates).items():
        if len(path) == 3 and path[1].startswith("conv"):   # (block, conv{i}, '__call__')
          out.setdefault((part, path[0], "norm" + path[1][4:]), []).append(value[0])

    for k in range(K):
      x, domain = self.batch["image"][self.rows[k]], np.full(len(self.rows[k]), k)
      capture = dict(train=True, mutable=["batch_stats", "intermediates"], capture_intermediates=True)
      features, v = self.enc.apply({"params": params["encoder"], "batch_stats": self.stats["encoder"]}, x,
                                   domain=domain, **capture)
      collect("encoder", v["intermediates"])
      name = f"teachers_{k}"
      _, v = self.teacher.apply({"params": params[name], "batch_stats": self.stats[name]}, features, **capture)
      collect("teachers", v["intermediates"])
      _, v = self.student.apply({"params": params["student"], "batch_stats": self.stats["student"]}, features,
                                domain=domain, **capture)
      collect("student", v["intermediates"])
    return out

  def jitted(self):
    """(L_teacher and its gradient, the targets, L_student and its gradient), compiled once."""
    targets = jax.jit(lambda p: [jnp.argmax(self.aux(p, k), axis=-1) for k in range(K)])
    return (jax.jit(jax.value_and_grad(self.teacher_loss)), targets,
            jax.jit(jax.value_and_grad(self.student_loss)))


@pytest.fixture(scope="module")
def hand(setup):
  return Hand(*setup).jitted()


@pytest.fixture(scope="module")
def norm_inputs(setup):
  return jax.jit(Hand(*setup).norm_inputs)


def sgd1(params, grads, names):
  return dict(params, **{n: jax.tree.map(lambda p, g: p - g, params[n], grads[n]) for n in names})


def max_diff(a, b, names):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for n in names for x, y in zip(jax.tree.leaves(a[n]), jax.tree.leaves(b[n])))


# --- Networks ----------------------------------------------------------------------------------


def test_universal_branch_is_the_dsbn_unet_and_auxiliary_picks_the_sites_decoder(setup):
  config, state, batch = setup
  # every parameter and statistic moved off its initial value, each domain's differently
  params = jax.tree.map(lambda a: a + 0.1 * np.random.default_rng(a.size).normal(size=a.shape).astype(np.float32),
                        state.params)
  stats = jax.tree.map(lambda a: a + 0.2 * np.random.default_rng(a.size + 1).uniform(size=a.shape).astype(np.float32),
                       state.batch_stats)
  variables = {"params": params, "batch_stats": stats}
  x, domain = batch["image"][:3], np.array([1, 0, -1], np.int32)
  enc, teacher, _ = parts(msnet.network(config, INFO, train=False))

  @jax.jit
  def outputs(variables, x, domain):
    params, stats = variables["params"], variables["batch_stats"]
    unet = UNet(C, base_features=4, depth=config.model.depth, norm="dsbn", num_domains=K)
    want = unet.apply({"params": {**params["encoder"], **params["student"]},
                       "batch_stats": {**stats["encoder"], **stats["student"]}}, x, domain=domain)
    got = msnet.network(config, INFO, train=False).apply(variables, x, domain=domain)
    features = enc.apply({"params": params["encoder"], "batch_stats": stats["encoder"]}, x, domain=domain)
    by_teacher = [teacher.apply({"params": params[f"teachers_{k}"], "batch_stats": stats[f"teachers_{k}"]},
                                features) for k in range(K)]
    aux = msnet.network(config, INFO, train=False, branch="auxiliary").apply(variables, x, domain=domain)
    return want, got, by_teacher, aux

  want, got, by_teacher, aux = outputs(variables, x, domain)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aux[0], by_teacher[1][0], rtol=1e-5, atol=1e-5)   # site 1 -> teachers_1
  np.testing.assert_allclose(aux[1], by_teacher[0][1], rtol=1e-5, atol=1e-5)   # site 0 -> teachers_0
  ensemble = np.log(np.mean([jax.nn.softmax(t[2]) for t in by_teacher], axis=0))  # unseen: mean softmax
  np.testing.assert_allclose(aux[2], ensemble, rtol=1e-5, atol=1e-5)
  assert not np.allclose(by_teacher[0][0], by_teacher[1][0], atol=1e-3)


# --- Losses -------------------------------------------------------------------------------------


def np_dice_b(probs, onehot):
  inter = (probs * onehot).sum(axis=(0, 1, 2))
  return 1 - np.mean(2 * inter / (probs.sum(axis=(0, 1, 2)) + onehot.sum(axis=(0, 1, 2)) + EPS))


def test_transfer_loss_equals_numpy_on_fixed_logits():
  rng = np.random.default_rng(3)
  univ = rng.normal(size=(K, 2, 5, 4, C)).astype(np.float32) * 2
  aux = rng.normal(size=(K, 2, 5, 4, C)).astype(np.float32) * 2
  labels = rng.integers(0, C, size=(K, 2, 5, 4))
  labels[1] = np.where(rng.uniform(size=labels[1].shape) < 0.7, 2, labels[1])   # sites differ
  univ[1, ..., 2] += 1.5
  loss_config = make_config().loss
  got, parts_ = msnet.transfer_loss(univ, aux, labels, loss_config, num_classes=C, gt_weight=0.3,
                                    transfer_weight=0.7)
  eye = np.eye(C)
  softmax = lambda z: np.exp(z - z.max(-1, keepdims=True)) / np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)
  gt = sum(np_dice_b(softmax(univ[k].astype(np.float64)), eye[labels[k]]) for k in range(K))
  kt = sum(np_dice_b(softmax(univ[k].astype(np.float64)), eye[np.argmax(aux[k], -1)]) for k in range(K))
  np.testing.assert_allclose(parts_["loss_gt"], gt, rtol=1e-5)
  np.testing.assert_allclose(parts_["loss_transfer"], kt, rtol=1e-5)
  np.testing.assert_allclose(got, 0.3 * gt + 0.7 * kt, rtol=1e-5)
  # per site: one pooled Dice over both sites is a different number
  pooled = np_dice_b(softmax(univ.reshape(-1, 5, 4, C).astype(np.float64)), eye[labels.reshape(-1, 5, 4)])
  assert abs(gt - 2 * pooled) > 1e-2


@pytest.fixture(scope="module")
def student_pass(setup):
  """(∇ of L_student w.r.t. the whole parameter tree, student_update's (state, metrics)) at the
  initial state, compiled together once."""
  config, state, batch = setup
  model = msnet.network(config, INFO, train=True)
  _, student_objective = msnet.make_objectives(model, config, num_classes=C)
  _, student_update = msnet.make_updates(model, *msnet.optimizers(config), config, num_classes=C)

  @jax.jit
  def run(state):
    key = jax.random.PRNGKey(0)
    grads = jax.grad(lambda p: student_objective(p, state.batch_stats, batch, key)[0])(state.params)
    return grads, student_update(state, batch, key)

  return run(state)


def test_argmax_target_carries_no_gradient(setup, hand, student_pass):
  _, state, _ = setup
  grads, _ = student_pass
  for k in range(K):   # exactly zero for the auxiliary decoders
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads[f"teachers_{k}"]))
  # = the gradient of the hand-written loss whose targets were computed outside and frozen
  _, targets_of, student_loss = hand
  targets = [np.asarray(t) for t in targets_of(state.params)]
  _, want = student_loss(state.params, targets)
  for name in STUDENT:
    for g, w in zip(jax.tree.leaves(grads[name]), jax.tree.leaves(want[name])):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
  assert max_diff(grads, jax.tree.map(jnp.zeros_like, grads), STUDENT) > 1e-3


# --- The step -----------------------------------------------------------------------------------


def test_student_update_leaves_the_teachers_bit_identical_and_moves_encoder_and_student(setup, student_pass):
  _, state, _ = setup
  _, (new, metrics) = student_pass
  for k in range(K):
    assert leaves_equal(new.params[f"teachers_{k}"], state.params[f"teachers_{k}"])
  assert leaves_equal(new.opt_state, state.opt_state)   # Adam_T untouched
  for name in STUDENT:
    assert every_leaf_changed(new.params[name], state.params[name]), name
  assert np.isfinite(metrics["loss_student"]) and metrics["student_grad_norm"] > 0


@pytest.fixture(scope="module")
def sgd(setup):
  """(initial state, jitted warm-up step, jitted full step) with SGD(1) for Adam_T and Adam_S
  (update = -gradient): the hand composition below needs no optimizer state."""
  config, _, _ = setup
  tx = optax.sgd(1.0)
  state = msnet.init_msnet_state(jax.random.PRNGKey(0), msnet.network(config, INFO, train=False), tx, tx,
                                 input_shape=(1, 16, 16, 1))
  step = msnet.make_train_step(msnet.network(config, INFO, train=True), tx, tx, config, num_classes=C)
  return state, jax.jit(step.steps[0]), jax.jit(step.steps[1])


def test_step_is_teacher_update_then_recomputed_student_update(setup, sgd, hand):
  _, _, batch = setup
  state, _, full_step = sgd
  new, metrics = full_step(state, batch, jax.random.PRNGKey(2))
  assert int(new.step) == 1 and int(metrics["phase"]) == 1

  teacher_loss, targets_of, student_loss = hand
  p0 = state.params
  loss_t, grad_t = teacher_loss(p0)
  p1 = sgd1(p0, grad_t, TEACHERS)                                    # 1. Adam_T (here SGD(1))
  loss_s, grad_s = student_loss(p1, targets_of(p1))                  # 2. forward recomputed at p1
  p2 = sgd1(p1, grad_s, STUDENT)
  assert max_diff(new.params, p2, TEACHERS + ("student",)) < 2e-5
  np.testing.assert_allclose(metrics["loss_teacher"], loss_t, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss_student"], loss_s, rtol=1e-5)
  # the simultaneous alternative (both gradients at p0) is measurably another step
  simultaneous = sgd1(p1, student_loss(p0, targets_of(p0))[1], STUDENT)
  assert max_diff(new.params, simultaneous, ("encoder",)) > 1e-3


MOMENTUM = 0.9   # the project's TF1 BatchNorm convention (models/norms.py): r <- 0.9 r + 0.1 batch stat


def np_moments(x):
  """Per-channel batch mean and (biased) variance over [n, H, W], in float64."""
  x = np.asarray(x, np.float64)
  return {"mean": x.mean(axis=(0, 1, 2)), "var": x.var(axis=(0, 1, 2))}


def momentum_update(stats, inputs, k=None):
  """Each BatchNorm leaf of `stats` ({(part, block, norm): {'mean', 'var'}}, DSBN rows [K, C] or
  one BN [C]) after one running-average update with the batch moments of `inputs` ({(part,
  block, norm): [per-site inputs]}): DSBN row k with site k's moments for every k, a teacher's
  BN with its own site's (`k`)."""
  out = {}
  for key, r in stats.items():
    site_inputs = inputs[("teachers" if key[0].startswith("teachers") else key[0],) + key[1:]]
    new = {}
    for name, value in r.items():
      value = np.array(value, np.float64)
      if k is None:   # DSBN: one row per site
        for site in range(K):
          value[site] = MOMENTUM * value[site] + (1 - MOMENTUM) * np_moments(site_inputs[site])[name]
      else:
        value = MOMENTUM * value + (1 - MOMENTUM) * np_moments(site_inputs[k])[name]
      new[name] = value
    out[key] = new
  return out


def norm_leaves(batch_stats, part):
  """{(part, block, norm): {'mean', 'var'}} of one part's BatchNorm layers (DSBN 'dsbn', BN 'bn')."""
  out = {}
  for path, value in flax.traverse_util.flatten_dict(batch_stats[part]).items():
    block, norm, _, name = path
    out.setdefault((part, block, norm), {})[name] = np.asarray(value)
  return out


def assert_stats_close(got, want, what):
  assert got.keys() == want.keys(), what
  for key in want:
    for name in ("mean", "var"):
      np.testing.assert_allclose(got[key][name], want[key][name], rtol=2e-4, atol=2e-5, err_msg=f"{what} {key} {name}")


def test_batch_norm_running_statistics_of_a_warmup_and_a_full_step(setup, sgd, hand, norm_inputs):
  """Running statistics after a warm-up step then a full step (SGD(1)) against numpy momentum
  updates of the batch moments of each BatchNorm's input, computed by applying the parts per site
  at the hand parameter trajectory p0 -> p1 (warm-up teacher update) -> p2 (full step's teacher
  update; the student pass runs at p2). As TF with updates_collections=None, every train-mode
  forward updates the statistics it touches: the encoder's DSBN (row k with site k's moments) and
  each teachers_k once in the warm-up and twice in the full step (teacher pass at p1, student pass
  at p2); the universal decoder's DSBN not in the warm-up (bit-identical) and once in the full step
  (student pass at p2)."""
  _, _, batch = setup
  state, warmup_step, full_step = sgd
  warm, _ = warmup_step(state, batch, jax.random.PRNGKey(5))
  full, _ = full_step(warm, batch, jax.random.PRNGKey(6))

  teacher_loss, targets_of, student_loss = hand
  p0 = state.params
  p1 = sgd1(p0, teacher_loss(p0)[1], TEACHERS)
  p2 = sgd1(p1, teacher_loss(p1)[1], TEACHERS)
  p3 = sgd1(p2, student_loss(p2, targets_of(p2))[1], STUDENT)
  assert max_diff(full.params, p3, TEACHERS + ("student",)) < 5e-5   # the trajectory the statistics follow
  inputs = [jax.tree.map(np.asarray, norm_inputs(p)) for p in (p0, p1, p2)]

  start = {part: norm_leaves(state.batch_stats, part) for part in state.batch_stats}
  encoder = momentum_update(start["encoder"], inputs[0])
  teachers = {k: momentum_update(start[f"teachers_{k}"], inputs[0], k) for k in range(K)}
  assert_stats_close(norm_leaves(warm.batch_stats, "encoder"), encoder, "warm-up: encoder")
  for k in range(K):
    assert_stats_close(norm_leaves(warm.batch_stats, f"teachers_{k}"), teachers[k], f"warm-up: teachers_{k}")
  assert leaves_equal(warm.batch_stats["student"], state.batch_stats["student"])

  once = {k: momentum_update(teachers[k], inputs[1], k) for k in range(K)}   # the teacher pass alone
  encoder = momentum_update(momentum_update(encoder, inputs[1]), inputs[2])
  teachers = {k: momentum_update(once[k], inputs[2], k) for k in range(K)}
  student = momentum_update(start["student"], inputs[2])
  assert_stats_close(norm_leaves(full.batch_stats, "encoder"), encoder, "full: encoder")
  for k in range(K):
    assert_stats_close(norm_leaves(full.batch_stats, f"teachers_{k}"), teachers[k], f"full: teachers_{k}")
  assert_stats_close(norm_leaves(full.batch_stats, "student"), student, "full: student")
  # sensitivity: a single teacher-pass update and the initial student statistics are far off
  key = ("teachers_0", "up0", "norm0")
  assert np.abs(once[0][key]["var"] - teachers[0][key]["var"]).max() > 1e-2
  key = ("student", "up0", "norm0")
  assert np.abs(start["student"][key]["mean"] - student[key]["mean"]).max() > 1e-2


@pytest.fixture(scope="module")
def adam_run(setup):
  """(initial state, after the warm-up step, after the first full step) with the method's own
  optimizers (config.optimizer: Adam 1e-3, constant schedule): warmup_steps = 1."""
  config, state, batch = setup
  step = msnet.make_step(config, INFO)
  assert [int(step.schedule(s)) for s in (0, 1, 5)] == [0, 1, 1]   # warmup_steps = 1
  warm, metrics = jax.jit(step.steps[0])(state, batch, jax.random.PRNGKey(3))
  assert int(warm.step) == 1 and int(metrics["phase"]) == 0
  full, metrics = jax.jit(step.steps[1])(warm, batch, jax.random.PRNGKey(4))
  assert int(full.step) == 2 and int(metrics["phase"]) == 1
  return state, warm, full


def test_warmup_updates_only_the_teacher_path_and_the_schedule_switches(adam_run):
  state, new, _ = adam_run
  assert leaves_equal(new.params["student"], state.params["student"])
  assert leaves_equal(new.batch_stats["student"], state.batch_stats["student"])
  assert leaves_equal(new.task_opt_state, state.task_opt_state)
  for name in TEACHERS:
    assert every_leaf_changed(new.params[name], state.params[name]), name


def counts(opt_state, kind):
  """The `count` of every optax state of type `kind` in `opt_state`."""
  is_kind = lambda s: isinstance(s, kind)
  return [int(s.count) for s in jax.tree.leaves(opt_state, is_leaf=is_kind) if is_kind(s)]


def test_adam_counts_bias_correction_per_optimizer_and_the_schedule_at_the_global_step(setup, adam_run):
  """TF's two AdamOptimizers: each one's bias correction counts its own updates (Adam_S: 0 at the
  start and after the warm-up, 1 after the first full step), while both read the learning rate
  at the global step (Adam_S's schedule count starts at warmup_steps = 1). First updates by hand:
  Adam's first step is -lr · m̂/(√v̂ + ε) = -lr · g/(|g| + ε) with the bias-corrected moments
  m̂ = g, v̂ = g², so every parameter a first update trains moves by lr (1e-3) exactly — a count
  shifted to warmup_steps would correct by 1 − β^2 and move it by 0.74 lr."""
  config, _, _ = setup
  state, warm, full = adam_run
  adam, schedule = optax.ScaleByAdamState, optax.ScaleByScheduleState
  assert [counts(s.task_opt_state, adam) for s in (state, warm, full)] == [[0], [0], [1]]   # Adam_S
  assert [counts(s.task_opt_state, schedule) for s in (state, warm, full)] == [[1], [1], [2]]
  assert [counts(s.opt_state, adam) for s in (state, warm, full)] == [[0], [1], [2]]        # Adam_T
  assert [counts(s.opt_state, schedule) for s in (state, warm, full)] == [[0], [1], [2]]
  lr = config.optimizer.learning_rate
  moved = lambda new, old, name: np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel() for a, b in
                                                 zip(jax.tree.leaves(new[name]), jax.tree.leaves(old[name]))])
  for name in TEACHERS:   # Adam_T's first update, in the warm-up
    np.testing.assert_allclose(moved(warm.params, state.params, name), lr, rtol=1e-2, err_msg=name)   # not 1e-3: g/(|g| + ε) at |g| ~ 1e-5
  # Adam_S's first update, in the first full step (the universal decoder: Adam_S's alone)
  np.testing.assert_allclose(moved(full.params, warm.params, "student"), lr, rtol=1e-2)


def test_each_auxiliary_decoder_sees_only_its_sites_samples(setup):
  config, state, batch = setup
  teacher_objective, _ = msnet.make_objectives(msnet.network(config, INFO, train=True), config, num_classes=C)
  grad = jax.jit(jax.grad(lambda p, b: teacher_objective(p, state.batch_stats, b, jax.random.PRNGKey(0))[0]))
  other = dict(batch, image=batch["image"] * np.where(batch["domain"] == 1, 3.0, 1.0)[:, None, None, None]
               + np.where(batch["domain"] == 1, 0.7, 0.0)[:, None, None, None].astype(np.float32))
  a, b = grad(state.params, batch), grad(state.params, other)
  assert max_diff(a, b, ("teachers_0",)) < 1e-6          # site B's images do not reach teacher A
  assert max_diff(a, b, ("teachers_1",)) > 1e-4          # ... they do reach teacher B


# --- Data parallelism and a whole run ------------------------------------------------------------


@pytest.mark.slow   # ~40 s of compilation; the end-to-end run below takes pmapped steps on 4 devices
def test_pmapped_steps_equal_one_device(setup):
  config, state, _ = setup
  batch = make_batch(seed=5, n=4)   # 2 devices x (1 slice of each site)
  single = msnet.make_step(config, INFO)
  multi = msnet.make_step(config, RunInfo(C, (16, 16, 1), axis_name=parallel.AXIS_NAME, domains=("A", "B")))
  one, two = state, None
  runners = [parallel.DataParallel(s, num_devices=2) for s in multi.steps]
  two = runners[0].replicate(state)
  key = jax.random.PRNGKey(4)
  for phase in (0, 1):   # a warm-up step, then a full step
    one, m1 = jax.jit(single.steps[phase])(one, batch, key)
    two, m2 = runners[phase].step(two, batch, key)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
  host = parallel.DataParallel.unreplicate(two)
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(host.params)):
    np.testing.assert_allclose(a, b, atol=2e-5)
  for a, b in zip(jax.tree.leaves(one.batch_stats), jax.tree.leaves(host.batch_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_validate_refuses_settings_msnet_cannot_honour():
  with pytest.raises(ValueError, match="msnet.eval_branch"):
    validate(make_config(**{"msnet.eval_branch": "teacher"}))
  with pytest.raises(ValueError, match="msnet.warmup_steps"):
    validate(make_config(**{"msnet.warmup_steps": 10}))
  with pytest.raises(ValueError, match="model.norm"):
    validate(make_config(**{"model.norm": "batch"}))
  validate(make_config())


def test_run_end_to_end_reports_the_universal_and_the_auxiliary_branch(tmp_path):
  """A run writes results.* (universal branch, "MS-Net") and, through msnet.write_figures,
  msnet/results_auxiliary.* (the auxiliary branch of the same selected state, "MS-Net (auxiliary)",
  Dice only), whose per-volume Dice equal the docstring command's scores of the checkpoint."""
  root = make_sites_dataset(tmp_path / "toy", sites=("A", "B", "C"), cases=4)
  config = tiny_config(root, **{"method": "msnet", "model.norm": "dsbn", "data.held_out": (), "model.depth": 1,
                                "batch_size": 12, "num_steps": 4, "msnet.warmup_steps": 2,
                                "eval_every": 4, "checkpoint.every": 4, "eval.selection": "last",
                                "data.split.val_fraction": 0.0,   # no validation pass: one compile less
                                "loss.ce_weight": 0.0, "loss.dice_variant": "linear"})
  run = tmp_path / "run"
  result = train_lib.train_and_evaluate(config, run)
  results = (run / "results.md").read_text()
  assert "| MS-Net |" in results and "(auxiliary)" not in results
  assert {r["site"] for r in result["records"]} == {"A", "B", "C"}
  assert all(r["role"] == "in-domain" for r in result["records"])
  # the auxiliary branch, written by the run itself next to the model's checkpoints
  assert "| MS-Net (auxiliary) |" in (run / "msnet" / "results_auxiliary.md").read_text()
  written = json.loads((run / "msnet" / "results_auxiliary.json").read_text())
  assert written["branch"] == "auxiliary" and written["steps"] == {"msnet": 4}
  assert {r["method"] for r in written["records"]} == {"MS-Net (auxiliary)"}
  assert {(r["site"], r["role"]) for r in written["records"]} == {(s, "in-domain") for s in "ABC"}
  assert not any("asd" in r for r in written["records"])   # Dice only
  assert not (run / "results_auxiliary.md").exists()
  # = the auxiliary branch of the same checkpoint scored by the docstring's command (no retraining)
  run_config = load_run_config(run)
  run_config.msnet.eval_branch = "auxiliary"
  data = prepare_data(run_config.data, run_dir=run, build_train=False)
  trained = restore_models(run_config, run, num_classes=data.num_classes, sources=data.sources)
  assert trained[0].step == 4
  scored = evaluate_models(run_config, data, trained, run, results_name="results_auxiliary")["records"]
  dice = lambda records: {(r["site"], r["case"]): r["dice"] for r in records}
  assert dice(scored).keys() == dice(written["records"]).keys()
  for case, value in dice(scored).items():
    np.testing.assert_allclose(dice(written["records"])[case], value, atol=1e-6, err_msg=str(case))
  # sensitivity: the universal branch scores the volumes differently
  assert any(not np.allclose(dice(result["records"])[c], v, atol=1e-4) for c, v in dice(scored).items())
  assert "| MS-Net |" in (run / "results.md").read_text()   # results.md kept
