"""Adversarial building blocks (losses/adversarial.py, models/gan.py) against hand computations,
closed forms and float64 central differences; the losses package keeps the single module's names.

Hand values are worked out in the comments next to them, from the formulas in methods.md §1.3,
§1.4, §3.5 and the papers cited in the modules, not from the implementations.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from medgen_jax import losses
from medgen_jax.losses import adversarial, distillation, metric_learning, segmentation
from medgen_jax.models import FeatureDiscriminator, OutputDiscriminator, PatchGAN, ResNetGenerator

KEY = jax.random.PRNGKey(0)


def n_params(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# --- The losses package keeps the former module's interface -----------------------------------

# Every function of the former medgen_jax/losses.py (git show 264006c:medgen_jax/losses.py).
FORMER_NAMES = {
    segmentation: ["global_sum", "soft_dice_loss", "class_balance_weights", "weighted_cross_entropy",
                   "segmentation_loss", "l2_kernel_loss"],
    distillation: ["classwise_mean_logits", "class_alignment_loss"],
    metric_learning: ["pairwise_distances", "semi_hard_triplet_loss", "contrastive_loss"],
}


def test_package_reexports_every_former_name():
  for module, names in FORMER_NAMES.items():
    for name in names:
      assert getattr(losses, name) is getattr(module, name), name
  assert losses.jnp is jnp and losses.jax is jax
  for name in adversarial.__dict__:
    if name in losses.__all__:
      assert getattr(losses, name) is getattr(adversarial, name)


# --- Gradient reversal and DANN's schedule ------------------------------------------------------


def test_gradient_reversal_is_identity_forward_and_minus_scale_backward():
  x = jnp.asarray([-1.5, 0.0, 0.3, 2.0])
  np.testing.assert_array_equal(losses.gradient_reversal(x, 0.7), x)
  # d/dx Σ sin(R(x)) = −λ cos(x), written by hand.
  grad = jax.grad(lambda v: jnp.sum(jnp.sin(losses.gradient_reversal(v, 0.7))))(x)
  np.testing.assert_allclose(grad, -0.7 * np.cos(np.asarray(x)), rtol=1e-6)
  # λ = 0 blocks the gradient; λ = 1 (default) only flips it.
  assert not np.any(jax.grad(lambda v: jnp.sum(losses.gradient_reversal(v, 0.0) ** 2))(x))
  np.testing.assert_allclose(jax.grad(lambda v: jnp.sum(losses.gradient_reversal(v) ** 2))(x),
                             -2 * np.asarray(x), rtol=1e-6)


def test_gradient_reversal_under_jit_with_a_traced_scale():
  x = jnp.asarray([0.5, -2.0, 1.0])

  def loss(v, scale):
    return jnp.sum(v * losses.gradient_reversal(v, scale))  # ∂/∂v = v + (−λ) v = (1 − λ) v

  grad_v, grad_scale = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, jnp.float32(0.25))
  np.testing.assert_allclose(grad_v, 0.75 * np.asarray(x), rtol=1e-6)
  assert float(grad_scale) == 0.0  # the forward value does not depend on λ

  @jax.jit
  def scheduled(v, step):  # λ from DANN's schedule, a traced function of the step
    return jax.grad(lambda u: jnp.sum(losses.gradient_reversal(u, losses.dann_lambda(step / 100.0))))(v)

  expected = -(2 / (1 + math.exp(-10 * 0.3)) - 1)
  np.testing.assert_allclose(scheduled(x, 30), np.full(3, expected), rtol=1e-6)


def test_gradient_reversal_on_a_pytree_keeps_dtypes():
  tree = {"a": jnp.ones(2, jnp.bfloat16), "b": jnp.arange(3.0)}
  grads = jax.grad(lambda t: jnp.sum(losses.gradient_reversal(t, 2.0)["a"].astype(jnp.float32))
                   + jnp.sum(losses.gradient_reversal(t, 2.0)["b"]))(tree)
  assert grads["a"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(grads["a"], np.float32), [-2.0, -2.0])
  np.testing.assert_array_equal(grads["b"], [-2.0, -2.0, -2.0])


def test_dann_lambda_endpoints_and_closed_form():
  assert float(losses.dann_lambda(0.0)) == 0.0
  for p in (0.01, 0.1, 0.3, 0.5, 1.0):
    np.testing.assert_allclose(losses.dann_lambda(p), 2 / (1 + math.exp(-10 * p)) - 1, rtol=1e-6)
  np.testing.assert_allclose(losses.dann_lambda(1.0), 0.9999092, rtol=1e-6)  # 2/(1+e^−10) − 1
  np.testing.assert_allclose(losses.dann_lambda(0.5, gamma=2.0), 2 / (1 + math.exp(-1)) - 1, rtol=1e-6)
  values = np.asarray(losses.dann_lambda(jnp.linspace(0, 1, 11)))
  assert np.all(np.diff(values) > 0) and values[-1] < 1


# --- LSGAN, GAN, WGAN, cycle losses: hand values ------------------------------------------------


def test_lsgan_losses_by_hand():
  d_real, d_fake = jnp.asarray([0.2, 0.9]), jnp.asarray([[0.1], [0.6]])
  # G on [0.2, 0.9]: ((0.2 − 1)² + (0.9 − 1)²) / 2 = (0.64 + 0.01) / 2 = 0.325
  np.testing.assert_allclose(losses.lsgan_generator_loss(d_real), 0.325, rtol=1e-6)
  # D: ½ [(0.64 + 0.01)/2 + (0.01 + 0.36)/2] = ½ (0.325 + 0.185) = 0.255
  np.testing.assert_allclose(losses.lsgan_discriminator_loss(d_real, d_fake), 0.255, rtol=1e-6)
  # Optimal discriminator outputs (1 on real, 0 on fake) cost nothing; the generator then pays 1.
  assert float(losses.lsgan_discriminator_loss(jnp.ones(3), jnp.zeros(3))) == 0.0
  assert float(losses.lsgan_generator_loss(jnp.zeros((2, 4, 4, 1)))) == 1.0


def test_gan_losses_by_hand():
  log3 = math.log(3.0)
  # σ(ln 3) = 3/4: −log σ(0) = ln 2, −log σ(ln 3) = ln(4/3), −log(1 − σ(−ln 3)) = ln(4/3).
  np.testing.assert_allclose(losses.gan_generator_loss(jnp.asarray([0.0, log3])),
                             (math.log(2) + math.log(4 / 3)) / 2, rtol=1e-6)
  np.testing.assert_allclose(losses.gan_discriminator_loss(jnp.asarray([0.0, log3]), jnp.asarray([0.0, -log3])),
                             math.log(2) + math.log(4 / 3), rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gan_losses_finite_for_huge_logits(dtype):
  big = jnp.asarray([1e4], dtype)
  v = float(big[0])  # 1e4 rounded to the dtype (bfloat16: 9984)
  # Generator: a fake scored +v (sure real) costs −log σ(v) = 0; one scored −v costs v.
  assert float(losses.gan_generator_loss(big)) == 0.0
  np.testing.assert_allclose(losses.gan_generator_loss(-big), v, rtol=1e-6)
  # Discriminator: right answers cost 0, wrong ones v each.
  assert float(losses.gan_discriminator_loss(big, -big)) == 0.0
  np.testing.assert_allclose(losses.gan_discriminator_loss(-big, big), 2 * v, rtol=1e-6)
  # d/dl softplus(−l) = −σ(−l): −1 at l = −1e4, 0 at l = +1e4; d/dl softplus(l) = σ(l).
  g = jax.grad(lambda l: losses.gan_generator_loss(l))(jnp.asarray([-1e4, 1e4]))
  np.testing.assert_allclose(g, [-0.5, 0.0], atol=1e-7)  # mean over 2 → ×½
  g_real, g_fake = jax.grad(losses.gan_discriminator_loss, argnums=(0, 1))(-big.astype(jnp.float32),
                                                                          big.astype(jnp.float32))
  np.testing.assert_allclose([float(g_real[0]), float(g_fake[0])], [-1.0, 1.0], atol=1e-7)


def test_wgan_losses_by_hand_and_sign_convention():
  c_real, c_fake = jnp.asarray([0.2, 0.9]), jnp.asarray([0.1, 0.6])
  # critic: mean(fake) − mean(real) = 0.35 − 0.55 = −0.2; generator: −mean(fake) = −0.35
  np.testing.assert_allclose(losses.wgan_critic_loss(c_real, c_fake), -0.2, rtol=1e-6)
  np.testing.assert_allclose(losses.wgan_generator_loss(c_fake), -0.35, rtol=1e-6)
  # PnP-AdaNet's _get_cost literally, μ = 0.002, source = real: L_D = −μ mean(D(src) − D(tgt)).
  mu = 0.002
  np.testing.assert_allclose(mu * losses.wgan_critic_loss(c_real, c_fake),
                             -mu * np.mean(np.asarray(c_real) - np.asarray(c_fake)), rtol=1e-6)
  # A descent step on the critic loss raises the real scores and lowers the fake ones.
  g_real, g_fake = jax.grad(losses.wgan_critic_loss, argnums=(0, 1))(c_real, c_fake)
  np.testing.assert_allclose(g_real, [-0.5, -0.5])
  np.testing.assert_allclose(g_fake, [0.5, 0.5])
  np.testing.assert_allclose(jax.grad(losses.wgan_generator_loss)(c_fake), [-0.5, -0.5])


def test_cycle_loss_by_hand():
  x = jnp.asarray([[0.0, 1.0], [-1.0, 0.5]])
  assert float(losses.cycle_loss(x, x)) == 0.0
  x_rec = jnp.asarray([[0.5, 1.0], [0.0, 0.0]])
  # |x − x_rec| = 0.5, 0, 1, 0.5 → mean 0.5 → × 10 = 5 (× 2 = 1)
  np.testing.assert_allclose(losses.cycle_loss(x, x_rec), 5.0, rtol=1e-6)
  np.testing.assert_allclose(losses.cycle_loss(x, x_rec, weight=2.0), 1.0, rtol=1e-6)


def test_adversarial_loss_gradients_match_float64_central_differences():
  rng = np.random.default_rng(0)
  a0, b0 = rng.normal(size=(2, 3)), rng.normal(size=(2, 3)) + 3.0  # b − a stays away from 0 (|·|)
  cases = {
      "lsgan_g": lambda a, b: losses.lsgan_generator_loss(a),
      "lsgan_d": losses.lsgan_discriminator_loss,
      "gan_g": lambda a, b: losses.gan_generator_loss(3 * a),
      "gan_d": lambda a, b: losses.gan_discriminator_loss(3 * a, b),
      "wgan_c": lambda a, b: losses.wgan_critic_loss(a, b ** 2),
      "wgan_g": lambda a, b: losses.wgan_generator_loss(a ** 3),
      "cycle": lambda a, b: losses.cycle_loss(a, b),
      "reversal": lambda a, b: jnp.sum(jnp.sin(losses.gradient_reversal(a, 0.3)) * b),
  }
  h = 1e-6
  with jax.enable_x64(True):
    a, b = jnp.asarray(a0, jnp.float64), jnp.asarray(b0, jnp.float64)
    for name, f in cases.items():
      ga, gb = (np.asarray(g) for g in jax.grad(f, argnums=(0, 1))(a, b))
      assert ga.dtype == np.float64
      numeric = []
      for z, which in ((a0, 0), (b0, 1)):
        num = np.zeros(z.shape)
        for idx in np.ndindex(z.shape):
          step = np.zeros(z.shape)
          step[idx] = h
          args_plus = [a0, b0]
          args_minus = [a0, b0]
          args_plus[which], args_minus[which] = z + step, z - step
          num[idx] = (float(f(*map(jnp.asarray, args_plus))) - float(f(*map(jnp.asarray, args_minus)))) / (2 * h)
        numeric.append(num)
      if name == "reversal":  # the reversal layer's gradient is −λ × the true derivative
        numeric[0] = -0.3 * numeric[0]
      np.testing.assert_allclose(ga, numeric[0], rtol=1e-6, atol=1e-9, err_msg=name)
      np.testing.assert_allclose(gb, numeric[1], rtol=1e-6, atol=1e-9, err_msg=name)


# --- Weight clipping ------------------------------------------------------------------------------


def clip_example():
  return {"conv0": {"kernel": jnp.asarray([[-0.5, 0.01], [0.05, -0.03]]), "bias": jnp.asarray([0.2, -0.02])},
          "norm0": {"scale": jnp.asarray([1.0, 0.9]), "bias": jnp.asarray([-0.04, 0.0])},
          "head": {"kernel": jnp.asarray([0.029, -0.031], jnp.bfloat16)}}


def test_clip_weights_clips_every_leaf_and_nothing_else():
  params, c = clip_example(), 0.03
  clipped = losses.clip_weights(params, c)
  assert jax.tree.structure(clipped) == jax.tree.structure(params)
  for before, after in zip(jax.tree.leaves(params), jax.tree.leaves(clipped)):
    assert after.shape == before.shape and after.dtype == before.dtype
    bound = float(jnp.asarray(c, before.dtype))  # c in the leaf's dtype (bfloat16: 0.030029...)
    after, before = np.asarray(after, np.float64), np.asarray(before, np.float64)
    assert np.all(np.abs(after) <= bound)
    inside = np.abs(before) <= bound
    np.testing.assert_array_equal(after[inside], before[inside])          # untouched
    np.testing.assert_array_equal(after[~inside], np.sign(before[~inside]) * bound)
  np.testing.assert_array_equal(clipped["conv0"]["kernel"], np.float32([[-0.03, 0.01], [0.03, -0.03]]))
  # optax's box projection (bounds as trees: optax 0.2.8's scalar bounds fail on nested trees).
  box = optax.projections.projection_box(params, jax.tree.map(lambda _: -c, params),
                                         jax.tree.map(lambda _: c, params))
  for x, y in zip(jax.tree.leaves(clipped), jax.tree.leaves(box)):
    np.testing.assert_array_equal(x, y)


def test_clip_weights_on_kernels_only_as_pnp():
  params = clip_example()
  clipped = losses.clip_weights(params, 0.03, names=("kernel",))
  np.testing.assert_array_equal(clipped["conv0"]["kernel"], np.float32([[-0.03, 0.01], [0.03, -0.03]]))
  for path in (("conv0", "bias"), ("norm0", "scale"), ("norm0", "bias")):
    np.testing.assert_array_equal(clipped[path[0]][path[1]], params[path[0]][path[1]])
  assert float(jnp.max(jnp.abs(clipped["head"]["kernel"]))) == float(jnp.bfloat16(0.03))
  with pytest.raises(ValueError, match="positive"):
    losses.clip_weights(params, 0.0)


def test_critic_step_with_clipping_stays_in_the_box():
  params = {"kernel": jnp.asarray([0.02, -0.029, 0.0, 0.5])}
  optimizer = optax.rmsprop(3e-4)
  grads = {"kernel": jnp.asarray([-1.0, 1.0, 1.0, 0.0])}
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  new = losses.apply_updates_and_clip(params, updates, 0.03)
  expected = np.clip(np.asarray(optax.apply_updates(params, updates)["kernel"]), -0.03, 0.03)
  np.testing.assert_array_equal(new["kernel"], expected)
  assert np.all(np.abs(np.asarray(new["kernel"])) <= 0.03)


# --- ResNet generator ---------------------------------------------------------------------------


def tiny_generator(**kw):
  return ResNetGenerator(**{"base_features": 2, "num_blocks": 1, **kw})


@pytest.mark.parametrize("upsampling, padding_mode", [("transpose", "reflect"), ("resize", "constant")])
def test_generator_keeps_the_shape_and_stays_in_minus_one_one(upsampling, padding_mode):
  x = 50 * jax.random.normal(KEY, (2, 16, 12, 3))
  g = tiny_generator(upsampling=upsampling, padding_mode=padding_mode, init_stddev=1.0)
  params = jax.jit(g.init)(KEY, x)
  y = jax.jit(g.apply)(params, x)
  assert y.shape == x.shape and y.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(y))) <= 1.0 and float(jnp.std(y)) > 0.1


@pytest.mark.parametrize("shape", [(1, 18, 16, 1), (1, 16, 10, 1), (1, 15, 16, 1)])
def test_generator_rejects_sizes_not_divisible_by_4(shape):
  with pytest.raises(ValueError, match="divisible by 4"):
    jax.eval_shape(tiny_generator().init, KEY, jnp.zeros(shape))


def test_generator_skip_adds_the_input_before_tanh():
  @jax.jit
  def pre_tanh_difference(x):  # arctanh(with skip) − arctanh(without), same parameters
    out_features = 1 if x.shape[-1] == 3 else None
    plain = tiny_generator(out_features=out_features)
    skip = tiny_generator(out_features=out_features, skip=True)
    params = plain.init(KEY, x)  # the same parameter tree for both
    return jnp.arctanh(skip.apply(params, x)) - jnp.arctanh(plain.apply(params, x))

  x = 0.5 * jax.random.normal(KEY, (1, 8, 8, 1))
  np.testing.assert_allclose(pre_tanh_difference(x), x, atol=2e-5)
  # SIFA-v1: 3 slices in, 1 out: the middle slice is added.
  x3 = 0.5 * jax.random.normal(KEY, (1, 8, 8, 3))
  np.testing.assert_allclose(pre_tanh_difference(x3), x3[..., 1:2], atol=2e-5)
  with pytest.raises(ValueError, match="skip"):
    tiny_generator(out_features=2, skip=True).init(KEY, x3)


def test_generator_transposed_conv_is_tf_conv2d_transpose():
  """TF's conv2d_transpose(y, K, stride 2, 'SAME') is the gradient of conv2d(·, K, stride 2,
  'SAME') w.r.t. its input (kernel [h, w, out, in] as conv2d's [h, w, in_conv, out_conv])."""
  k = jax.random.normal(KEY, (3, 3, 4, 3))            # maps 3 channels up to 4
  y = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 6, 3))
  conv = lambda z: lax.conv_general_dilated(z, k, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  _, vjp = jax.vjp(conv, jnp.zeros((2, 10, 12, 4)))
  expected, = vjp(y)
  layer = nn.ConvTranspose(4, (3, 3), strides=(2, 2), padding="SAME", transpose_kernel=True, use_bias=False)
  got = layer.apply({"params": {"kernel": k}}, y)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_generator_parameter_counts_by_hand():
  # Tiny: F = 2, 1 block, 1 → 1 channel. Convs before an instance norm have no bias; each
  # instance norm has scale + bias (2 × channels).
  tiny = (7 * 7 * 1 * 2 + 2 * 2            # conv_in + norm
          + 3 * 3 * 2 * 4 + 2 * 4          # down0
          + 3 * 3 * 4 * 8 + 2 * 8          # down1
          + 2 * (3 * 3 * 8 * 8 + 2 * 8)    # one residual block
          + 3 * 3 * 8 * 4 + 2 * 4          # up0 (transposed)
          + 3 * 3 * 4 * 2 + 2 * 2          # up1
          + 7 * 7 * 2 * 1 + 1)             # conv_out + bias
  assert tiny == 2141
  assert n_params(jax.eval_shape(tiny_generator().init, KEY, jnp.zeros((1, 8, 8, 1)))) == tiny
  # Default (SIFA's g_A: F = 32, 9 blocks), by eval_shape (no computation).
  default = (49 * 32 + 64 + 9 * 32 * 64 + 128 + 9 * 64 * 128 + 256
             + 9 * (2 * 9 * 128 * 128 + 2 * 256)
             + 9 * 128 * 64 + 128 + 9 * 64 * 32 + 64 + 49 * 32 + 1)
  shapes = jax.eval_shape(ResNetGenerator().init, KEY, jnp.zeros((1, 256, 256, 1)))
  assert n_params(shapes) == default == 2_846_913


# --- Discriminators ---------------------------------------------------------------------------------


@pytest.mark.parametrize("pad, size, expected", [
    (2, (256, 256), (35, 35)),   # SIFA: 256 → 129 → 65 → 33 → 34 → 35
    (1, (256, 256), (30, 30)),   # pix2pix: 256 → 128 → 64 → 32 → 31 → 30
    (2, (256, 128), (35, 19)),   # 128 → 65 → 33 → 17 → 18 → 19
])
def test_patchgan_output_size_by_hand(pad, size, expected):
  x = jax.ShapeDtypeStruct((1, *size, 1), jnp.float32)
  d = PatchGAN(features=2, pad=pad, out_features=2)
  out = jax.eval_shape(d.apply, jax.eval_shape(d.init, KEY, x), x)   # shapes only, no compute
  assert out.shape == (1, *expected, 2)


def test_patchgan_receptive_field_is_70():
  """Output (j, j) of the 3-layer PatchGAN sees input rows and columns 8j − 23·pad … + 69.
  Back from the output through 4×4 convs of strides 1, 1, 2, 2, 2 (window start ↦ stride ·
  start − pad, window size ↦ stride · (size − 1) + 4): size 1 → 4 → 7 → 16 → 34 → 70, start
  j → j − p → j − 2p → 2j − 5p → 4j − 11p → 8j − 23p. Without a norm: instance norm makes every
  output depend on every pixel."""
  x = jax.random.normal(KEY, (1, 160, 160, 1))
  d = PatchGAN(features=2, pad=1, norm="none", init_stddev=1.0)
  params = d.init(KEY, x)
  j = 9
  grad = jax.jit(jax.grad(lambda v: d.apply(params, v)[0, j, j, 0]))(x)[0, :, :, 0]
  rows, cols = np.nonzero(np.asarray(grad))
  start = 8 * j - 23
  assert (rows.min(), rows.max(), cols.min(), cols.max()) == (start, start + 69, start, start + 69)


def test_patchgan_parameter_counts_by_hand():
  # Tiny: F = 2, 3 stride-2 layers; first and last convs have a bias, the others a norm.
  tiny = (16 * 1 * 2 + 2                     # conv0 4×4, 1 → 2, bias
          + 16 * 2 * 4 + 2 * 4               # conv1 → 4 + IN
          + 16 * 4 * 8 + 2 * 8               # conv2 → 8 + IN
          + 16 * 8 * 16 + 2 * 16             # conv3 (stride 1) → 16 + IN
          + 16 * 16 * 1 + 1)                 # conv4 → 1, bias
  assert tiny == 3035
  x = jnp.zeros((1, 32, 32, 1))
  assert n_params(jax.eval_shape(PatchGAN(features=2).init, KEY, x)) == tiny
  assert n_params(jax.eval_shape(PatchGAN(features=2, use_bias=False).init, KEY, x)) == tiny - 3  # SIFA
  # Default 70×70 PatchGAN on 1 channel (SIFA's d_B), by eval_shape.
  default = (16 * 64 + 64 + 16 * 64 * 128 + 256 + 16 * 128 * 256 + 512 + 16 * 256 * 512 + 1024
             + 16 * 512 + 1)
  assert n_params(jax.eval_shape(PatchGAN().init, KEY, jnp.zeros((1, 256, 256, 1)))) == default == 2_763_585


def test_patchgan_rejects_too_small_inputs():
  with pytest.raises(ValueError, match="too small"):
    jax.eval_shape(PatchGAN(features=2, pad=0).init, KEY, jnp.zeros((1, 16, 16, 1)))   # 16 → 7 → 2 → 0


def test_feature_discriminator_outputs_and_parameters():
  x = jax.random.normal(KEY, (3, 12, 12, 5))
  d = FeatureDiscriminator(features=2)
  params = d.init(KEY, x)
  out = d.apply(params, x)
  assert out.shape == (3,)
  # Per-sample: changing sample 2 leaves samples 0 and 1 alone.
  out2 = d.apply(params, x.at[2].set(0.0))
  np.testing.assert_array_equal(out2[:2], out[:2])
  assert float(out2[2]) != float(out[2])
  # 3×3 convs 5 → 2 → 4 → 8 with biases (no norm), Dense 8 → 1.
  assert n_params(params) == (9 * 5 * 2 + 2) + (9 * 2 * 4 + 4) + (9 * 4 * 8 + 8) + (8 + 1)
  patch = FeatureDiscriminator(features=2, patch=True)
  assert jax.eval_shape(patch.apply, jax.eval_shape(patch.init, KEY, x), x).shape == (3, 2, 2, 1)  # 12 → 6 → 3 → 2


def test_output_discriminator_shape_softmax_and_parameters():
  logits = jax.random.normal(KEY, (2, 64, 96, 3))
  d = OutputDiscriminator(features=2, init_stddev=0.5)
  params = d.init(KEY, logits)
  out = d.apply(params, logits)
  assert out.shape == (2, 2, 3, 1)   # 64 / 32, 96 / 32
  # It sees softmax(logits): a constant added to every class's logit changes nothing.
  np.testing.assert_allclose(d.apply(params, logits + 7.0), out, rtol=1e-5, atol=1e-5)
  assert float(jnp.std(out)) > 0.01
  raw = OutputDiscriminator(features=2, init_stddev=0.5, softmax_input=False)
  assert float(jnp.max(jnp.abs(raw.apply(params, logits + 7.0) - raw.apply(params, logits)))) > 0.1
  # 4×4 convs 3 → 2 → 4 → 8 → 16 → 1, all with biases (Tsai et al.'s 64-128-256-512-1 at F = 64).
  assert n_params(params) == (16 * 3 * 2 + 2) + (16 * 2 * 4 + 4) + (16 * 4 * 8 + 8) + (16 * 8 * 16 + 16) + (16 * 16 + 1)
  with pytest.raises(ValueError, match=">= 32"):
    jax.eval_shape(d.init, KEY, jnp.zeros((1, 16, 64, 3)))
