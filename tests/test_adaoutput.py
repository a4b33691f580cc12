"""AdaOutput (AdaptSegNet): which update moves which network, the BCE losses and labels of the
released code, DeepAll as its λ = 0 special case, N devices = one device, and a trainer run."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import make_sites_dataset, tiny_config
from medgen_jax import config as config_lib
from medgen_jax import methods, parallel, train_lib
from medgen_jax.methods import base, deepall
from medgen_jax.methods.uda import adaoutput

SHAPE = (32, 32)   # the discriminator's minimum
UDA = {"data.sites": ("A",), "data.held_out": ("C",), "data.target_adaptation": True,
       "eval.selection": "last", "data.in_plane_shape": SHAPE, "adaoutput.disc_features": 4}
INFO = base.RunInfo(num_classes=4, input_shape=(*SHAPE, 1))


def trees_equal(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def norm_diff(a, b) -> float:
  """‖a − b‖ over two trees, in numpy (no per-shape XLA compilations)."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
                           for x, y in zip(la, lb))))


def make_batch(seed=0, n=4):
  rng = np.random.default_rng(seed)
  labels = np.zeros((n, *SHAPE), np.int32)
  for i in range(n):
    for k in range(1, 4):
      x, y = rng.integers(0, SHAPE[0] - 10, size=2)
      labels[i, x:x + 10, y:y + 10] = k
  source = (labels * 1.0 + rng.normal(0, 0.3, labels.shape)).astype(np.float32)[..., None]
  target = (3.0 - labels * 0.8 + rng.normal(0, 0.3, labels.shape)).astype(np.float32)[..., None]
  return {"source": {"image": source, "label": labels, "domain": np.zeros(n, np.int32)},
          "target": {"image": target, "domain": np.ones(n, np.int32)}}


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
  """A multi-level config, its initial state, one batch and the two sub-updates run once."""
  config = tiny_config(tmp_path_factory.mktemp("ao"), method="adaoutput",
                       **dict(UDA, **{"adaoutput.multi_level": True, "adaoutput.weight": 0.5,
                                      "adaoutput.aux_weight": 0.3}))
  state = adaoutput.init_state(jax.random.PRNGKey(0), config, INFO)
  parts = adaoutput.step_parts(config, INFO)
  seg_update = jax.jit(adaoutput.make_segmenter_update(
      deepall.segmenter(config, INFO, train=True), adaoutput.segmenter_optimizer(config), config,
      num_classes=4, disc=parts["disc"], head=parts["head"]))
  disc_update = jax.jit(adaoutput.make_discriminator_update(parts["disc_tx"], disc=parts["disc"],
                                                            multi_level=True))
  batch, key = make_batch(), jax.random.PRNGKey(3)
  after_seg, seg_metrics, outputs = seg_update(state, batch, key)
  after_disc, disc_metrics = disc_update(after_seg, outputs)
  return dict(config=config, state=state, batch=batch, key=key, parts=parts, after_seg=after_seg,
              seg_metrics=seg_metrics, outputs=outputs, after_disc=after_disc, disc_metrics=disc_metrics,
              disc_update=disc_update)


def test_networks_and_registry(setting):
  state = setting["state"]
  assert set(state.nets) == {"disc", "aux_head", "disc_aux"}
  assert state.nets["aux_head"].params["head"]["kernel"].shape == (8, 4)  # up1 of base 4: 8 channels
  assert methods.get("adaoutput") is adaoutput
  assert methods.label(setting["config"], ["A"]) == "AdaOutput (multi-level)"
  assert setting["outputs"]["target_aux"].shape == (4, *SHAPE, 4)  # upsampled to the slice


def test_segmenter_update_moves_segmenter_and_aux_head_only(setting):
  state, new = setting["state"], setting["after_seg"]
  for name in ("disc", "disc_aux"):
    assert trees_equal(new.nets[name], state.nets[name]), name  # params and Adam state
  assert norm_diff(new.params, state.params) > 1e-4
  assert norm_diff(new.nets["aux_head"].params, state.nets["aux_head"].params) > 1e-4
  assert int(new.step) == 1 and int(new.first_bad_step) == 0


