"""Adversarial building blocks for unsupervised domain adaptation: pure functions.

D(·) are discriminator outputs (any shape: one value per image, or a PatchGAN map), means run
over all their elements; "real" is the distribution the generator / target encoder should be
mapped onto (SIFA: real images of the other domain; PnP-AdaNet: source = MR features).

* Gradient reversal (Ganin & Lempitsky, ICML 2015, eq. 13; DANN JMLR 2016; HTCN):
    R_λ(x) = x,   ∂R_λ/∂x = −λ I.
  `gradient_reversal(x, scale)` is a custom_vjp identity; `scale` may be a traced array (a
  schedule inside jit); it receives a zero cotangent (the forward value does not depend on it).
  `dann_lambda(p)` = 2 / (1 + exp(−γ p)) − 1 (DANN §5.2.2, γ = 10, p ∈ [0, 1] the training
  progress) = tanh(γ p / 2), computed in that form.
* LSGAN (Mao et al., ICCV 2017, eq. 2 with a = 0, b = c = 1; SIFA `losses.py`, methods.md §1.3):
    L_G = mean((D(fake) − 1)²),    L_D = ½ [mean((D(real) − 1)²) + mean(D(fake)²)].
* Non-saturating GAN on logits (Goodfellow et al., NeurIPS 2014, §3 "maximize log D(G(z))"):
    L_G = −mean log σ(D(fake)) = mean softplus(−D(fake)),
    L_D = −mean log σ(D(real)) − mean log(1 − σ(D(fake))) = mean softplus(−D(real)) + mean softplus(D(fake)),
  i.e. sigmoid cross-entropy with targets 1 (real) and 0 (fake), summed over the two terms (as
  DCGAN and DANN's domain classifier with source = real; pix2pix halves it). softplus(x) =
  log(1 + eˣ) = max(x, 0) + log1p(e^−|x|): finite, with finite gradients, for logits ±1e4.
* WGAN (Arjovsky et al., ICML 2017, Algorithm 1), sign convention of PnP-AdaNet's
  `adversarial.py::_get_cost` (methods.md §1.4), which we follow: the critic is trained to score
  real (PnP: source MR features) HIGH,
    L_critic = mean(C(fake)) − mean(C(real))      (PnP: −μ · mean(D(f_src) − D(f_tgt))),
    L_G      = −mean(C(fake))                      (PnP: −μ · mean(D(f_tgt))),
  PnP multiplies both by μ = 0.002 (not here: scale the result). The critic must be kept
  Lipschitz: `clip_weights(params, clip)` clips parameters to [−clip, clip] after every critic
  step (PnP: clip = 0.03, kernels only: `names=("kernel",)`; Arjovsky et al.: every parameter,
  c = 0.01). `apply_updates_and_clip` = optax.apply_updates followed by clip_weights.
* Cycle consistency (Zhu et al., ICCV 2017, eq. 2; SIFA λ = 10):
    L_cyc = λ · mean |x − F(G(x))|.
* Semantic consistency (CyCADA, Hoffman et al., ICML 2018, eq. 5):
    L_sem = mean_pixels −log softmax(f_S(G(x)))[argmax f_S(x)].

Losses are computed in float32 at least (bfloat16 inputs are promoted, float64 stays float64).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax


def _f32(x):
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# --- Gradient reversal (DANN, HTCN) ----------------------------------------------------------


@jax.custom_vjp
def _reverse(x, scale):
  return x


def _reverse_fwd(x, scale):
  return x, scale


def _reverse_bwd(scale, g):
  flipped = jax.tree.map(lambda t: (-scale * t).astype(t.dtype), g)
  return flipped, jnp.zeros_like(scale)


_reverse.defvjp(_reverse_fwd, _reverse_bwd)


def gradient_reversal(x, scale=1.0):
  """R_λ(x) = x in the forward pass; the backward pass multiplies the incoming gradient by −λ
  (Ganin & Lempitsky 2015, eq. 13). `x` may be a pytree of arrays; `scale` (λ) a Python float or
  a traced scalar (e.g. `dann_lambda(step / num_steps)` inside jit). No gradient flows into
  `scale`. Reverse mode only (a custom_vjp: jax.jvp / jacfwd through it are refused by JAX)."""
  scale = jnp.asarray(scale)
  if not jnp.issubdtype(scale.dtype, jnp.floating):
    scale = scale.astype(jnp.float32)
  return _reverse(x, scale)


def dann_lambda(progress, *, gamma: float = 10.0):
  """DANN's adaptation factor λ_p = 2 / (1 + exp(−γ p)) − 1 (Ganin et al., JMLR 2016, §5.2.2),
  p ∈ [0, 1] the fraction of training done: 0 at p = 0, rising to tanh(γ/2) ≈ 0.99991 at p = 1
  (γ = 10). Evaluated as tanh(γ p / 2), the same function without cancellation near p = 0."""
  return jnp.tanh(0.5 * gamma * _f32(progress))


# --- LSGAN (SIFA, SeUDA, CycleGAN) -----------------------------------------------------------


def lsgan_generator_loss(d_fake):
  """mean((D(fake) − 1)²): the generator wants its outputs scored 1 (real). methods.md §1.3."""
  return jnp.mean(jnp.square(_f32(d_fake) - 1.0))


def lsgan_discriminator_loss(d_real, d_fake):
  """½ [mean((D(real) − 1)²) + mean(D(fake)²)] (SIFA losses.lsgan_loss_discriminator)."""
  return 0.5 * (jnp.mean(jnp.square(_f32(d_real) - 1.0)) + jnp.mean(jnp.square(_f32(d_fake))))


# --- Non-saturating GAN on logits (DANN/HTCN domain classifiers, Goodfellow) -----------------


def gan_generator_loss(d_fake_logits):
  """−mean log σ(D(fake)) = mean softplus(−D(fake)) (non-saturating generator loss)."""
  return jnp.mean(jax.nn.softplus(-_f32(d_fake_logits)))


def gan_discriminator_loss(d_real_logits, d_fake_logits):
  """mean softplus(−D(real)) + mean softplus(D(fake)): sigmoid cross-entropy with target 1 on
  real and 0 on fake, the two means summed (not halved)."""
  return (jnp.mean(jax.nn.softplus(-_f32(d_real_logits)))
          + jnp.mean(jax.nn.softplus(_f32(d_fake_logits))))


# --- WGAN with weight clipping (PnP-AdaNet) ----------------------------------------------------


def wgan_critic_loss(c_real, c_fake):
  """mean(C(fake)) − mean(C(real)): minimized, the critic scores real high and fake low
  (PnP-AdaNet `_get_cost`: L_D = −μ mean(D(f_src) − D(f_tgt)), source = real; μ not applied)."""
  return jnp.mean(_f32(c_fake)) - jnp.mean(_f32(c_real))


def wgan_generator_loss(c_fake):
  """−mean(C(fake)): the generator (PnP: the target encoder) raises the critic's score of its
  outputs (PnP `_get_cost`: L_G = −μ mean(D(f_tgt)); μ not applied)."""
  return -jnp.mean(_f32(c_fake))


def clip_weights(params, clip: float, *, names: Sequence[str] | None = None):
  """Every parameter clipped to [−clip, clip] (WGAN weight clipping, applied after each critic
  step), same tree, shapes and dtypes. With `names`, only leaves whose last key is in `names`
  are clipped and the rest are returned unchanged: PnP-AdaNet clips its critics' conv kernels
  only (`names=("kernel",)`, clip 0.03; not the norm scales/offsets).
  With `names=None` it is optax.projections.projection_box(params, −clip, clip) (whose scalar
  bounds fail on nested trees in optax 0.2.8: pass bound trees there). A bfloat16 leaf is
  clipped to clip rounded to bfloat16 (0.03 → 0.030029...)."""
  if clip <= 0:
    raise ValueError(f"clip must be positive, got {clip}")

  def one(path, leaf):
    if names is not None and getattr(path[-1], "key", getattr(path[-1], "name", None)) not in names:
      return leaf
    return jnp.clip(leaf, -clip, clip).astype(jnp.asarray(leaf).dtype)

  return jax.tree_util.tree_map_with_path(one, params)


def apply_updates_and_clip(params, updates, clip: float, *, names: Sequence[str] | None = None):
  """optax.apply_updates(params, updates), then clip_weights: the critic step of WGAN.

  Not an optax GradientTransformation on purpose: a transformation can only return the update
  clip(p + u) − p, and p + (clip(p + u) − p) is rounded, so the applied parameters could lie an
  ulp outside [−clip, clip]; clipping the new parameters themselves is exact."""
  return clip_weights(optax.apply_updates(params, updates), clip, names=names)


# --- Cycle consistency (CycleGAN, SIFA, SeUDA) ---------------------------------------------------


def cycle_loss(x, x_rec, *, weight: float = 10.0):
  """weight · mean |x − x_rec| (CycleGAN eq. 2; SIFA: λ_A = λ_B = 10, methods.md §1.3)."""
  return weight * jnp.mean(jnp.abs(_f32(x) - _f32(x_rec)))


# --- Semantic consistency (CyCADA) ---------------------------------------------------------------


def semantic_consistency_loss(logits, labels):
  """mean over pixels of −log softmax(logits)[label]: CyCADA's semantic consistency (Hoffman et
  al., ICML 2018, eq. 5), where `logits` = f_S(G(x)) (the frozen source model on the translated
  image) and `labels` = argmax f_S(x) (its labels on the original image; integer, no gradient).
  Unweighted and unclipped, unlike the class-balanced task CE."""
  logp = jax.nn.log_softmax(_f32(logits), axis=-1)
  picked = jnp.take_along_axis(logp, jnp.asarray(labels)[..., None].astype(jnp.int32), axis=-1)
  return -jnp.mean(picked)
