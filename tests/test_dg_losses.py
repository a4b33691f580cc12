"""MASF/SAML building blocks against brute force and closed forms; BigAug determinism.

The oracles are written from the definitions (methods.md §1.5, §1.6, §3.7, §3.8; tf.contrib's
metric_loss_ops.triplet_semihard_loss) with plain loops, not from the implementations' choices.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from medgen_jax import augment, losses
from medgen_jax.methods import masf, saml


# --- Global class alignment (§1.5) -----------------------------------------------------------


def numpy_alignment(za, ya, zb, yb, tau, variant):
  """(1/C) Σ_c [c in a and b] · ½ (KL(q_a‖q_b) + KL(q_b‖q_a)), float64, from the formulas:
  'talk' with a stable log-softmax, 'masf_code' literally as utils.kd (softmax, clip, log ratio)."""
  c = za.shape[-1]
  eps = 1e-6 if variant == "talk" else 1e-16
  total = 0.0
  for k in range(c):
    if not ((ya == k).any() and (yb == k).any()):
      continue  # absent from a domain: the term is masked out
    log_qs = []
    for z, y in ((za, ya), (zb, yb)):
      rows = np.asarray(z, np.float64).reshape(-1, c)[y.reshape(-1) == k]
      s = rows.sum(0) / (len(rows) + eps) / tau
      log_qs.append(s - s.max() - np.log(np.sum(np.exp(s - s.max()))))
    if variant == "masf_code":
      qa, qb = (np.clip(np.exp(lq), 1e-8, 1.0) for lq in log_qs)
      kl = 0.5 * (np.sum(qa * np.log(qa / qb)) + np.sum(qb * np.log(qb / qa)))
    else:
      la, lb = log_qs
      kl = 0.5 * (np.sum(np.exp(la) * (la - lb)) + np.sum(np.exp(lb) * (lb - la)))
    total += kl
  return total / c


def alignment(za, ya, zb, yb, c, **kwargs):
  return losses.class_alignment_loss(jnp.asarray(za), jax.nn.one_hot(jnp.asarray(ya), c),
                                     jnp.asarray(zb), jax.nn.one_hot(jnp.asarray(yb), c), **kwargs)


@pytest.mark.parametrize("variant", ["talk", "masf_code"])
@pytest.mark.parametrize("scale", [1.0, 200.0])  # 200: q < 1e-8 happens, the 'masf_code' clip acts
def test_global_alignment_matches_brute_force(variant, scale):
  rng = np.random.default_rng(0)
  za = (rng.normal(size=(2, 6, 5, 4)) * scale).astype(np.float32)
  zb = (rng.normal(size=(3, 6, 5, 4)) * 2 * scale).astype(np.float32)
  ya, yb = rng.integers(0, 3, size=(2, 6, 5)), rng.integers(0, 4, size=(3, 6, 5))  # class 3 absent in a
  got = alignment(za, ya, zb, yb, 4, temperature=2.0, variant=variant)
  np.testing.assert_allclose(got, numpy_alignment(za, ya, zb, yb, 2.0, variant), rtol=2e-4)
  assert float(got) > 0


@pytest.mark.parametrize("variant", ["talk", "masf_code"])
def test_global_alignment_absent_class_contributes_exactly_zero(variant):
  rng = np.random.default_rng(3)
  za, zb = rng.normal(size=(2, 5, 5, 4)), rng.normal(size=(2, 5, 5, 4))
  ya, yb = rng.integers(0, 3, size=(2, 5, 5)), rng.integers(0, 4, size=(2, 5, 5))
  yb[0, 0, 0] = 3  # class 3: present in b only
  base = alignment(za, ya, zb, yb, 4, variant=variant)
  # Changing the logits of b's class-3 pixels moves only q_3^(b): the loss must not change.
  zb2 = zb.copy()
  zb2[yb == 3] = rng.normal(size=((yb == 3).sum(), 4)) * 50
  assert float(alignment(za, ya, zb2, yb, 4, variant=variant)) == float(base)
  # The value is the sum over the three shared classes only, divided by all four.
  np.testing.assert_allclose(base, numpy_alignment(za, ya, zb, yb, 2.0, variant), rtol=1e-4)
  # No class shared: exactly 0 (not a pull towards uniform distributions).
  yb_disjoint = np.full_like(yb, 3)
  assert float(alignment(za, ya, zb, yb_disjoint, 4, variant=variant)) == 0.0


@pytest.mark.parametrize("variant", ["talk", "masf_code"])
def test_global_alignment_is_zero_for_identical_domain_statistics(variant):
  rng = np.random.default_rng(1)
  z = rng.normal(size=(2, 8, 8, 4))
  y = rng.integers(0, 3, size=(2, 8, 8))  # class 3 absent from both
  # Domain b: the same pixels in another order -> identical class-wise mean logits.
  perm = rng.permutation(2 * 8 * 8)
  zb = z.reshape(-1, 4)[perm].reshape(2, 8, 8, 4)
  yb = y.reshape(-1)[perm].reshape(2, 8, 8)
  assert abs(float(alignment(z, y, zb, yb, 4, variant=variant))) < 1e-6


@pytest.mark.parametrize("variant", ["talk", "masf_code"])
def test_global_alignment_is_finite_for_huge_logit_gaps(variant):
  """Class-mean logit gaps of 1e4: softmax underflows to 0, log_softmax does not."""
  rng = np.random.default_rng(2)
  ya, yb = rng.integers(0, 3, size=(2, 4, 4)), rng.integers(0, 3, size=(2, 4, 4))
  # Each pixel's logits: 1e4 on a class that differs between the domains.
  za = (1e4 * np.eye(3)[(ya + 1) % 3] + rng.normal(size=(2, 4, 4, 3))).astype(np.float32)
  zb = (1e4 * np.eye(3)[(yb + 2) % 3] + rng.normal(size=(2, 4, 4, 3))).astype(np.float32)
  ohb = jax.nn.one_hot(jnp.asarray(yb), 3)
  f = lambda a, b: losses.class_alignment_loss(a, jax.nn.one_hot(jnp.asarray(ya), 3), b, ohb,
                                               variant=variant)
  value, grads = jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(za), jnp.asarray(zb))
  assert np.isfinite(float(value)) and float(value) > 0
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)
  if variant == "talk":  # ('masf_code': every q is ≈ 1 or clipped, so the gradient is 0, as in TF)
    assert any(np.abs(np.asarray(g)).max() > 0 for g in grads)
  np.testing.assert_allclose(value, numpy_alignment(za, ya, zb, yb, 2.0, variant), rtol=1e-4)


@pytest.mark.parametrize("variant", ["talk", "masf_code"])
def test_global_alignment_gradient_matches_finite_differences(variant):
  rng = np.random.default_rng(4)
  ya, yb = rng.integers(0, 3, size=(1, 3, 3)), rng.integers(0, 4, size=(1, 3, 4))
  with jax.enable_x64(True):
    za = jnp.asarray(rng.normal(size=(1, 3, 3, 4)) * 2, jnp.float64)
    zb = jnp.asarray(rng.normal(size=(1, 3, 4, 4)) * 2, jnp.float64)
    oha = jax.nn.one_hot(jnp.asarray(ya), 4, dtype=jnp.float64)
    ohb = jax.nn.one_hot(jnp.asarray(yb), 4, dtype=jnp.float64)
    f = lambda a, b: losses.class_alignment_loss(a, oha, b, ohb, variant=variant)
    ga, gb = (np.asarray(g) for g in jax.grad(f, argnums=(0, 1))(za, zb))
    h = 1e-6
    for z, g, which in ((za, ga, 0), (zb, gb, 1)):
      steps = h * jnp.eye(z.size, dtype=jnp.float64).reshape(z.size, *z.shape)  # one per coordinate
      g_of = (lambda z_: f(z_, zb)) if which == 0 else (lambda z_: f(za, z_))
      values = jax.jit(jax.vmap(g_of))
      numeric = (np.asarray(values(z + steps)) - np.asarray(values(z - steps))) / (2 * h)
      np.testing.assert_allclose(g.reshape(-1), numeric, rtol=1e-5, atol=1e-9)
    assert np.abs(ga).max() > 1e-3 and np.abs(gb).max() > 1e-3


# --- Semi-hard triplet (§1.6) and contrastive losses ------------------------------------------


def tf_semi_hard_oracle(emb, labels, margin, valid, squared):
  """tf.contrib metric_loss_ops.triplet_semihard_loss on the valid rows, with plain loops.

  pairwise_distance(squared=True): ‖x_i − x_j‖² (sqrt for squared=False), diagonal 0.
  For every positive pair (a, p), a ≠ p: if some negative has d(a, n) > d(a, p), the smallest such
  d(a, n) (masked_minimum); else masked_maximum over the negatives, literally:
  max_n (d(a, n) − min_k d(a, k)) · [n negative] + min_k d(a, k).
  loss = Σ max(margin + d(a, p) − that, 0) / number of positive pairs (TF: 0/0 = NaN when there
  are none; here 0 by the implementation's documented choice).
  """
  x = [np.asarray(emb[i], np.float64) for i in range(len(emb)) if valid[i]]
  y = [labels[i] for i in range(len(emb)) if valid[i]]
  m = len(x)
  d = np.zeros((m, m))
  for i in range(m):
    for j in range(m):
      if i != j:
        sq = sum((x[i][f] - x[j][f]) ** 2 for f in range(len(x[i])))
        d[i, j] = sq if squared else math.sqrt(sq)
  total, num_positives = 0.0, 0
  for a in range(m):
    for p in range(m):
      if a == p or y[a] != y[p]:
        continue
      num_positives += 1
      negatives = [n for n in range(m) if y[n] != y[a]]
      outside = [d[a, n] for n in negatives if d[a, n] > d[a, p]]
      if outside:
        chosen = min(outside)
      else:
        row_min = min(d[a, k] for k in range(m))
        chosen = max((d[a, k] - row_min) * (k in negatives) for k in range(m)) + row_min
      total += max(margin + d[a, p] - chosen, 0.0)
  return total / num_positives if num_positives else 0.0


def _triplet_configs():
  """(name, embeddings, labels, valid) covering the special cases."""
  configs = []
  for seed in range(3):
    rng = np.random.default_rng(seed)
    configs.append((f"random{seed}", rng.normal(size=(12, 3)) * 2, rng.integers(0, 3, size=12),
                    rng.random(12) > 0.2))
  rng = np.random.default_rng(10)
  # Integer lattice points: many exact distance ties (exact in float32 too).
  configs.append(("ties", rng.integers(-2, 3, size=(12, 2)).astype(float), rng.integers(0, 3, size=12),
                  np.ones(12, bool)))
  # Label 3 occurs once: an anchor without a positive (it is still a negative for the others).
  configs.append(("lonely_anchor", rng.normal(size=(9, 2)), np.array([0, 0, 1, 1, 1, 3, 0, 1, 0]),
                  np.ones(9, bool)))
  # Every valid row has label 2 (the padding rows carry other labels): no anchor has a negative.
  configs.append(("no_negatives", rng.normal(size=(7, 3)), np.array([2, 2, 0, 2, 1, 2, 2]),
                  np.array([True, True, False, True, False, True, True])))
  # Padding rows placed to be the semi-hard negatives, and the only positives, if they counted.
  emb = rng.normal(size=(10, 2))
  emb[7:] = emb[:3] + 0.01
  configs.append(("padding", emb, np.array([0, 1, 2, 0, 1, 2, 0, 1, 1, 2]),
                  np.array([True] * 7 + [False] * 3)))
  configs.append(("no_positives", rng.normal(size=(5, 2)), np.arange(5), np.ones(5, bool)))
  return configs


@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("name,emb,labels,valid", [pytest.param(*c, id=c[0]) for c in _triplet_configs()])
def test_semi_hard_triplet_matches_tf_definition(name, emb, labels, valid, squared):
  margin = 1.5
  got = losses.semi_hard_triplet_loss(jnp.asarray(emb, jnp.float32), jnp.asarray(labels), margin=margin,
                                      valid=jnp.asarray(valid), squared=squared)
  expected = tf_semi_hard_oracle(emb, labels, margin, valid, squared)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  if name == "no_negatives":  # TF: every pair costs margin + d(a, p) (negatives_inside = 0)
    assert expected > margin
  if name == "no_positives":
    assert float(got) == 0.0


def test_semi_hard_triplet_defaults_to_squared_distances():
  rng = np.random.default_rng(5)
  emb, labels = rng.normal(size=(10, 3)) * 2, rng.integers(0, 2, size=10)
  default = losses.semi_hard_triplet_loss(jnp.asarray(emb), jnp.asarray(labels), margin=1.0)
  np.testing.assert_allclose(default, tf_semi_hard_oracle(emb, labels, 1.0, np.ones(10, bool), True),
                             rtol=1e-5)
  euclidean = tf_semi_hard_oracle(emb, labels, 1.0, np.ones(10, bool), False)
  assert abs(float(default) - euclidean) > 0.1


def _min_gap(emb, labels, margin, squared):
  """Smallest distance to a kink: a tie between two distances from one anchor, or a hinge at 0."""
  d = ((emb[:, None] - emb[None]) ** 2).sum(-1)
  d = d if squared else np.sqrt(d)
  n = len(emb)
  gaps = [abs(d[a, i] - d[a, j]) for a in range(n) for i in range(n) for j in range(n)
          if len({a, i, j}) == 3]
  gaps += [abs(margin + d[a, p] - d[a, k]) for a in range(n) for p in range(n) for k in range(n)
           if a != p and labels[a] == labels[p] and labels[k] != labels[a]]
  return min(gaps)


@pytest.mark.parametrize("squared", [True, False])
def test_semi_hard_triplet_gradient_matches_finite_differences(squared):
  rng = np.random.default_rng(6)
  labels = jnp.asarray([0, 0, 0, 1, 1, 2, 2, 2])
  with jax.enable_x64(True):
    emb = rng.normal(size=(8, 3))
    margin = 1.0
    assert _min_gap(emb, np.asarray(labels), margin, squared) > 1e-3  # away from ties and kinks
    f = lambda e: losses.semi_hard_triplet_loss(e, labels, margin=margin, squared=squared)
    e64 = jnp.asarray(emb, jnp.float64)
    grad = np.asarray(jax.grad(f)(e64))
    h = 1e-6
    steps = h * jnp.eye(emb.size, dtype=jnp.float64).reshape(emb.size, *emb.shape)
    values = jax.jit(jax.vmap(f))
    numeric = (np.asarray(values(e64 + steps)) - np.asarray(values(e64 - steps))) / (2 * h)
    np.testing.assert_allclose(grad.reshape(-1), numeric, rtol=1e-6, atol=1e-9)
    assert float(f(e64)) > 0 and np.abs(grad).max() > 1e-2
  # Duplicate points: d = 0 keeps a finite gradient (zero-safe square root).
  dup = jnp.asarray(np.vstack([emb[:2], emb[:1]]), jnp.float32)
  g = jax.grad(lambda e: losses.semi_hard_triplet_loss(e, jnp.array([0, 1, 0]), margin=1.5,
                                                       squared=squared))(dup)
  assert np.isfinite(np.asarray(g)).all()


def contrastive_oracle(emb, labels, margin, valid):
  """Hadsell et al.: over valid pairs n < m, d² if same label else max(0, ξ − d)², d Euclidean."""
  terms = []
  for i in range(len(emb)):
    for j in range(i + 1, len(emb)):
      if not (valid[i] and valid[j]):
        continue
      d = math.sqrt(sum((emb[i][f] - emb[j][f]) ** 2 for f in range(len(emb[i]))))
      terms.append(d * d if labels[i] == labels[j] else max(0.0, margin - d) ** 2)
  return sum(terms) / len(terms) if terms else 0.0


@pytest.mark.parametrize("seed", range(3))
def test_contrastive_loss_matches_a_loop_over_pairs(seed):
  rng = np.random.default_rng(seed)
  emb, labels, valid = rng.normal(size=(10, 3)), rng.integers(0, 3, size=10), rng.random(10) > 0.2
  emb[1] = emb[0]  # a zero distance
  got = losses.contrastive_loss(jnp.asarray(emb, jnp.float32), jnp.asarray(labels), margin=2.0,
                                valid=jnp.asarray(valid))
  np.testing.assert_allclose(got, contrastive_oracle(emb, labels, 2.0, valid), rtol=1e-5)


def test_contrastive_loss_closed_form():
  emb = jnp.array([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]])
  labels = jnp.array([0, 0, 1])
  # pairs: (0,1) same, d=5 -> 25; (0,2) diff, d=1 -> (2-1)^2 = 1; (1,2) diff, d=sqrt(18) > 2 -> 0
  np.testing.assert_allclose(losses.contrastive_loss(emb, labels, margin=2.0), (25 + 1 + 0) / 3, rtol=1e-6)
  valid = jnp.array([True, True, False])
  np.testing.assert_allclose(losses.contrastive_loss(emb, labels, margin=2.0, valid=valid), 25.0, rtol=1e-6)


# --- MASF: class-wise features and the domain slicing of the global alignment (§3.7) ---------


def test_class_mean_features_match_a_loop():
  rng = np.random.default_rng(7)
  b, h, w, c, f = 3, 4, 5, 4, 2
  feats = rng.normal(size=(b, h, w, f)).astype(np.float32)
  labels = rng.integers(0, 3, size=(b, h, w))
  labels[1] = 0  # image 1: background only
  labels[2, 0, 0] = 3  # class 3: one pixel of image 2
  vectors, ids, valid = masf.class_mean_features(jnp.asarray(feats), jax.nn.one_hot(labels, c))
  assert vectors.shape == (b * c, f)
  for i in range(b):
    for k in range(c):
      row = i * c + k
      pixels = [feats[i, y, x] for y in range(h) for x in range(w) if labels[i, y, x] == k]
      assert int(ids[row]) == k
      assert bool(valid[row]) == (len(pixels) > 0)
      if pixels:
        np.testing.assert_allclose(vectors[row], np.mean(pixels, axis=0), rtol=1e-5, atol=1e-6)
      else:
        np.testing.assert_allclose(vectors[row], 0.0)


@pytest.mark.parametrize("variant", ["talk", "masf_code"])
def test_masf_global_alignment_pairs_the_interleaved_domains(variant):
  rng = np.random.default_rng(8)
  n_tr, n_te, per_domain, c = 3, 2, 2, 3  # n_tr ≠ n_te: each group's own stride is checked
  # Rows interleave domains (A, B, C, A, B, C); each domain has its own logit offset and classes.
  z_tr = rng.normal(size=(n_tr * per_domain, 3, 3, c))
  z_te = rng.normal(size=(n_te * per_domain, 3, 3, c))
  z_tr[0::3] += [3.0, 0.0, 0.0]
  z_tr[2::3] += [0.0, -2.0, 0.0]
  z_te[1::2] += [0.0, 0.0, 4.0]
  y_tr = rng.integers(0, c, size=z_tr.shape[:3])
  y_te = rng.integers(0, c, size=z_te.shape[:3])
  y_tr[1::3] = np.minimum(y_tr[1::3], 1)  # meta-train domain B lacks class 2
  oh = lambda y: jax.nn.one_hot(jnp.asarray(y), c)
  got = masf.global_alignment(jnp.asarray(z_tr), oh(y_tr), jnp.asarray(z_te), oh(y_te), n_tr=n_tr,
                              n_te=n_te, temperature=3.0, variant=variant)

  def domain(x, i, n):
    return np.stack([x[r] for r in range(len(x)) if r % n == i])

  pairs = [float(losses.class_alignment_loss(
      jnp.asarray(domain(z_tr, i, n_tr)), oh(domain(y_tr, i, n_tr)), jnp.asarray(domain(z_te, j, n_te)),
      oh(domain(y_te, j, n_te)), temperature=3.0, variant=variant))
      for i in range(n_tr) for j in range(n_te)]
  np.testing.assert_allclose(got, np.mean(pairs), rtol=1e-5)
  assert np.ptp(pairs) > 1e-3  # the pairs differ, so a wrong slicing shows


# --- SAML: region embeddings and compactness (§3.8) -------------------------------------------


def test_saml_region_embeddings_match_scipy_and_loops():
  rng = np.random.default_rng(9)
  labels = np.zeros((3, 16, 16), np.int32)
  labels[0, 4:10, 3:12] = 1
  labels[0, 6, 12] = 1  # a one-pixel bump
  labels[1, 0:4, 0:5] = 2  # touches the border; any class > 0 is foreground
  labels[1, 9:13, 9:14] = 1
  # image 2: no foreground -> empty contour and ring
  feats = rng.normal(size=(3, 16, 16, 4)).astype(np.float32)
  vectors, region, valid = saml.region_embeddings(jnp.asarray(feats), jnp.asarray(labels))
  cross = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)
  b = labels.shape[0]
  np.testing.assert_array_equal(region, [1] * b + [0] * b)  # contours first, then rings
  for i in range(b):
    fg = labels[i] > 0
    contour = fg & ~ndimage.binary_erosion(fg, structure=cross, border_value=0)
    ring = ndimage.binary_dilation(fg, structure=cross, iterations=5, border_value=0) & ~fg
    for row, mask in ((i, contour), (b + i, ring)):
      pixels = [feats[i, y, x] for y in range(16) for x in range(16) if mask[y, x]]
      assert bool(valid[row]) == (len(pixels) > 0)
      expected = np.mean(pixels, axis=0) if pixels else np.zeros(4)
      np.testing.assert_allclose(vectors[row], expected, rtol=1e-5, atol=1e-6)
  assert not bool(valid[2]) and not bool(valid[b + 2]) and bool(valid[0]) and bool(valid[b])


def compactness_oracle(u, scale):
  """§3.8 with its index offsets: P = s Σ_{i<H−1, j<W−1} sqrt((u[i+1,j+1] − u[i,j+1])²
  + (u[i+1,j+1] − u[i+1,j])² + 1e-8), A = Σ u, per image P²/(4πA)."""
  values = []
  for img in u:
    h, w = img.shape
    p = scale * sum(math.sqrt((img[i + 1, j + 1] - img[i, j + 1]) ** 2
                              + (img[i + 1, j + 1] - img[i + 1, j]) ** 2 + 1e-8)
                    for i in range(h - 1) for j in range(w - 1))
    values.append(p * p / (4 * math.pi * img.sum()))
  return values


def test_saml_compactness_released_scale_and_batch_sum():
  u0 = np.zeros((3, 4))
  u0[1, 1] = 1.0
  # By hand: of the 2 x 3 terms, (0,0) has dx = dy = 1; (0,1) dy = −1; (1,0) dx = −1; three are 0.
  p0 = 0.01 * (math.sqrt(2 + 1e-8) + 2 * math.sqrt(1 + 1e-8) + 3 * math.sqrt(1e-8))
  u1 = np.array([[0.1, 0.9, 0.3, 0.0], [0.6, 0.2, 0.8, 0.5], [0.0, 0.4, 0.7, 0.95]])
  u = np.stack([u0, u1])
  perimeter, area = saml.perimeter_and_area(jnp.asarray(u, jnp.float32), perimeter_scale=0.01)
  np.testing.assert_allclose(perimeter[0], p0, rtol=1e-6)
  np.testing.assert_allclose(area, [1.0, u1.sum()], rtol=1e-6)
  expected = compactness_oracle(u, 0.01)
  np.testing.assert_allclose(expected[0], p0 ** 2 / (4 * math.pi), rtol=1e-12)
  total = saml.compactness_loss(jnp.asarray(u, jnp.float32), perimeter_scale=0.01, reduction="sum")
  np.testing.assert_allclose(total, sum(expected), rtol=1e-5)
  mean = saml.compactness_loss(jnp.asarray(u, jnp.float32), perimeter_scale=0.01, reduction="mean")
  np.testing.assert_allclose(mean, sum(expected) / 2, rtol=1e-5)


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