def test_discriminator_update_moves_discriminators_only(setting):
  before, new = setting["after_seg"], setting["after_disc"]
  assert trees_equal(new.params, before.params) and trees_equal(new.batch_stats, before.batch_stats)
  assert trees_equal(new.opt_state, before.opt_state)
  assert trees_equal(new.nets["aux_head"], before.nets["aux_head"])
  for name in ("disc", "disc_aux"):
    assert norm_diff(new.nets[name].params, before.nets[name].params) > 1e-5, name
  assert int(new.step) == 1 and int(new.first_bad_step) == 0


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def test_losses_follow_the_released_labels_source_0_target_1():
  rng = np.random.default_rng(0)
  d_s, d_t = rng.normal(0, 2, (3, 2, 2, 1)), rng.normal(0, 2, (3, 2, 2, 1))
  # G: the target map labelled source (0): −log(1 − σ(D(P_t))).
  np.testing.assert_allclose(adaoutput.adversarial_loss(d_t), np.mean(-np.log(1 - _sigmoid(d_t))), rtol=1e-5)
  # D: ½ BCE(D(P_s), 0) + ½ BCE(D(P_t), 1).
  expected = 0.5 * np.mean(-np.log(1 - _sigmoid(d_s))) + 0.5 * np.mean(-np.log(_sigmoid(d_t)))
  np.testing.assert_allclose(adaoutput.discriminator_loss(d_s, d_t), expected, rtol=1e-5)
  assert np.isfinite(float(adaoutput.discriminator_loss(jnp.full((2,), 1e4), jnp.full((2,), -1e4))))


def test_step_losses_are_the_formulas_on_the_discriminators_outputs(setting):
  """The logged L_adv / L_D equal the hand formulas on D's outputs for the step's own maps, and
  D's update is the gradient of the hand-written L_D (SGD, rate 1)."""
  state, outputs, disc = setting["state"], setting["outputs"], setting["parts"]["disc"]
  apply = jax.jit(lambda p, x: disc.apply({"params": p}, x))
  for name, suffix, src, tgt in (("disc", "", "source", "target"), ("disc_aux", "_aux", "source_aux", "target_aux")):
    psi = state.nets[name].params
    d_s, d_t = np.asarray(apply(psi, outputs[src])), np.asarray(apply(psi, outputs[tgt]))
    np.testing.assert_allclose(setting["seg_metrics"][f"loss_adv{suffix}"], np.mean(-np.log(1 - _sigmoid(d_t))),
                               rtol=1e-4)
    np.testing.assert_allclose(setting["disc_metrics"][f"loss_disc{suffix}"],
                               0.5 * np.mean(-np.log(1 - _sigmoid(d_s))) + 0.5 * np.mean(-np.log(_sigmoid(d_t))),
                               rtol=1e-4)
  psi = state.nets["disc"].params

  def hand_loss(p):
    d_s = disc.apply({"params": p}, outputs["source"])
    d_t = disc.apply({"params": p}, outputs["target"])
    return 0.5 * jnp.mean(-jnp.log(1 - jax.nn.sigmoid(d_s))) + 0.5 * jnp.mean(-jnp.log(jax.nn.sigmoid(d_t)))

  sgd = adaoutput.make_discriminator_update(optax.sgd(1.0), disc=disc)
  before = setting["after_seg"].replace(nets=dict(setting["after_seg"].nets,
                                                  disc=base.init_net(psi, {}, optax.sgd(1.0))))
  new, _ = jax.jit(sgd)(before, outputs)
  expected = jax.tree.map(lambda p, g: np.asarray(p) - np.asarray(g), psi, jax.jit(jax.grad(hand_loss))(psi))
  assert norm_diff(new.nets["disc"].params, expected) < 1e-5 * norm_diff(expected, psi)


