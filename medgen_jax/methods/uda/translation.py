"""Image-translation parts shared by the pixel-level methods (CycleGAN, SeUDA, CyCADA) and SIFA.

Networks (config.gan, models/gan.py): ResNet generators (CycleGAN / SIFA's g_A: `gen_features`,
`gen_blocks`, zero padding and tanh(x + out) as SIFA with `skip`), 70×70 PatchGAN
discriminators (`disc_features`, `disc_layers`, `disc_pad` 2 = SIFA's 35×35 map at 256²),
instance norm; every GAN network has its own Adam(`gan.learning_rate` 2e-4, b1 `gan.b1` 0.5),
constant as SIFA's (CycleGAN decays it linearly to 0 over the second half: not reproduced). Images must lie in [−1, 1] (the generators end in tanh):
`data.normalization.name='site_range'` maps each modality with its own training-data range.

Losses (losses/adversarial.py, methods.md §1.3): LSGAN (generator mean((D(G(x)) − 1)²),
discriminator ½[mean((D(real) − 1)²) + mean(D(fake)²)]), L1 cycle consistency with weight
`gan.cycle_weight` λ = 10, the optional identity loss `gan.identity_weight`·mean|G(y) − y|
(off by default, as SIFA; CycleGAN's default λ_idt·λ = 0.5·10 = 5).

Image pool (Shrivastava et al. 2017), SIFA's `fake_image_pool` semantics: the discriminators see
a history of generated batches. `gan.pool_size` P whole batches; while fewer than P are stored
the new batch is stored and returned; afterwards, with probability ½ a random stored batch is
returned and replaced by the new one, else the new batch is returned. (CycleGAN's PyTorch
ImagePool keeps P single images and tosses the coin per image; the two agree at batch size 1,
CycleGAN's default; not reproduced for batches.) The pool lives in the
train state (`nets[name].batch_stats`: {'images', 'count'}), so a step stays a pure function and
a resume is exact. Under pmap it holds the GLOBAL batch (all-gathered) and draws the same random
choice on every device, each device then takes its own rows: the replicas stay identical and the
result equals the one-device step. P = 0 turns the pool off.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from medgen_jax.methods.base import init_net
from medgen_jax.models.gan import PatchGAN, ResNetGenerator
from medgen_jax.train_state import NetState, compute_dtype


def check_image_range(config, method: str) -> None:
  """Translation methods need images in [−1, 1] (tanh generators)."""
  norm = config.data.normalization
  out = norm.get("output_range") or (-1.0, 1.0)
  if norm.name != "site_range" or tuple(float(v) for v in out) != (-1.0, 1.0):
    raise ValueError(f"config.data.normalization.name={norm.name!r}: {method} translates images with tanh "
                     f"generators, whose outputs lie in [-1, 1]; use data.normalization.name='site_range' "
                     f"(each modality's training-data range mapped to [-1, 1], as SIFA)")


def validate(config, method: str) -> None:
  c = config.gan
  check_image_range(config, method)
  if config.augment.enabled:
    raise ValueError(f"config.augment.enabled=True: {method} does not apply BigAug (it would change what "
                     f"the translation networks learn); set augment.enabled=False")
  for key in ("gen_features", "disc_features", "disc_layers"):
    if c[key] < 1:
      raise ValueError(f"config.gan.{key}={c[key]}: must be >= 1")
  for key in ("gen_blocks", "pool_size", "cycle_weight", "identity_weight"):
    if c[key] < 0:
      raise ValueError(f"config.gan.{key}={c[key]}: must be >= 0")
  height, width = config.data.in_plane_shape
  if height % 4 or width % 4:
    raise ValueError(f"config.data.in_plane_shape={tuple(config.data.in_plane_shape)}: the ResNet generators "
                     f"need height and width divisible by 4")


# --- Networks ------------------------------------------------------------------------------------


def generator(config) -> ResNetGenerator:
  c = config.gan
  return ResNetGenerator(base_features=c.gen_features, num_blocks=c.gen_blocks, skip=c.skip,
                         padding_mode="constant", dtype=compute_dtype(config.dtype))


def discriminator(config, *, out_features: int = 1) -> PatchGAN:
  c = config.gan
  return PatchGAN(features=c.disc_features, num_layers=c.disc_layers, out_features=out_features,
                  pad=c.disc_pad, use_bias=False, dtype=compute_dtype(config.dtype))


def gan_adam(config) -> optax.GradientTransformation:
  return optax.adam(config.gan.learning_rate, b1=config.gan.b1)


def init_gan_net(key, module, example, config) -> NetState:
  """A GAN network's state (instance norm: no batch statistics) with its own Adam."""
  params = jax.jit(lambda k: module.init(k, example, train=False))(key)["params"]
  return init_net(params, {}, gan_adam(config))


def init_pool(config, image_shape) -> NetState:
  """An empty image pool for global batches of `image_shape` = (B, H, W, C)."""
  size = max(int(config.gan.pool_size), 1)
  return init_net({}, {"images": jnp.zeros((size, *image_shape), jnp.float32),
                       "count": jnp.zeros((), jnp.int32)}, None)


# --- Image pool ----------------------------------------------------------------------------------


def pool_query(pool: NetState, images, key, *, size: int, axis_name: str | None):
  """(new pool, images for the discriminator): see the module docstring. `key` must be the same
  on every device (the step's key before `fold_device`)."""
  if size == 0:
    return pool, images
  local = images.shape[0]
  full = jax.lax.stop_gradient(images).astype(jnp.float32)
  if axis_name is not None:
    full = jax.lax.all_gather(full, axis_name, tiled=True)
  stored, count = pool.batch_stats["images"], pool.batch_stats["count"]
  coin_key, index_key = jax.random.split(key)
  filling = count < size
  swap = jax.random.uniform(coin_key) > 0.5
  index = jnp.where(filling, count, jax.random.randint(index_key, (), 0, size))
  old = stored[index]
  out = jnp.where(filling | ~swap, full, old)
  stored = stored.at[index].set(jnp.where(filling | swap, full, old))   # one slot, not a pool copy
  new = pool.replace(batch_stats={"images": stored, "count": jnp.minimum(count + 1, size).astype(jnp.int32)})
  if axis_name is not None:
    out = jax.lax.dynamic_slice_in_dim(out, jax.lax.axis_index(axis_name) * local, local)
  return new, out.astype(images.dtype)


# --- Losses ----------------------------------------------------------------------------------------


def identity_loss(x, same, *, weight: float):
  """weight · mean|G(x) − x| for a generator G fed an image already in its output domain."""
  return weight * jnp.mean(jnp.abs(same.astype(jnp.float32) - x.astype(jnp.float32)))


def apply_gan(module, params, x):
  return module.apply({"params": params}, x, train=True)


__all__ = ["apply_gan", "check_image_range", "discriminator", "gan_adam", "generator", "identity_loss",
           "init_gan_net", "init_pool", "pool_query", "validate"]
