"""Losses against numpy, and the Dice gradient against finite differences."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medgen_jax import losses


@pytest.fixture
def example():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 4, 4)).astype(np.float32)
  labels = rng.integers(0, 4, size=(3, 5, 4))
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  onehot = np.eye(4)[labels]
  return logits, labels, probs, onehot


def numpy_dice_loss(p, g, squared, include_background):
  inter = (p * g).sum(axis=(0, 1, 2))
  pred = (p * p if squared else p).sum(axis=(0, 1, 2))
  dice = 2 * inter / (pred + g.sum(axis=(0, 1, 2)) + 1e-7)
  return 1 - (dice if include_background else dice[1:]).mean()


@pytest.mark.parametrize("variant", ["squared", "linear"])
@pytest.mark.parametrize("include_background", [True, False])
def test_soft_dice_matches_numpy(example, variant, include_background):
  _, _, probs, onehot = example
  loss, _ = losses.soft_dice_loss(jnp.asarray(probs), jnp.asarray(onehot), variant=variant,
                                  include_background=include_background)
  expected = numpy_dice_loss(probs, onehot, variant == "squared", include_background)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_perfect_prediction_has_zero_dice_loss(example):
  _, _, _, onehot = example
  loss, dice = losses.soft_dice_loss(jnp.asarray(onehot), jnp.asarray(onehot), variant="squared")
  np.testing.assert_allclose(dice, 1.0, atol=1e-6)
  assert abs(float(loss)) < 1e-6


def loop_weighted_cross_entropy(probs, labels, num_classes, class_weights="batch", clip=0.005):
  """methods.md §1.2 pixel by pixel: w_c = 1 − (pixels of class c) / (all pixels),
  CE = (1/N) Σ_pixels −w_y log(max(p_y, clip)) for the pixel's label y (g is one-hot)."""
  flat_labels = [int(v) for v in np.asarray(labels).reshape(-1)]
  flat_probs = np.asarray(probs, np.float64).reshape(len(flat_labels), num_classes)
  if class_weights == "batch":
    weights = [1.0 - flat_labels.count(c) / len(flat_labels) for c in range(num_classes)]
  elif class_weights == "none":
    weights = [1.0] * num_classes
  else:
    weights = list(class_weights)
  total = 0.0
  for pixel, y in enumerate(flat_labels):
    total += -weights[y] * math.log(min(max(flat_probs[pixel, y], clip), 1.0))
  return total / len(flat_labels)


def test_weighted_cross_entropy_hand_computed():
  # 4 pixels, labels 0, 0, 0, 1: w_0 = 1 − 3/4, w_1 = 1 − 1/4. Pixel 1's p_0 = 0.001 is clipped.
  probs = np.array([[0.5, 0.5], [0.001, 0.999], [1.0, 0.0], [0.8, 0.2]], np.float32).reshape(1, 2, 2, 2)
  onehot = np.eye(2)[np.array([0, 0, 0, 1])].reshape(1, 2, 2, 2)
  expected = (0.25 * -math.log(0.5) + 0.25 * -math.log(0.005) + 0.0 + 0.75 * -math.log(0.2)) / 4
  got = losses.weighted_cross_entropy(jnp.asarray(probs), jnp.asarray(onehot, jnp.float32), clip=0.005)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert -math.log(0.005) == pytest.approx(5.298, abs=1e-3)  # the per-pixel bound


@pytest.mark.parametrize("class_weights", ["batch", "none", [0.1, 2.0, 0.0, 1.0]])
def test_weighted_cross_entropy_matches_a_pixel_loop(example, class_weights):
  _, labels, probs, onehot = example
  probs = probs.copy()
  probs[0, 0, 0] = [0.001, 0.001, 0.001, 0.997]  # below the 0.005 clip
  probs[1, 2, 3] = [0.002, 0.004, 0.990, 0.004]
  labels = labels.copy()
  labels[0, 0, 0], labels[1, 2, 3] = 1, 0  # ... and those are the labelled classes
  onehot = np.eye(4)[labels]
  got = losses.weighted_cross_entropy(jnp.asarray(probs), jnp.asarray(onehot, jnp.float32),
                                      class_weights=class_weights, clip=0.005)
  np.testing.assert_allclose(got, loop_weighted_cross_entropy(probs, labels, 4, class_weights), rtol=1e-5)