def test_the_adversarial_terms_move_the_segmenter_and_aux_head_by_their_hand_gradients(setting):
  """SGD(1): θ(λ_adv = w, λ_adv^aux = a) − θ(0, 0) = −∇θ[w·L_adv + a·L_adv^aux] and the aux head's
  difference = −a·∇ L_adv^aux, with L_adv = mean −log(1 − σ(D(P_t))) written out on D's output
  for the target map (D softmaxes the logits it is given), L_adv^aux the same on D_aux and the
  bilinearly upsampled aux logits: the adversarial gradients reach G and the aux head."""
  w, a = 40.0, 20.0   # large: D's 0.02-scale initial kernels give small adversarial gradients
  state, batch, key, parts = setting["state"], setting["batch"], setting["key"], setting["parts"]
  disc, head = parts["disc"], parts["head"]
  sgd = optax.sgd(1.0)
  state = state.replace(opt_state=sgd.init(state.params),
                        nets=dict(state.nets, aux_head=base.init_net(state.nets["aux_head"].params, {}, sgd)))

  def update(weight, aux_weight):
    config = tiny_config(Path("unused"), method="adaoutput",
                         **dict(UDA, **{"adaoutput.multi_level": True, "adaoutput.weight": weight,
                                        "adaoutput.aux_weight": aux_weight}))
    model = deepall.segmenter(config, INFO, train=True)
    return model, adaoutput.make_segmenter_update(model, sgd, config, num_classes=4, disc=disc, head=head)

  model, with_adv = update(w, a)
  _, without = update(0.0, 0.0)
  (ours, _, _), (plain, _, _) = jax.jit(lambda s: (with_adv(s, batch, key), without(s, batch, key)))(state)
  psi, psi_aux = state.nets["disc"].params, state.nets["disc_aux"].params

  def adv(params, head_params, weight, aux_weight):   # the target pass alone: train-mode BN, no dropout
    (logits_t, levels_t), _ = model.apply({"params": params, "batch_stats": state.batch_stats},
                                          batch["target"]["image"], train=True, return_levels=True,
                                          mutable=["batch_stats"])
    aux_t = jax.image.resize(head.apply({"params": head_params}, levels_t["up1"]), logits_t.shape, "bilinear")
    d_t, d_aux = disc.apply({"params": psi}, logits_t), disc.apply({"params": psi_aux}, aux_t)
    return (weight * jnp.mean(-jnp.log(1 - jax.nn.sigmoid(d_t)))
            + aux_weight * jnp.mean(-jnp.log(1 - jax.nn.sigmoid(d_aux))))

  grad = jax.jit(jax.grad(adv, argnums=(0, 1)), static_argnums=(2, 3))
  head_params = state.nets["aux_head"].params
  g_theta, g_head = grad(state.params, head_params, w, a)
  g_main, _ = grad(state.params, head_params, w, 0.0)
  got_theta = jax.tree.map(lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64), ours.params, plain.params)
  got_head = jax.tree.map(lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64),
                          ours.nets["aux_head"].params, plain.nets["aux_head"].params)
  want_theta = jax.tree.map(lambda g: -np.asarray(g, np.float64), g_theta)
  want_head = jax.tree.map(lambda g: -np.asarray(g, np.float64), g_head)
  scale = norm_diff(want_theta, jax.tree.map(np.zeros_like, want_theta))
  error = norm_diff(got_theta, want_theta)
  main = norm_diff(g_main, jax.tree.map(np.zeros_like, g_main))   # ‖w·∇θ L_adv‖: the final output's share
  assert main > 0.1 * scale and main > 100 * error, (main, scale, error)
  assert error < 1e-2 * scale, (error, scale)
  head_scale = norm_diff(want_head, jax.tree.map(np.zeros_like, want_head))
  assert head_scale > 0 and norm_diff(got_head, want_head) < 1e-2 * head_scale


def test_discriminator_update_flags_non_finite_maps(setting):
  """A NaN in the target maps D trains on is recorded for the iteration's step (the segmenter
  update already advanced state.step)."""
  before = setting["after_seg"]
  outputs = dict(setting["outputs"])
  outputs["target"] = outputs["target"].at[0, 0, 0, 0].set(jnp.nan)
  new, metrics = setting["disc_update"](before, outputs)
  assert not np.isfinite(float(metrics["loss_disc"]))
  assert int(before.first_bad_step) == 0 and int(new.first_bad_step) == int(before.step) == 1


def test_with_weight_0_the_segmenter_update_is_a_deepall_step_on_the_source(setting):
  """λ_adv = 0, single level: the same parameters as DeepAll's step on the source half (the
  target pass only adds its BatchNorm statistics)."""
  config = tiny_config(Path("unused"), method="adaoutput", **dict(UDA, **{"adaoutput.weight": 0.0}))
  # The fixture's networks (same config but multi_level and the weights; same key): the segmenter
  # and D only, as init_state makes them for this config.
  full = setting["state"]
  state = full.replace(nets={"disc": full.nets["disc"]})
  model, tx = deepall.segmenter(config, INFO, train=True), adaoutput.segmenter_optimizer(config)
  update = jax.jit(adaoutput.make_segmenter_update(model, tx, config, num_classes=4,
                                                   disc=adaoutput.discriminator(config)))
  ours, metrics, _ = update(state, setting["batch"], setting["key"])
  plain = state.replace(nets={})  # DeepAll starts from the same segmenter and optimizer state
  reference, ref_metrics = jax.jit(deepall.make_train_step(model, tx, config, num_classes=4))(
      plain, setting["batch"]["source"], setting["key"])
  change = norm_diff(reference.params, plain.params)
  assert change > 1e-3
  assert norm_diff(ours.params, reference.params) < 1e-5 * change
  np.testing.assert_allclose(metrics["loss_seg"], ref_metrics["loss"], rtol=1e-6)
  assert not trees_equal(ours.batch_stats, reference.batch_stats)  # the target pass's statistics
  assert "aux_head" not in ours.nets


