"""The method interface (a new method needs no trainer change) and the first adaptation methods:
source only, supervised target, DANN; the --uda sweep and its table."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import make_sites_dataset, tiny_config
from medgen_jax import losses, methods, parallel, sweep, train_lib
from medgen_jax.data.pipeline import prepare_data
from medgen_jax.data.sampler import SourceTargetSampler
from medgen_jax.methods import base, deepall
from medgen_jax.methods.uda import dann

UDA = {"data.sites": ("A",), "data.held_out": ("C",), "data.target_adaptation": True,
       "eval.selection": "last"}


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory):
  return make_sites_dataset(tmp_path_factory.mktemp("uda") / "toy", sites=("A", "C"), cases=4)


@pytest.fixture(scope="module")
def uda_batch(two_sites):
  config = tiny_config(two_sites, method="dann", **UDA)
  data = prepare_data(config.data, progress=None)
  sampler = SourceTargetSampler(data.train, data.adapt, sources=["A"], targets=["C"], batch_size=4, seed=0)
  return config, data, sampler.batch_at(0)


# --- A method owns its networks --------------------------------------------------------------


class _CountingMethod:
  """A method the trainer has never seen: DeepAll's segmenter plus a second network (a scalar
  'counter' with its own SGD) that the step moves by 1 each step; its own label and sampler."""

  LABEL = "Counting"
  SAMPLER = "pooled"
  eval_network = staticmethod(deepall.eval_network)

  @staticmethod
  def init_state(key, config, info):
    state = deepall.init_state(key, config, info)
    counter = {"value": jnp.zeros(())}
    return state.replace(nets={"counter": base.init_net(counter, {}, optax.sgd(1.0))})

  @staticmethod
  def make_step(config, info):
    inner = deepall.make_step(config, info)

    def step(state, batch, key):
      new, metrics = inner(state, batch, key)
      counter = base.update_net(new.nets["counter"], optax.sgd(1.0), {"value": -jnp.ones(())})
      return new.replace(nets={"counter": counter}), dict(metrics, counter=counter.params["value"])

    return step


def test_a_new_method_trains_resumes_and_evaluates_without_trainer_changes(two_sites, tmp_path,
                                                                           monkeypatch):
  monkeypatch.setitem(methods.MODULES, "counting", _CountingMethod)
  monkeypatch.setattr(train_lib.config_lib, "METHODS", tuple(methods.MODULES))
  config = tiny_config(two_sites, **{"data.held_out": ("C",), "num_steps": 4, "eval_every": 2,
                                     "checkpoint.every": 2, "eval.selection": "last"})
  with config.unlocked():
    config.method = "counting"
  result = train_lib.train_and_evaluate(config, tmp_path / "run")
  assert {r["method"] for r in result["records"]} == {"Counting"}
  # The checkpoint holds the whole state, the second network and its optimizer included.
  state = train_lib.init_run_parts(config, 4, abstract=True).state
  from medgen_jax.checkpoint import Checkpoints, abstract_like
  ckpts = Checkpoints(tmp_path / "run" / "counting" / "checkpoints", read_only=True)
  restored, _, step = ckpts.restore_selected(abstract_like(state), rule="last")
  ckpts.close()
  assert step == 4 and float(restored.nets["counter"].params["value"]) == 4.0
  logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["counter"] for r in logged if "counter" in r] == [2.0, 4.0]


class _PhasedCountingMethod(_CountingMethod):
  """Two phases (methods/base.Phases): steps 0-1 add 1 to the counter, steps 2.. add 10."""

  @staticmethod
  def make_step(config, info):
    inner = deepall.make_step(config, info)

    def add(amount):
      def step(state, batch, key):
        new, metrics = inner(state, batch, key)
        counter = base.update_net(new.nets["counter"], optax.sgd(1.0), {"value": -amount * jnp.ones(())})
        return new.replace(nets={"counter": counter}), dict(metrics, counter=counter.params["value"])
      return step

    return base.Phases(steps=(add(1.0), add(10.0)), schedule=lambda step: (jnp.asarray(step) >= 2).astype(jnp.int32))


def test_the_trainer_runs_each_phase_at_its_steps(two_sites, tmp_path, monkeypatch):
  monkeypatch.setitem(methods.MODULES, "phased", _PhasedCountingMethod)
  monkeypatch.setattr(train_lib.config_lib, "METHODS", tuple(methods.MODULES))
  config = tiny_config(two_sites, **{"data.held_out": ("C",), "num_steps": 4, "log_every": 1,
                                     "eval_every": 4, "checkpoint.every": 4, "eval.selection": "last",
                                     "eval.distances": False})
  with config.unlocked():
    config.method = "phased"
  train_lib.train_and_evaluate(config, tmp_path / "run")
  logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["counter"] for r in logged if "counter" in r] == [1.0, 2.0, 12.0, 22.0]
  # Called as one function (lax.switch on the traced step), the same values.
  info = base.RunInfo(4, (16, 16, 1))
  phases = _PhasedCountingMethod.make_step(config, info)
  state = _PhasedCountingMethod.init_state(jax.random.PRNGKey(0), config, info)
  batch = {"image": np.zeros((4, 16, 16, 1), np.float32), "label": np.zeros((4, 16, 16), np.int32)}
  for expected in (1.0, 2.0, 12.0):
    state, metrics = jax.jit(phases)(state, batch, jax.random.PRNGKey(0))
    assert float(metrics["counter"]) == expected


# --- Source only / supervised target ---------------------------------------------------------


def test_source_only_and_supervised_target_test_on_the_same_target_cases(two_sites, tmp_path):
  so = train_lib.train_and_evaluate(tiny_config(two_sites, method="source_only", num_steps=2, **UDA),
                                    tmp_path / "so")
  st = train_lib.train_and_evaluate(
      tiny_config(two_sites, method="supervised_target", num_steps=2, **{
          "data.sites": ("C",), "data.held_out": (), "eval.selection": "last"}), tmp_path / "st")
  so_cases = sorted(r["case"] for r in so["records"] if r["site"] == "C")
  st_cases = sorted(r["case"] for r in st["records"] if r["site"] == "C")
  assert so_cases == st_cases and so_cases
  assert {r["method"] for r in st["records"]} == {"Supervised target [target labels]"}
  assert "target labels" in st["markdown"] and "Source only" in so["markdown"]


def test_adaptation_methods_refuse_a_run_without_target_data(two_sites):
  config = tiny_config(two_sites, method="dann", **{"data.held_out": ("C",)})
  with pytest.raises(ValueError, match="data.target_adaptation=True"):
    methods.get("dann").validate(config)
  with pytest.raises(ValueError, match="supervised_target"):
    methods.get("supervised_target").validate(tiny_config(two_sites, method="supervised_target"))
  bad_level = tiny_config(two_sites, method="dann", **UDA, **{"dann.level": "up7"})
  with pytest.raises(ValueError, match="dann.level='up7': not a U-Net block"):
    methods.get("dann").validate(bad_level)


# --- DANN ------------------------------------------------------------------------------------


def _dann_parts(config, axis_name=None):
  info = base.RunInfo(num_classes=4, input_shape=(16, 16, 1), axis_name=axis_name)
  state = dann.init_state(jax.random.PRNGKey(0), config, info)
  return state, dann.make_step(config, info)


def test_dann_gradients_are_the_segmentation_gradient_minus_lambda_times_the_domain_gradient(uda_batch):
  """Independent of the reversal layer: θ's gradient = ∇θ L_seg − w·λ·∇θ L_d and ψ's = w·∇ψ L_d,
  with L_d computed WITHOUT any reversal; checked on the SGD update (lr 1) of both networks."""
  config, _, batch = uda_batch
  config = config.copy_and_resolve_references()
  config.optimizer.name, config.optimizer.learning_rate, config.optimizer.momentum = "sgd", 1.0, 0.0
  config.dann.weight, config.dann.disc_lr = 0.7, 1.0
  config.num_steps = 4
  state, _ = _dann_parts(config)
  state = state.replace(step=jnp.asarray(2, jnp.int32))  # p = 0.5: λ = tanh(2.5)
  model = deepall.segmenter(config, base.RunInfo(4, (16, 16, 1)), train=True)
  disc = dann.discriminator(config)[0]
  key = jax.random.PRNGKey(5)
  # The step's own key use: no dropout and no augmentation, so keys do not change the values.
  step = dann.make_train_step(model, optax.sgd(1.0), config, num_classes=4, disc=disc,
                              disc_tx=optax.sgd(1.0))
  new, metrics = jax.jit(step)(state, batch, key)

  def seg(params):
    logits, _ = model.apply({"params": params, "batch_stats": state.batch_stats}, batch["source"]["image"],
                            train=True, mutable=["batch_stats"])
    return deepall.segmentation_terms(logits, batch["source"]["label"], params, config.loss, num_classes=4)[0]

  def domain(params, psi):
    stats = state.batch_stats
    (_, lv_s), upd = model.apply({"params": params, "batch_stats": stats}, batch["source"]["image"],
                                 train=True, return_levels=True, mutable=["batch_stats"])
    (_, lv_t), _ = model.apply({"params": params, "batch_stats": upd["batch_stats"]},
                               batch["target"]["image"], train=True, return_levels=True, mutable=["batch_stats"])
    d_s = disc.apply({"params": psi}, lv_s["bottleneck"])
    d_t = disc.apply({"params": psi}, lv_t["bottleneck"])
    # Sigmoid cross-entropy written out: −log σ(d_s) − log(1 − σ(d_t)).
    return jnp.mean(-jnp.log(jax.nn.sigmoid(d_s))) + jnp.mean(-jnp.log(1 - jax.nn.sigmoid(d_t)))

  lam = float(np.tanh(2.5))
  psi = state.nets["disc"].params
  g_seg = jax.grad(seg)(state.params)
  g_dom_theta, g_dom_psi = jax.grad(domain, argnums=(0, 1))(state.params, psi)
  expected_theta = jax.tree.map(lambda p, a, b: p - (a - 0.7 * lam * b), state.params, g_seg, g_dom_theta)
  expected_psi = jax.tree.map(lambda p, b: p - 0.7 * b, psi, g_dom_psi)
  change = jax.tree.map(lambda a, b: a - b, expected_theta, state.params)
  domain_part = optax.tree.norm(g_dom_theta) * 0.7 * lam
  assert float(domain_part) > 1e-3 * float(optax.tree.norm(change))  # the reversal matters
  error = optax.tree.norm(jax.tree.map(lambda a, b: a - b, new.params, expected_theta))
  # float32 round-off of the parameters (~5e-7 here); no reversal would miss by 2x domain_part.
  assert float(error) < 1e-2 * float(domain_part)
  for got, want in zip(jax.tree.leaves(new.nets["disc"].params), jax.tree.leaves(expected_psi)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["reversal_scale"], lam, rtol=1e-6)
  assert int(new.first_bad_step) == 0


@pytest.mark.slow  # ~23 s; the pmapped DANN step runs in CI in the end-to-end test (4 devices), its
# gradients in the hand-gradient test, and device equality for the other adversarial steps
def test_dann_step_on_two_devices_equals_one_device(uda_batch):
  config, _, batch = uda_batch
  state, step = _dann_parts(config)
  one, m1 = jax.jit(step)(state, batch, jax.random.PRNGKey(1))
  sync_config = config.copy_and_resolve_references()
  state2, step2 = _dann_parts(sync_config, axis_name=parallel.AXIS_NAME)
  runner = parallel.DataParallel(step2, num_devices=2, donate=False)
  two, m2 = runner.step(runner.replicate(state2), batch, jax.random.PRNGKey(1))
  two = runner.unreplicate(two)
  change = optax.tree.norm(jax.tree.map(lambda a, b: a - b, one.params, state.params))
  assert float(change) > 1e-4
  for a, b in ((one.params, two.params), (one.nets["disc"].params, two.nets["disc"].params),
               (one.batch_stats, two.batch_stats)):
    diff = optax.tree.norm(jax.tree.map(lambda x, y: x - y, a, b))
    assert float(diff) < 1e-4 * max(float(change), 1e-3)
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)


def test_dann_trains_end_to_end_without_target_labels(two_sites, tmp_path, monkeypatch):
  calls = []
  original = losses.gradient_reversal
  monkeypatch.setattr(dann.losses, "gradient_reversal",
                      lambda x, scale: calls.append(1) or original(x, scale))
  result = train_lib.train_and_evaluate(tiny_config(two_sites, method="dann", num_steps=3, **UDA),
                                        tmp_path / "run")
  assert calls  # traced once
  assert {r["site"] for r in result["records"]} == {"A", "C"}
  assert "unsupervised adaptation" in result["markdown"]
  logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert any("loss_domain" in r for r in logged)


# --- The --uda sweep ---------------------------------------------------------------------------


def test_uda_sweep_runs_directions_and_writes_the_table(two_sites, tmp_path, monkeypatch, capsys):
  config_file = tmp_path / "uda_tiny.py"
  config_file.write_text(f"""
