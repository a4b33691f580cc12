"""MASF/SAML building blocks against brute force and closed forms; BigAug determinism."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medgen_jax import augment, losses
from medgen_jax.methods import saml


def numpy_alignment(za, ya, zb, yb, tau, variant):
  c = za.shape[-1]
  eps = 1e-6 if variant == "talk" else 1e-16
  total = 0.0
  for k in range(c):
    qs = []
    for z, y in ((za, ya), (zb, yb)):
      sel = z.reshape(-1, c)[y.reshape(-1) == k]
      mean = sel.sum(0) / (len(sel) + eps)
      e = np.exp(mean / tau - (mean / tau).max())
      qs.append(e / e.sum())
    qa, qb = qs
    if variant == "masf_code":
      qa, qb = np.clip(qa, 1e-8, 1), np.clip(qb, 1e-8, 1)
    kl = 0.5 * (np.sum(qa * np.log(qa / qb)) + np.sum(qb * np.log(qb / qa)))
    present = (ya == k).any() and (yb == k).any()
    total += kl if variant == "talk" or present else 0.0
  return total / c


@pytest.mark.parametrize("variant", ["talk", "masf_code"])
def test_global_alignment_matches_brute_force(variant):
  rng = np.random.default_rng(0)
  za, zb = rng.normal(size=(2, 6, 5, 4)), rng.normal(size=(3, 6, 5, 4)) * 2
  ya, yb = rng.integers(0, 3, size=(2, 6, 5)), rng.integers(0, 4, size=(3, 6, 5))  # class 3 absent in a
  got = losses.class_alignment_loss(jnp.asarray(za), jax.nn.one_hot(ya, 4), jnp.asarray(zb),
                                    jax.nn.one_hot(yb, 4), temperature=2.0, variant=variant)
  np.testing.assert_allclose(got, numpy_alignment(za, ya, zb, yb, 2.0, variant), rtol=1e-4)


def test_global_alignment_is_zero_for_identical_domain_statistics():
  rng = np.random.default_rng(1)
  z = rng.normal(size=(2, 8, 8, 3))
  y = rng.integers(0, 3, size=(2, 8, 8))
  # Domain b: the same pixels in another order -> identical class-wise mean logits.
  perm = rng.permutation(2 * 8 * 8)
  zb = z.reshape(-1, 3)[perm].reshape(2, 8, 8, 3)
  yb = y.reshape(-1)[perm].reshape(2, 8, 8)
  got = losses.class_alignment_loss(jnp.asarray(z), jax.nn.one_hot(y, 3), jnp.asarray(zb),
                                    jax.nn.one_hot(yb, 3))
  assert abs(float(got)) < 1e-6


def brute_semi_hard(emb, labels, margin, valid):
  n = len(emb)
  d = np.sqrt(((emb[:, None] - emb[None]) ** 2).sum(-1))
  losses_ = []
  for a, p in itertools.permutations(range(n), 2):
    if not (valid[a] and valid[p]) or labels[a] != labels[p]:
      continue
    negatives = [k for k in range(n) if valid[k] and labels[k] != labels[a]]
    if not negatives:
      continue
    harder = [d[a, k] for k in negatives if d[a, k] > d[a, p]]
    d_an = min(harder) if harder else max(d[a, k] for k in negatives)
    losses_.append(max(d[a, p] - d_an + margin, 0.0))
  return np.mean(losses_) if losses_ else 0.0


@pytest.mark.parametrize("seed", range(3))
def test_semi_hard_triplet_matches_a_loop_over_all_triplets(seed):
  rng = np.random.default_rng(seed)
  emb = rng.normal(size=(12, 3)) * 2
  labels = rng.integers(0, 3, size=12)
  valid = rng.random(12) > 0.2
  got = losses.semi_hard_triplet_loss(jnp.asarray(emb), jnp.asarray(labels), margin=1.5,
                                      valid=jnp.asarray(valid))
  np.testing.assert_allclose(got, brute_semi_hard(emb, labels, 1.5, valid), rtol=1e-5)
  grads = jax.grad(lambda e: losses.semi_hard_triplet_loss(e, jnp.array([0, 1, 0]), margin=1.5))(
      jnp.asarray(np.vstack([emb[:2], emb[:1]])))  # duplicate points: zero distance stays finite
  assert np.isfinite(np.asarray(grads)).all()


def test_contrastive_loss_closed_form():
  emb = jnp.array([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]])
  labels = jnp.array([0, 0, 1])
  # pairs: (0,1) same, d=5 -> 25; (0,2) diff, d=1 -> (2-1)^2 = 1; (1,2) diff, d=sqrt(18) > 2 -> 0
  np.testing.assert_allclose(losses.contrastive_loss(emb, labels, margin=2.0), (25 + 1 + 0) / 3, rtol=1e-6)
  valid = jnp.array([True, True, False])
  np.testing.assert_allclose(losses.contrastive_loss(emb, labels, margin=2.0, valid=valid), 25.0, rtol=1e-6)


def test_compactness_of_disk_and_square():
  """Shapes rasterized as soft probability maps (sigmoid of the signed distance, 1-pixel edge),
  which is what the loss sees. (A hard 0/1 staircase inflates SAML's forward-difference
  perimeter: a binary disk scores 1.37.)"""
  size = 160
  yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
  soft = lambda signed_distance: 1.0 / (1.0 + np.exp(-signed_distance))
  disk = soft(50 - np.sqrt(yy ** 2 + xx ** 2)).astype(np.float32)
  square = soft(np.minimum(40 - np.abs(yy), 40 - np.abs(xx))).astype(np.float32)
  c = saml.compactness(jnp.asarray(np.stack([disk, square])))
  assert float(c[0]) == pytest.approx(1.0, rel=0.05)
  assert float(c[1]) == pytest.approx(4 / np.pi, rel=0.05)


def test_contour_and_ring_masks_match_scipy():
  from scipy import ndimage
  labels = np.zeros((2, 20, 20), np.int32)
  labels[0, 5:12, 4:15] = 1
  labels[1, 8:14, 8:13] = 2
  labels[1, 0:3, 0:4] = 1  # touches the border
  contour, ring = saml.contour_and_ring(jnp.asarray(labels))
  cross = ndimage.generate_binary_structure(2, 1)
  for b in range(2):
    fg = labels[b] > 0
    eroded = ndimage.binary_erosion(fg, cross, border_value=0)
    dilated = ndimage.binary_dilation(fg, cross, iterations=5)
    np.testing.assert_array_equal(np.asarray(contour[b]), fg & ~eroded)
    np.testing.assert_array_equal(np.asarray(ring[b]), dilated & ~fg)


def test_bigaug_is_deterministic_per_key_and_changes_with_it():
  config = augment.default_augment_config()
  config.enabled = True
  for name in augment.TRANSFORMS:
    config.probability[name] = 1.0
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(3, 24, 24, 2)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 3, size=(3, 24, 24)), jnp.int32),
           "domain": jnp.arange(3)}
  a = augment.augment_batch(jax.random.PRNGKey(1), batch, config)
  b = augment.augment_batch(jax.random.PRNGKey(1), batch, config)
  c = augment.augment_batch(jax.random.PRNGKey(2), batch, config)
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["label"], b["label"])
  assert not np.allclose(a["image"], c["image"])
  assert set(np.unique(np.asarray(a["label"]))) <= {0, 1, 2}  # labels stay labels (nearest)
  np.testing.assert_array_equal(a["domain"], batch["domain"])


def test_bigaug_with_every_transform_off_is_the_identity():
  config = augment.default_augment_config()
  for name in augment.TRANSFORMS:
    config.probability[name] = 0.0
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.normal(size=(2, 16, 16, 1)), jnp.float32)
  label = jnp.asarray(rng.integers(0, 3, size=(2, 16, 16)), jnp.int32)
  out = augment.augment_batch(jax.random.PRNGKey(0), {"image": image, "label": label}, config)
  np.testing.assert_allclose(out["image"], image, atol=1e-5)
  np.testing.assert_array_equal(out["label"], label)


def test_bigaug_rotation_moves_a_label_blob():
  config = augment.default_augment_config()
  for name in augment.TRANSFORMS:
    config.probability[name] = 1.0 if name == "rotation" else 0.0
  config.rotation_deg = (90.0, 90.0)
  label = np.zeros((1, 21, 21), np.int32)
  label[0, 2:6, 9:12] = 1  # a blob near the top edge
  image = label[..., None].astype(np.float32)
  out = augment.augment_batch(jax.random.PRNGKey(0), {"image": jnp.asarray(image), "label": jnp.asarray(label)}, config)
  # +90° turns the array clockwise (np.rot90 with k=-1): an exact pixel permutation.
  np.testing.assert_array_equal(np.asarray(out["label"][0]), np.rot90(label[0], k=-1))