def test_two_devices_equal_one_device(setting):
  config, state = setting["config"], setting["state"]
  info2 = base.RunInfo(num_classes=4, input_shape=(*SHAPE, 1), axis_name=parallel.AXIS_NAME)
  runner = parallel.DataParallel(adaoutput.make_step(config, info2), num_devices=2, donate=False)
  two, metrics = runner.step(runner.replicate(state), setting["batch"], setting["key"])
  two, one = runner.unreplicate(two), setting["after_disc"]
  for name, a, b, c in (("segmenter", one.params, two.params, state.params),
                        ("stats", one.batch_stats, two.batch_stats, state.batch_stats),
                        *((n, one.nets[n].params, two.nets[n].params, state.nets[n].params)
                          for n in ("aux_head", "disc", "disc_aux"))):
    change = norm_diff(a, c)
    assert change > 1e-5, name  # not a trivially small update
    # Adam's first step is ≈ ±lr wherever |g| ≫ eps, so rounding-level gradient differences on
    # near-zero entries of D's gradient show up amplified: D's bound is looser, its gradient
    # norms are compared tightly below.
    assert norm_diff(a, b) < (1e-3 if name.startswith("disc") else 1e-4) * change, name
  for k in ("loss", "loss_adv", "loss_adv_aux", "grad_norm"):
    np.testing.assert_allclose(metrics[k], setting["seg_metrics"][k], rtol=1e-5)
  for k in ("loss_disc", "loss_disc_aux", "disc_grad_norm", "disc_grad_norm_aux"):
    np.testing.assert_allclose(metrics[k], setting["disc_metrics"][k], rtol=1e-4)


def test_poly_decay_scales_the_updates_and_validation_refuses_misuse(tmp_path):
  tx = adaoutput.poly(optax.sgd(1.0), 0.9, 10)
  opt = tx.init(jnp.zeros(()))
  for step in range(3):
    update, opt = tx.update(jnp.ones(()), opt)
    np.testing.assert_allclose(update, -(1 - step / 10) ** 0.9, rtol=1e-6)
  small = tiny_config(tmp_path, method="adaoutput", **dict(UDA, **{"data.in_plane_shape": (16, 16)}))
  with pytest.raises(ValueError, match="at least 32x32"):
    adaoutput.validate(small)
  poly_cosine = tiny_config(tmp_path, method="adaoutput",
                            **dict(UDA, **{"adaoutput.poly_power": 0.9, "optimizer.schedule": "cosine"}))
  with pytest.raises(ValueError, match="optimizer.schedule='constant'"):
    adaoutput.validate(poly_cosine)
  with pytest.raises(ValueError, match="data.target_adaptation=True"):
    adaoutput.validate(tiny_config(tmp_path, method="adaoutput", **{"data.in_plane_shape": SHAPE}))
  bad_level = tiny_config(tmp_path, method="adaoutput",
                          **dict(UDA, **{"adaoutput.multi_level": True, "adaoutput.aux_level": "up5"}))
  with pytest.raises(ValueError, match="adaoutput.aux_level='up5'"):
    adaoutput.validate(bad_level)


def test_config_file_validates():
  path = Path(__file__).resolve().parents[1] / "configs" / "uda" / "adaoutput.py"
  for arg in (None, "quick"):
    config = runpy.run_path(str(path))["get_config"](arg)
    config_lib.validate(config)
    assert config.adaoutput.multi_level and config.data.held_out == ("CT",)
    assert min(config.data.in_plane_shape) >= 32
  assert (config.adaoutput.weight, config.adaoutput.aux_weight, config.adaoutput.seg_aux_weight) == (0.001, 0.0002, 0.1)


@pytest.mark.slow  # the trainer path (source+target sampler, nets in the checkpoint) runs in DANN's and
                   # PnP-AdaNet's end-to-end tests; the multi-level step is tested above
def test_trains_end_to_end_multi_level(tmp_path):
  root = make_sites_dataset(tmp_path / "toy", sites=("A", "C"), cases=4, shape=(32, 32, 6))
  config = tiny_config(root, method="adaoutput", num_steps=2, log_every=1, eval_every=2,
                       **dict(UDA, **{"checkpoint.every": 2, "adaoutput.multi_level": True,
                                      "eval.distances": False}))
  result = train_lib.train_and_evaluate(config, tmp_path / "run")
  assert {r["site"] for r in result["records"]} == {"A", "C"}
  assert "AdaOutput (multi-level)" in result["markdown"]
  for name in ("results.md", "results.csv", "results.json"):
    assert (tmp_path / "run" / name).is_file()
  logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in logged if r["kind"] == "train"]
  assert [r["step"] for r in train] == [1, 2]
  assert all(np.isfinite(r["loss_disc_aux"]) and np.isfinite(r["loss_adv"]) for r in train)
