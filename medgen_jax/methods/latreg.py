"""LatReg: a U-Net with a "regularization network" on its latent features (Aslani, Murino, Dayan,
Tam, Sona, Hamarneh, "Scanner invariant multiple sclerosis lesion segmentation from MRI", ISBI
2020; released code ShahabAslani/Scanner-Invariant), the "LatReg [2]" row of SAML's prostate table.

The segmenter θ (the project U-Net) and the regularization network ψ minimize one objective:

    E(θ, ψ) = L_seg(θ; x, y) + w · L_reg(C_ψ(z_θ(x)), d)

* L_seg: DeepAll's task loss (weighted CE + Dice + L2, methods/deepall.segmentation_terms);
* z_θ(x): the output of U-Net block `latreg.level` (the bottleneck by default: the released
  Keras model reads `conv5`, the deepest encoder block, before any decoder layer);
* C_ψ: flatten → `num_layers` × (Dense(`hidden`) + ReLU) → Dense(K), softmax p = softmax(C_ψ(z))
  over the K training sites (released: Flatten → Dense(1024, relu) → Dense(1024, relu) →
  Dense(K, softmax), glorot-uniform kernels, zero biases; `pool='mean'` averages over the
  spatial axes instead of flattening, for large slices);
* d: each slice's training-site index (batch['domain'], the pooled sampler's ids).

L_reg (`latreg.loss`), per slice b, averaged over the batch (released weight w in brackets):

  uniform      (entropy_uniform_net.py, w = 0.3)  −(1/K) Σ_k log p_bk: the cross-entropy between
               the uniform distribution and p, minimal (= log K) where p is uniform. The release
               has K = 2 (1.5 T vs 3 T), targets 0.5 and Keras binary_crossentropy, which for K = 2
               is exactly this; for K > 2 we keep the cross-entropy to the uniform distribution.
  randomized   (entropy_randomized_net.py, w = 0.1)  −log p_{b, r_b}, r_b a uniformly random site
               drawn per slice and step (the release permutes each one-hot site label at random:
               generator2(is_train=True)); in expectation it is the uniform loss.
  correlation  (correlation_net.py, w = 0.2)  ρ_b², ρ_b = clip(Pearson(onehot(d_b), p_b), −1, 1),
               the correlation over the K entries of the two vectors.
  adversarial  (NOT in the release; a DANN-style alternative, Ganin & Lempitsky 2015) the site
               cross-entropy −log p_{b, d_b} with C_ψ reading R_λ(z), R_λ the project's gradient
               reversal (losses.gradient_reversal, λ = `reversal_scale`): ψ learns to recognize the
               site, θ receives −λ times that gradient.

For the first three both θ and ψ DESCEND E (the release compiles one Keras model, loss weights
[1, w], and fits it with one Adam(1e-4)): the regularizer is cooperative, not adversarial. Here
ψ lives in `state.nets['reg']` with its own state of the same `config.optimizer` (an
element-wise optimizer on θ ∪ ψ is the same as one per part; only global-norm clipping,
`optimizer.grad_clip_norm`, then differs: each part is clipped by its own norm). No weight
schedule (constant w, as released).

Deviations from the release (README): the released Keras losses index `y_true[0]` / `y_true[1]`
inside per-output loss functions, i.e. the Dice term reads only the first patch of each batch
and the regularizer only the second; we average over every slice. The Pearson denominator gets
1e-12 under its square root (a uniform p makes it 0). 2-D slices and the project U-Net (with its
norm layers) instead of the release's 3-D 64³-patch U-Net without normalization.

The evaluation network is the U-Net alone (deepall.eval_network). With `axis_name` (pmap) the
Dice/CE sums are global, gradients of θ and ψ and the metrics are averaged over devices, and the
randomized targets are drawn per GLOBAL slice index (fold_in of the step key), so a pmapped step
equals the one-device step.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from medgen_jax import augment, losses
from medgen_jax.methods import deepall
from medgen_jax.methods.base import fold_device, init_net
from medgen_jax.methods.deepall import finish_step, segmentation_terms
from medgen_jax.methods.uda import common
from medgen_jax.train_state import make_optimizer

LABEL = "LatReg"
SAMPLER = "pooled"
LOSSES = ("uniform", "randomized", "correlation", "adversarial")
POOLS = ("flatten", "mean")
RELEASED_WEIGHTS = {"uniform": 0.3, "randomized": 0.1, "correlation": 0.2}
PEARSON_EPS = 1e-12
eval_network = deepall.eval_network


def label(config, sources) -> str:
  name = LABEL if config.latreg.loss == "uniform" else f"{LABEL} ({config.latreg.loss})"
  return name + (" + BigAug" if config.augment.enabled else "")


def validate(config) -> None:
  c = config.latreg
  if c.loss not in LOSSES:
    raise ValueError(f"config.latreg.loss={c.loss!r}: use one of {', '.join(LOSSES)}")
  if c.pool not in POOLS:
    raise ValueError(f"config.latreg.pool={c.pool!r}: use one of {', '.join(POOLS)}")
  if not c.weight >= 0:
    raise ValueError(f"config.latreg.weight={c.weight!r}: must be >= 0 (released 0.3 / 0.1 / 0.2)")
  if c.hidden < 1 or c.num_layers < 0:
    raise ValueError(f"config.latreg.hidden={c.hidden}, num_layers={c.num_layers}: need hidden >= 1 "
                     "and num_layers >= 0 (released 1024 and 2)")
  if not c.reversal_scale >= 0:
    raise ValueError(f"config.latreg.reversal_scale={c.reversal_scale!r}: must be >= 0")
  common.check_level(c.level, config.model.depth, "latreg.level")


# --- The regularization network ----------------------------------------------------------------


class RegularizationNet(nn.Module):
  """Site logits [B, K] from a feature map [B, h, w, c]: flatten (or spatial mean) → `num_layers`
  × (Dense(hidden) + ReLU) → Dense(K). Keras' Dense defaults (glorot-uniform, zero bias)."""

  num_domains: int
  hidden: int = 1024
  num_layers: int = 2
  pool: str = "flatten"

  @nn.compact
  def __call__(self, z):
    z = jnp.asarray(z, jnp.promote_types(z.dtype, jnp.float32))
    h = z.reshape(z.shape[0], -1) if self.pool == "flatten" else jnp.mean(z, axis=(1, 2))
    dense = lambda n, name: nn.Dense(n, kernel_init=nn.initializers.xavier_uniform(), name=name)
    for i in range(self.num_layers):
      h = nn.relu(dense(self.hidden, f"fc{i}")(h))
    return dense(self.num_domains, "out")(h)