def test_segmentation_loss_is_the_weighted_sum(example):
  logits, labels, probs, onehot = example
  loss, parts = losses.segmentation_loss(jnp.asarray(logits), jnp.asarray(labels), num_classes=4,
                                         ce_weight=0.3, dice_weight=2.0, dice_variant="linear")
  w = 1 - onehot.sum(axis=(0, 1, 2)) / onehot[..., 0].size
  ce = np.mean(-(w * onehot * np.log(np.clip(probs, 0.005, 1))).sum(-1))
  dice = numpy_dice_loss(probs, onehot, False, True)
  np.testing.assert_allclose(loss, 0.3 * ce + 2.0 * dice, rtol=1e-5)
  np.testing.assert_allclose(parts["loss_ce"], ce, rtol=1e-5)


def test_l2_kernel_loss_counts_only_kernels():
  params = {"conv": {"kernel": jnp.full((2, 3), 2.0), "bias": jnp.full((3,), 100.0)},
            "norm": {"scale": jnp.ones(3)}, "head": {"kernel": jnp.array([1.0, -1.0])}}
  expected = 1e-4 * (6 * 4.0 + 2.0) / 2
  np.testing.assert_allclose(losses.l2_kernel_loss(params, coefficient=1e-4), expected, rtol=1e-6)


@pytest.mark.parametrize("variant", ["squared", "linear"])
def test_dice_gradient_matches_finite_differences(example, variant):
  logits, labels, _, _ = example
  with jax.enable_x64(True):
    logits64 = jnp.asarray(logits, jnp.float64)
    onehot = jax.nn.one_hot(jnp.asarray(labels), 4, dtype=jnp.float64)

    def f(z):
      return losses.soft_dice_loss(jax.nn.softmax(z, -1), onehot, variant=variant)[0]

    grad = np.asarray(jax.grad(f)(logits64))
    rng = np.random.default_rng(1)
    for _ in range(6):
      idx = tuple(rng.integers(0, s) for s in logits.shape)
      e = np.zeros(logits.shape)
      e[idx] = 1e-6
      numeric = (f(logits64 + e) - f(logits64 - e)) / 2e-6
      np.testing.assert_allclose(grad[idx], numeric, rtol=1e-5, atol=1e-10)


def test_global_sum_makes_sharded_dice_equal_to_global(example):
  """pmap over 2 devices: the device means of loss and gradient equal the one-device values."""
  logits, labels, _, _ = example
  logits = np.concatenate([logits, logits[::-1] * 0.5])[:4]  # 4 = 2 devices x 2
  labels = np.concatenate([labels, labels[::-1]])[:4]

  def loss(z, y, axis_name=None):
    return losses.segmentation_loss(z, y, num_classes=4, axis_name=axis_name)[0]

  value, grad = jax.value_and_grad(loss)(jnp.asarray(logits), jnp.asarray(labels))
  sharded = jax.pmap(lambda z, y: jax.value_and_grad(lambda q: loss(q, y, "b"))(z), axis_name="b",
                     devices=jax.local_devices()[:2])
  v2, g2 = sharded(logits.reshape(2, 2, *logits.shape[1:]), labels.reshape(2, 2, *labels.shape[1:]))
  np.testing.assert_allclose(np.mean(v2), value, rtol=1e-6)  # the step reports the device mean
  # Each device's gradient w.r.t. its own logits is N = 2 times the global one, so the mean over
  # devices of parameter gradients (what the train step takes) is the global gradient.
  np.testing.assert_allclose(np.asarray(g2).reshape(grad.shape) / 2, grad, rtol=1e-4, atol=1e-7)
