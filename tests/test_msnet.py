"""MS-Net (methods/multisite/msnet.py): the knowledge-transfer loss against numpy, the argmax target
without gradient, the released step order against a hand composition of two SGD(1) updates of
hand-written per-site losses (the TF way: one network call per site), the warm-up, per-site
auxiliary decoders, pmap == one device, and a run end to end with both branches evaluated."""

from __future__ import annotations

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

  def jitted(self):
    """(L_teacher and its gradient, the targets, L_student and its gradient), compiled once."""
    targets = jax.jit(lambda p: [jnp.argmax(self.aux(p, k), axis=-1) for k in range(K)])
    return (jax.jit(jax.value_and_grad(self.teacher_loss)), targets,
            jax.jit(jax.value_and_grad(self.student_loss)))


@pytest.fixture(scope="module")
def hand(setup):
  return Hand(*setup).jitted()


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


def test_step_is_teacher_update_then_recomputed_student_update(setup, hand):
  config, state, batch = setup
  step = msnet.make_train_step(msnet.network(config, INFO, train=True), optax.sgd(1.0), optax.sgd(1.0), config,
                               num_classes=C)
  new, metrics = jax.jit(step.steps[1])(state, batch, jax.random.PRNGKey(2))
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


def test_warmup_updates_only_the_teacher_path_and_the_schedule_switches(setup):
  config, state, batch = setup
  step = msnet.make_step(config, INFO)
  assert [int(step.schedule(s)) for s in (0, 1, 5)] == [0, 1, 1]   # warmup_steps = 1
  new, metrics = jax.jit(step.steps[0])(state, batch, jax.random.PRNGKey(3))
  assert int(new.step) == 1 and int(metrics["phase"]) == 0
  assert leaves_equal(new.params["student"], state.params["student"])
  assert leaves_equal(new.batch_stats["student"], state.batch_stats["student"])
  assert leaves_equal(new.task_opt_state, state.task_opt_state)
  for name in TEACHERS:
    assert every_leaf_changed(new.params[name], state.params[name]), name
  # Adam_S's learning rate is read at the global step: its schedule starts at warmup_steps
  counts = [s.count for s in jax.tree.leaves(state.task_opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByScheduleState))
            if isinstance(s, optax.ScaleByScheduleState)]
  assert counts and all(int(c) == config.msnet.warmup_steps for c in counts)


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
  root = make_sites_dataset(tmp_path / "toy", sites=("A", "B", "C"), cases=4)
  config = tiny_config(root, **{"method": "msnet", "model.norm": "dsbn", "data.held_out": (), "model.depth": 1,
                                "batch_size": 12, "num_steps": 4, "msnet.warmup_steps": 2,
                                "eval_every": 4, "checkpoint.every": 4, "eval.selection": "last",
                                "data.split.val_fraction": 0.0,   # no validation pass: one compile less
                                "loss.ce_weight": 0.0, "loss.dice_variant": "linear"})
  result = train_lib.train_and_evaluate(config, tmp_path / "run")
  assert "| MS-Net |" in (tmp_path / "run" / "results.md").read_text()
  assert {r["site"] for r in result["records"]} == {"A", "B", "C"}
  assert all(r["role"] == "in-domain" for r in result["records"])
  # the auxiliary branch of the same checkpoint, scored without retraining (README command)
  run_config = load_run_config(tmp_path / "run")
  run_config.msnet.eval_branch = "auxiliary"
  data = prepare_data(run_config.data, run_dir=tmp_path / "run", build_train=False)
  trained = restore_models(run_config, tmp_path / "run", num_classes=data.num_classes, sources=data.sources)
  assert trained[0].step == 4
  evaluate_models(run_config, data, trained, tmp_path / "run", results_name="results_auxiliary")
  assert "| MS-Net (auxiliary) |" in (tmp_path / "run" / "results_auxiliary.md").read_text()
  assert "| MS-Net |" in (tmp_path / "run" / "results.md").read_text()   # results.md kept