def regularizer(config, info):
  c = config.latreg
  return RegularizationNet(info.num_domains, hidden=c.hidden, num_layers=c.num_layers, pool=c.pool)


# --- L_reg (pure; per-slice values averaged over the given slices) -------------------------------


def uniform_loss(logits):
  """mean_b −(1/K) Σ_k log softmax(logits_b)_k (entropy_uniform_net.py, generalized to K)."""
  return -jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))


def site_cross_entropy(logits, targets):
  """mean_b −log softmax(logits_b)[targets_b] (entropy_randomized_net.py with random targets;
  the adversarial variant with the true sites)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, targets[:, None].astype(jnp.int32), axis=-1))


def correlation_loss(logits, domain):
  """mean_b ρ_b², ρ_b = clip(Pearson(onehot(d_b), softmax(logits_b)), −1, 1) over the K entries
  (correlation_net.py's correlation_coefficient, per slice)."""
  p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  t = jax.nn.one_hot(domain, p.shape[-1], dtype=p.dtype)
  tm, pm = t - jnp.mean(t, -1, keepdims=True), p - jnp.mean(p, -1, keepdims=True)
  r = jnp.sum(tm * pm, -1) / jnp.sqrt(jnp.sum(tm ** 2, -1) * jnp.sum(pm ** 2, -1) + PEARSON_EPS)
  return jnp.mean(jnp.square(jnp.clip(r, -1.0, 1.0)))


def random_sites(key, n: int, num_domains: int, *, axis_name=None):
  """One uniformly random site per slice, drawn from fold_in(key, global slice index): the same
  targets whether the batch runs on one device or is split over several."""
  offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * n
  index = offset + jnp.arange(n)
  return jax.vmap(lambda i: jax.random.randint(jax.random.fold_in(key, i), (), 0, num_domains))(index)


def regularization_loss(kind: str, logits, domain, targets=None):
  if kind == "uniform":
    return uniform_loss(logits)
  if kind == "randomized":
    return site_cross_entropy(logits, targets)
  if kind == "correlation":
    return correlation_loss(logits, domain)
  if kind == "adversarial":
    return site_cross_entropy(logits, domain)
  raise ValueError(f"config.latreg.loss={kind!r}: use one of {', '.join(LOSSES)}")


# --- The method interface -------------------------------------------------------------------------


def init_state(key, config, info):
  if info.num_domains < 2:
    raise ValueError(f"LatReg regularizes the site classifier over the training sites, but the model "
                     f"trains on {len(info.domains)} site(s) {list(info.domains)}: use a pooled run "
                     "over at least 2 source sites (config data.held_out / method)")
  state = deepall.init_state(key, config, info)
  model = deepall.segmenter(config, info, train=False)
  _, levels = jax.eval_shape(
      lambda p: model.apply({"params": p, "batch_stats": state.batch_stats}, jnp.zeros((1, *info.input_shape)),
                            return_levels=True, **_domain_kw(config, jnp.zeros((1,), jnp.int32))), state.params)
  feature = levels[config.latreg.level]
  psi = regularizer(config, info).init(jax.random.fold_in(key, 1), jnp.zeros(feature.shape, jnp.float32))["params"]
  return state.replace(nets={"reg": init_net(psi, {}, make_optimizer(config.optimizer, num_steps=config.num_steps))})


def _domain_kw(config, domain):
  return {"domain": domain} if deepall.uses_domains(config) else {}


def make_train_step(model, reg, tx, reg_tx, config, *, num_classes: int, num_domains: int,
                    axis_name: str | None = None, bn_sync: bool = True):
  c = config.latreg
  augment_config = config.get("augment")

  def objective(params, psi, batch_stats, batch, dropout_key, targets):
    (logits, levels), updates = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"], train=True,
                               mutable=["batch_stats"], rngs={"dropout": dropout_key}, return_levels=True,
                               **_domain_kw(config, batch["domain"]))
    loss_seg, metrics = segmentation_terms(logits, batch["label"], params, config.loss,
                                           num_classes=num_classes, axis_name=axis_name)
    z = levels[c.level]
    if c.loss == "adversarial":
      z = losses.gradient_reversal(z, c.reversal_scale)
    site_logits = reg.apply({"params": psi}, z)
    loss_reg = regularization_loss(c.loss, site_logits, batch["domain"], targets)
    total = loss_seg + c.weight * loss_reg
    accuracy = jnp.mean(jnp.argmax(site_logits, -1) == batch["domain"])
    return total, (dict(metrics, loss=total, loss_seg=loss_seg, loss_reg=loss_reg, domain_accuracy=accuracy),
                   updates.get("batch_stats", batch_stats))

  def step(state, batch, key):
    # Same key use as DeepAll's step (fold per device, then augment / dropout), so weight 0 is
    # DeepAll's step; the random targets come from the unfolded key and the global slice index.
    target_key = jax.random.fold_in(key, 0x1A7)
    key = fold_device(key, axis_name)
    augment_key, dropout_key = jax.random.split(key)
    batch = augment.maybe_augment(augment_key, batch, augment_config)
    targets = (random_sites(target_key, batch["domain"].shape[0], num_domains, axis_name=axis_name)
               if c.loss == "randomized" else None)
    (_, (metrics, batch_stats)), (g_theta, g_psi) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
        state.params, state.nets["reg"].params, state.batch_stats, batch, dropout_key, targets)
    return finish_step(state, tx, g_theta, metrics, batch_stats, axis_name=axis_name, bn_sync=bn_sync,
                       net_grads={"reg": g_psi}, net_txs={"reg": reg_tx})

  return step


def make_step(config, info):
  return make_train_step(deepall.segmenter(config, info, train=True), regularizer(config, info),
                         make_optimizer(config.optimizer, num_steps=config.num_steps),
                         make_optimizer(config.optimizer, num_steps=config.num_steps), config,
                         num_classes=info.num_classes, num_domains=info.num_domains, axis_name=info.axis_name,
                         bn_sync=deepall.bn_synced(config, info))
