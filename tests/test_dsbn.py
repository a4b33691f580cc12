"""DSBN (domain-specific BatchNorm) against a per-domain numpy BatchNorm, on one device and under
pmap, and the evaluation picking the test site's statistics."""

from __future__ import annotations

import flax.linen as nn
import nibabel as nib
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import make_sites_dataset, tiny_config
from medgen_jax import parallel, train_lib
from medgen_jax.config import base_config
from medgen_jax.data.pipeline import prepare_data
from medgen_jax.evaluation import load_trained_models
from medgen_jax.inference import predict_volume
from medgen_jax.methods.base import domain_index
from medgen_jax.methods.deepall import make_train_step
from medgen_jax.models import UNet
from medgen_jax.models.domains import UNSEEN, DomainBatchNorm, select_domain
from medgen_jax.train_state import create_train_state, make_optimizer

EPS, MOMENTUM = 1e-3, 0.9


def numpy_dsbn(x, domain, scale, bias, ra_mean, ra_var):
  """Per-domain BatchNorm written from the definition: each domain's samples normalized with the
  biased mean/variance of that domain's samples only; running stats of absent domains kept."""
  x = np.asarray(x, np.float64)
  y = np.empty_like(x)
  new_mean, new_var = ra_mean.astype(np.float64).copy(), ra_var.astype(np.float64).copy()
  for k in range(scale.shape[0]):
    rows = domain == k
    if not rows.any():
      continue
    xs = x[rows]
    mean = xs.mean(axis=(0, 1, 2))
    var = xs.var(axis=(0, 1, 2))
    y[rows] = (xs - mean) / np.sqrt(var + EPS) * scale[k] + bias[k]
    new_mean[k] = MOMENTUM * ra_mean[k] + (1 - MOMENTUM) * mean
    new_var[k] = MOMENTUM * ra_var[k] + (1 - MOMENTUM) * var
  return y, new_mean, new_var


@pytest.fixture(scope="module")
def dsbn_case():
  rng = np.random.default_rng(0)
  k, c = 4, 3
  # domain 3 is absent; domains have unequal counts and very different statistics
  domain = np.array([0, 1, 0, 2, 1, 0, 2, 0], np.int32)
  x = (rng.normal(size=(8, 5, 6, c)) * (1 + 3 * domain[:, None, None, None])
       + 10 * domain[:, None, None, None]).astype(np.float32)
  variables = {"params": {"scale": rng.uniform(0.5, 2, (k, c)).astype(np.float32),
                          "bias": rng.normal(size=(k, c)).astype(np.float32)},
               "batch_stats": {"mean": rng.normal(size=(k, c)).astype(np.float32),
                               "var": rng.uniform(0.5, 2, (k, c)).astype(np.float32)}}
  return x, domain, variables


def test_training_statistics_are_those_of_each_domain(dsbn_case):
  x, domain, v = dsbn_case
  y, updates = DomainBatchNorm(4).apply(v, x, train=True, domain=domain, mutable=["batch_stats"])
  want, mean, var = numpy_dsbn(x, domain, v["params"]["scale"], v["params"]["bias"],
                               v["batch_stats"]["mean"], v["batch_stats"]["var"])
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], mean, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(updates["batch_stats"]["var"], var, rtol=1e-4, atol=1e-3)
  # the absent domain's statistics are untouched (bit-identical)
  np.testing.assert_array_equal(updates["batch_stats"]["mean"][3], v["batch_stats"]["mean"][3])
  # sensitivity: one pooled BatchNorm over the whole batch is far from the per-domain answer
  pooled = (x - x.mean((0, 1, 2))) / np.sqrt(x.var((0, 1, 2)) + EPS)
  assert np.abs(pooled - (want - v["params"]["bias"][domain][:, None, None]) /
                v["params"]["scale"][domain][:, None, None]).max() > 0.5