from medgen_jax.config import base_config
def get_config(arg=None):
  c = base_config()
  c.method = arg or "source_only"
  c.data.root = {str(two_sites)!r}
  c.data.in_plane_shape = (16, 16)
  c.model.base_features = 4
  c.model.depth = 2
  c.batch_size = 4
  c.num_steps = 1
  c.eval_every = c.checkpoint.every = 1
  c.eval.selection = "last"
  return c
""")
  seen = []

  def fake_train(config, workdir):
    seen.append((config.method, config.data.sites, config.data.held_out, config.data.target_adaptation))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "data_info.json").write_text(json.dumps({"labels": {"0": "bg", "1": "x", "2": "y"}}))
    target = config.data.held_out[0] if config.data.held_out else config.data.sites[0]
    value = {"source_only": 0.2, "supervised_target": 0.9}[config.method] + 0.1 * config.seed
    return {"records": [{"method": config.method, "site": target, "case": "c0", "role": "unseen",
                         "dice": [value, value / 2], "asd": [1.0, 3.0]}]}

  monkeypatch.setattr(train_lib, "train_and_evaluate", fake_train)
  workdir = tmp_path / "sweep"
  assert sweep.main(["--uda", "--config", f"{config_file}:source_only", "--config",
                     f"{config_file}:supervised_target", "--directions", "A:C", "--seeds", "2",
                     "--workdir", str(workdir)]) == 0
  assert ("source_only", ("A",), ("C",), True) in seen
  assert ("supervised_target", ("C",), (), False) in seen
  table = (workdir / "sweep.md").read_text()
  assert "## A → C" in table
  assert "| Method | Dice (%) x | Dice (%) y | Dice (%) mean | ASD (mm) x | ASD (mm) y | ASD (mm) mean |" in table
  # source only: seeds 0.2 and 0.3 -> x 25 ± 5, y 12.5 ± 2.5, mean 18.75 ± 3.75
  assert "| source_only | 25.00 ± 5.00 | 12.50 ± 2.50 | 18.75 ± 3.75 | 1.00 ± 0.00 | 3.00 ± 0.00 | 2.00 ± 0.00 |" in table
  assert (workdir / "uda_tiny_source_only" / "A_to_C" / "seed1").is_dir()
  rows = (workdir / "sweep.csv").read_text().splitlines()
  assert len(rows) == 1 + 2 * 2 * 2
  assert sweep.main(["--uda", "--config", str(config_file), "--directions", "A:B", "--seeds", "1",
                     "--workdir", str(tmp_path / "bad")]) == 1
  assert "'A:B' is not SOURCE:TARGET" in capsys.readouterr().err
  # Two configs with the same method label: one row each, named by config (not merged seeds).
  twin = tmp_path / "twin.py"
  twin.write_text(config_file.read_text())
  assert sweep.main(["--uda", "--config", f"{config_file}:source_only", "--config", f"{twin}:source_only",
                     "--directions", "A:C", "--seeds", "1", "--workdir", str(tmp_path / "twins")]) == 0
  table = (tmp_path / "twins" / "sweep.md").read_text()
  assert "| source_only (uda_tiny_source_only) |" in table and "| source_only (twin_source_only) |" in table


def test_metrics_log_is_strict_json_with_null_for_non_finite_values(tmp_path):
  from medgen_jax.writers import MetricWriter
  writer = MetricWriter(tmp_path, model="m", resume_step=0)
  writer.write(1, "train", {"loss": np.float32(0.5), "loss_disc": np.float32(np.nan),
                            "dice": np.asarray([0.1, np.inf])})
  writer.close()
  line = (tmp_path / "metrics.jsonl").read_text().splitlines()[0]
  assert "NaN" not in line and "Infinity" not in line
  assert json.loads(line)["loss_disc"] is None and json.loads(line)["dice"] == [0.1, None]


@pytest.mark.slow  # resume: test_train.py::test_killed_run_resumes_bit_identical; phase dispatch by
                   # the trainer: test_the_trainer_runs_each_phase_at_its_steps (both in the default run)
def test_killed_adaptation_run_resumes_bit_identical_across_its_phases(two_sites, tmp_path, monkeypatch):
  """PnP-AdaNet (source phase, critic warm-up, critic/DAM cycles; four networks, three optimizer
  states): killed in its adversarial stage, resumed, it ends bit-identical to a straight run."""
  import orbax.checkpoint as ocp
  pnp = {"pnp.pretrain_steps": 2, "pnp.critic_warmup_steps": 1, "pnp.critic_steps": 1,
         "pnp.critic_steps_growth_every": 0, "pnp.levels": ("down1", "bottleneck"), "pnp.adapt_levels": 1,
         "pnp.critic_features": 4, "pnp.mask_critic_features": 4, "pnp.critic_layers": 2}
  config = lambda: tiny_config(two_sites, method="pnp_adanet", num_steps=7, log_every=1, eval_every=7,
                               **UDA, **pnp, **{"checkpoint.every": 2, "eval.distances": False})
  train_lib.train_and_evaluate(config(), tmp_path / "straight")
  original = SourceTargetSampler.batch_at

  def killed_at_step_5(self, step, **kw):  # step 4 (a critic step) was saved; 5 (DAM) is redone
    if step == 5:
      raise KeyboardInterrupt("simulated kill")
    return original(self, step, **kw)

  monkeypatch.setattr(SourceTargetSampler, "batch_at", killed_at_step_5)
  with pytest.raises(KeyboardInterrupt):
    train_lib.train_and_evaluate(config(), tmp_path / "resumed")
  monkeypatch.setattr(SourceTargetSampler, "batch_at", original)
  train_lib.train_and_evaluate(config(), tmp_path / "resumed")

  def saved(run):
    return ocp.StandardCheckpointer().restore((tmp_path / run / "pnp_adanet" / "checkpoints" / "7" / "state").absolute())

  straight, resumed = saved("straight"), saved("resumed")
  assert set(straight["nets"]) == {"source", "critic", "mask_critic"}
  leaves_a, leaves_b = jax.tree.leaves(straight), jax.tree.leaves(resumed)
  assert len(leaves_a) == len(leaves_b) > 20
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
