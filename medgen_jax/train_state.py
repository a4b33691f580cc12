"""Train state, model and optimizer construction from a config: the parts every method shares."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from medgen_jax.models import UNet, UNet3D

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
OPTIMIZERS = ("adam", "sgd", "rmsprop")
SCHEDULES = ("constant", "cosine", "exponential")


@flax.struct.dataclass
class NetState:
  """One network a method trains besides its segmenter: params, BN statistics, optimizer state
  (`()` for a frozen network)."""

  params: Any
  batch_stats: Any
  opt_state: Any


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue bit-identically: params (float32), BN statistics,
  optimizer state, step, and the run's base PRNG key (step keys are fold_in(rng, step)).

  `params`/`batch_stats`/`opt_state` are the method's main network (the segmenter, or what it
  adapts); every other network it trains (MASF/SAML's metric net, discriminators, a frozen
  source model, ...) is a named `NetState` in `nets` (methods/base.py)."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # raw uint32[2] key
  nets: Any = flax.struct.field(default_factory=dict)   # name -> NetState
  # Episodic methods run "as released" (meta.optimizers='released') keep a second optimizer
  # state for θ: the task loss's own optimizer; empty otherwise.
  task_opt_state: Any = flax.struct.field(default_factory=dict)
  # 0 while every step so far had a finite loss, gradient norm and parameters; else the first
  # step (1-based) that did not. Accumulated on the device, so the host reads it only every
  # `log_every` steps and before each save, and never saves a state that went bad.
  first_bad_step: jax.Array = flax.struct.field(default_factory=lambda: jnp.zeros((), jnp.int32))

  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats}


def compute_dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {name!r} (config dtype); use one of {', '.join(DTYPES)}")
  return DTYPES[name]


def _nested_tuple(levels) -> tuple:
  """Per-level sizes as a tuple of int tuples (a config read back from config.json holds lists)."""
  return tuple(tuple(int(v) for v in level) for level in levels)


def make_model(model_config: ml_collections.ConfigDict, *, num_classes: int, dtype: str = "float32",
               bn_axis_name: str | None = None, num_domains: int = 1) -> UNet | UNet3D:
  if model_config.name == "unet3d":   # 3-D patches (models/unet3d.py); () = isotropic 2 / 3
    if model_config.get("adapter", "none") != "none" or model_config.get("se", "none") != "none":
      raise ValueError("model.name='unet3d' has no adapters or squeeze-and-excitation: set "
                       "model.adapter='none' and model.se='none'")
    return UNet3D(num_classes=num_classes, base_features=model_config.base_features,
                  depth=model_config.depth, dropout=model_config.dropout, norm=model_config.norm,
                  bn_axis_name=bn_axis_name, dtype=compute_dtype(dtype), fast_ops=model_config.fast_ops,
                  num_domains=num_domains, pool_sizes=_nested_tuple(model_config.get("pool_sizes", ())),
                  kernel_sizes=_nested_tuple(model_config.get("kernel_sizes", ())))
  if model_config.name != "unet":
    raise ValueError(f"unknown model {model_config.name!r} (config model.name); available: unet, unet3d")
  # Adapters / squeeze-and-excitation (models/adapters.py); .get: a run saved before these keys
  # existed builds its model without them.
  return UNet(num_classes=num_classes, base_features=model_config.base_features,
              depth=model_config.depth, dropout=model_config.dropout, norm=model_config.norm,
              bn_axis_name=bn_axis_name, dtype=compute_dtype(dtype), fast_ops=model_config.fast_ops,
              num_domains=num_domains, adapter=model_config.get("adapter", "none"),
              se=model_config.get("se", "none"), se_reduction=model_config.get("se_reduction", 8),
              se_blocks=model_config.get("se_blocks", "encoder_decoder"))


def make_schedule(opt: ml_collections.ConfigDict, *, num_steps: int):
  if opt.schedule == "constant":
    schedule = optax.constant_schedule(opt.learning_rate)
  elif opt.schedule == "cosine":
    schedule = optax.cosine_decay_schedule(opt.learning_rate, max(num_steps - opt.warmup_steps, 1))
  elif opt.schedule == "exponential":  # MS-Net / UMMKD: x0.95 every 500 / 1000 iterations
    schedule = optax.exponential_decay(opt.learning_rate, opt.decay_steps, opt.decay_rate, staircase=True)
  else:
    raise ValueError(f"unknown schedule {opt.schedule!r} (config optimizer.schedule); "
                     f"use one of {', '.join(SCHEDULES)}")
  if opt.warmup_steps:
    warmup = optax.linear_schedule(0.0, opt.learning_rate, opt.warmup_steps)
    schedule = optax.join_schedules([warmup, schedule], [opt.warmup_steps])
  return schedule


def make_optimizer(opt: ml_collections.ConfigDict, *, num_steps: int) -> optax.GradientTransformation:
  """adam | sgd | rmsprop on a schedule, optionally after global-norm gradient clipping."""
  schedule = make_schedule(opt, num_steps=num_steps)
  if opt.name == "adam":
    tx = optax.adam(schedule, b1=opt.b1, b2=opt.b2)
  elif opt.name == "sgd":
    tx = optax.sgd(schedule, momentum=opt.momentum or None)
  elif opt.name == "rmsprop":
    tx = optax.rmsprop(schedule, momentum=opt.momentum)
  else:
    raise ValueError(f"unknown optimizer {opt.name!r} (config optimizer.name); "
                     f"use one of {', '.join(OPTIMIZERS)}")
  if opt.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
  return tx


def create_train_state(seed, model, tx, *, input_shape) -> TrainState:
  """Initializes params (float32) from `seed` (an int or a PRNG key); the state's rng is an
  independent key."""
  key = jax.random.PRNGKey(seed) if isinstance(seed, int) else seed
  init_key, run_key = jax.random.split(key)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros(input_shape, jnp.float32), train=False))(init_key)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                    rng=run_key)