def test_one_domain_equals_flax_batchnorm(dsbn_case):
  x, _, _ = dsbn_case
  bn = nn.BatchNorm(use_running_average=False, momentum=MOMENTUM, epsilon=EPS)
  bn_vars = bn.init(jax.random.PRNGKey(0), x)
  want, want_stats = bn.apply(bn_vars, x, mutable=["batch_stats"])
  dsbn = DomainBatchNorm(1)
  got, stats = dsbn.apply(dsbn.init(jax.random.PRNGKey(0), x), x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(stats["batch_stats"]["mean"][0], want_stats["batch_stats"]["mean"], atol=1e-6)
  np.testing.assert_allclose(stats["batch_stats"]["var"][0], want_stats["batch_stats"]["var"], atol=1e-5)


def test_inference_uses_each_domains_running_statistics_and_unseen_takes_the_mean(dsbn_case):
  x, domain, v = dsbn_case
  domain = domain.copy()
  domain[1] = UNSEEN
  y = DomainBatchNorm(4).apply(v, x, train=False, domain=domain)
  p, s = v["params"], v["batch_stats"]
  for b in range(len(x)):
    if domain[b] >= 0:
      scale, bias, mean, var = (p["scale"][domain[b]], p["bias"][domain[b]], s["mean"][domain[b]],
                                s["var"][domain[b]])
    else:
      scale, bias, mean, var = (p["scale"].mean(0), p["bias"].mean(0), s["mean"].mean(0), s["var"].mean(0))
    np.testing.assert_allclose(y[b], (x[b] - mean) / np.sqrt(var + EPS) * scale + bias, rtol=1e-5, atol=1e-5)


def test_select_domain():
  table = np.arange(6.0).reshape(3, 2)
  np.testing.assert_array_equal(select_domain(table, jnp.array([2, 0, -1])), [[4, 5], [0, 1], [2, 3]])


def test_pmapped_statistics_are_those_of_the_global_batch(dsbn_case):
  """2 devices whose shards hold different domain mixes: psum'd sums and counts give exactly the
  one-device statistics (a pmean of per-device means would not)."""
  x, _, v = dsbn_case
  # device 0 holds domains {0, 1}, device 1 {0, 2}: domain 1 is absent on device 1, which must
  # still update its running statistics from the global batch
  domain = np.array([0, 1, 0, 1, 2, 2, 0, 2], np.int32)
  module = DomainBatchNorm(4, axis_name="batch")
  fn = jax.pmap(lambda x, d: module.apply(v, x, train=True, domain=d, mutable=["batch_stats"]),
                axis_name="batch")
  y, updates = fn(x.reshape(2, 4, *x.shape[1:]), domain.reshape(2, 4))
  want, mean, var = numpy_dsbn(x, domain, v["params"]["scale"], v["params"]["bias"],
                               v["batch_stats"]["mean"], v["batch_stats"]["var"])
  np.testing.assert_allclose(np.asarray(y).reshape(x.shape), want, rtol=1e-4, atol=1e-4)
  for device in range(2):
    np.testing.assert_allclose(updates["batch_stats"]["mean"][device], mean, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(updates["batch_stats"]["var"][device], var, rtol=1e-4, atol=1e-3)


def test_dsbn_train_step_pmapped_equals_one_device():
  config = base_config()
  config.model.norm = "dsbn"
  tx = make_optimizer(config.optimizer, num_steps=10)
  rng = np.random.default_rng(0)
  batches = [{"image": rng.normal(size=(4, 16, 16, 1)).astype(np.float32) * np.array([1, 3, 1, 3])[:, None, None, None],
              "label": rng.integers(0, 3, size=(4, 16, 16)).astype(np.int32),
              "domain": np.array([0, 1, 0, 1], np.int32)} for _ in range(2)]
  single_model = UNet(3, base_features=4, depth=2, norm="dsbn", num_domains=2)
  init = create_train_state(0, single_model, tx, input_shape=(1, 16, 16, 1))
  single_step = jax.jit(make_train_step(single_model, tx, config, num_classes=3))
  multi_model = UNet(3, base_features=4, depth=2, norm="dsbn", num_domains=2, bn_axis_name=parallel.AXIS_NAME)
  runner = parallel.DataParallel(make_train_step(multi_model, tx, config, num_classes=3,
                                                 axis_name=parallel.AXIS_NAME, bn_sync=True), num_devices=2)
  single, multi = init, runner.replicate(init)
  key = jax.random.PRNGKey(1)
  for batch in batches:
    single, _ = single_step(single, batch, key)
    multi, _ = runner.step(multi, batch, key)
  host = runner.unreplicate(multi)
  for a, b, c in zip(jax.tree.leaves(single.params), jax.tree.leaves(host.params), jax.tree.leaves(init.params)):
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-4   # the step moved every parameter
  stats = single.batch_stats["down0"]["norm0"]["dsbn"]
  np.testing.assert_allclose(stats["var"], host.batch_stats["down0"]["norm0"]["dsbn"]["var"], rtol=1e-5)
  # the two domains' statistics differ (the inputs of domain 1 are 3x wider)
  assert not np.allclose(stats["var"][0], stats["var"][1], rtol=0.1)


def test_domain_index_policies():
  assert domain_index(("B", "C"), "C") == 1
  assert domain_index(("B", "C"), "A") == UNSEEN
  with pytest.raises(ValueError, match=r"unseen_domain='refuse'.*Fix"):
    domain_index(("B", "C"), "A", policy="refuse")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return make_sites_dataset(tmp_path_factory.mktemp("data") / "toy", sites=("A", "B", "C"), cases=4)


def test_dsbn_run_evaluates_each_site_with_its_own_bn(dataset, tmp_path):
  # A held out, sources given as C, B: their dataset-wide ids are 2, 1, the model's domains 0, 1
  config = tiny_config(dataset, **{"model.norm": "dsbn", "eval.selection": "last", "num_steps": 3,
                                   "data.held_out": ("A",), "data.sites": ("C", "B")})
  train_lib.train_and_evaluate(config, tmp_path / "run")
  assert "| DSBN" in (tmp_path / "run" / "results.md").read_text()
  run_config, normalizer, (trained,) = load_trained_models(tmp_path / "run")
  assert trained.sources == ["C", "B"] and trained.domain_policy == "average"
  predict_fn, domain_of = trained.predictor()
  assert [domain_of(s) for s in ("C", "B", "A")] == [0, 1, UNSEEN]
  # the ids the model was trained with are the ids evaluation applies
  data = prepare_data(run_config.data, run_dir=tmp_path / "run")
  batch = train_lib.make_sampler(run_config, data, trained.sources).batch_at(0)
  np.testing.assert_array_equal(batch["domain"], np.tile([domain_of("C"), domain_of("B")], 2))
  # Site B's prediction with domain 1 equals the prediction with domain 0 after swapping the two
  # domains' rows of every DSBN parameter and statistic: the id selects the row, nothing else.
  volume = np.asarray(nib.load(str(dataset / "C" / "case0_image.nii.gz")).dataobj, np.float32)
  common = dict(normalizer=normalizer, data_config=run_config.data, batch_size=8)
  as_b = predict_volume(predict_fn, trained.variables, volume, (1.5, 1.5, 3.0), domain=1, **common)
  swapped = jax.tree.map(lambda a: np.asarray(a)[::-1] if np.ndim(a) == 2 and np.shape(a)[0] == 2 else a,
                         trained.variables)
  assert not np.array_equal(swapped["params"]["head"]["kernel"], trained.variables["params"]["head"]["kernel"][::-1])
  np.testing.assert_array_equal(predict_volume(predict_fn, swapped, volume, (1.5, 1.5, 3.0), domain=0, **common), as_b)
  as_a = predict_volume(predict_fn, trained.variables, volume, (1.5, 1.5, 3.0), domain=0, **common)
  assert not np.array_equal(as_a, as_b)   # sensitivity: the two sites' BN give other labels


def test_refuse_policy_and_unbalanced_shards_stop_before_the_run_claims_its_workdir(dataset, tmp_path):
  for overrides, message in [({"model.unseen_domain": "refuse"}, "refuse"),
                             # Separate: each site's model is also tested on the other sites
                             ({"model.unseen_domain": "refuse", "method": "separate", "data.held_out": ()}, "refuse"),
                             # per-device BN statistics: 4 devices x 1 slice cannot hold 2 sites
                             ({"bn_sync": False}, "balanced")]:
    config = tiny_config(dataset, **{"model.norm": "dsbn", **overrides})
    with pytest.raises(ValueError, match=message):
      train_lib.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run" / "config.json").exists()


def test_dsbn_is_refused_for_episodic_methods(dataset):
  from medgen_jax import config as config_lib
  with pytest.raises(ValueError, match="model.norm"):
    config_lib.validate(tiny_config(dataset, **{"model.norm": "dsbn", "method": "mldg", "batch_size": 6}))


def test_group_by_domain_round_trip():
  from medgen_jax.models.domains import group_by_domain, ungroup_by_domain
  domain = jnp.array([1, 0, 2, 0, 2, 1])
  x = jnp.arange(6) * 10
  grouped = group_by_domain(x, domain, 3)
  np.testing.assert_array_equal(grouped, [[10, 30], [0, 50], [20, 40]])
  np.testing.assert_array_equal(ungroup_by_domain(grouped, domain), x)
