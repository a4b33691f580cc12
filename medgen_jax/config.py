"""The base experiment config. Every `configs/*.py` starts from `base_config()` and overrides.

Configs are locked by the CLI: a misspelt key (`--config.optimiser.lr=...`) fails with a message
naming the close matches instead of being ignored.
"""

from __future__ import annotations

import ml_collections

from medgen_jax.data.pipeline import default_data_config

METHODS = ("deepall", "separate")
SELECTIONS = ("val", "last", "oracle")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "deepall"          # deepall (= Joint) | separate (one model per source site)
  c.seed = 0                    # init, dropout and data-sampling seed
  c.data = default_data_config()

  c.model = ml_collections.ConfigDict({
      "name": "unet", "base_features": 16, "depth": 4, "dropout": 0.0,
      "norm": "batch",          # batch | instance | group | none
      "fast_ops": True})        # same math, XLA:CPU-friendly layers (see models/unet.py)

  c.loss = ml_collections.ConfigDict({
      "ce_weight": 1.0, "dice_weight": 1.0,
      "dice_variant": "squared",  # squared (PnP/SIFA) | linear (MS-Net/SAML)
      "include_background": True, "class_weights": "batch", "ce_clip": 0.005,
      "weight_decay": 1e-4})      # explicit L2 on kernels: coefficient · Σ w²/2

  c.optimizer = ml_collections.ConfigDict({
      "name": "adam", "learning_rate": 1e-3, "b1": 0.9, "b2": 0.999, "momentum": 0.9,
      "schedule": "constant",     # constant | cosine | exponential
      "decay_rate": 0.95, "decay_steps": 500, "warmup_steps": 0,
      "grad_clip_norm": 0.0})     # 0 = off; else global-norm clipping

  c.batch_size = 12               # global; a multiple of the source sites and of the devices
  c.num_steps = 2000
  c.dtype = "float32"             # compute dtype: float32 | bfloat16 (params stay float32)
  c.bn_sync = True                # BatchNorm statistics over all devices (else per device)

  c.log_every = 50
  c.eval_every = 500              # validation (source val cases) + checkpoint with metrics
  c.checkpoint = ml_collections.ConfigDict({"every": 500, "keep": 3, "async_save": False})
  c.eval = ml_collections.ConfigDict({
      "batch_size": 32,           # slices per inference batch
      "selection": "val",         # val (source-site validation) | last | oracle (target labels!)
      "distances": True})         # ASD/HD95 in the final evaluation
  c.progress_bar = True
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks values that the type-locked config cannot; messages name the key and the fix."""
  def fail(key, message):
    raise ValueError(f"config.{key}: {message}")

  if config.method not in METHODS:
    fail("method", f"unknown method {config.method!r}; use one of {', '.join(METHODS)}")
  if config.eval.selection not in SELECTIONS:
    fail("eval.selection", f"unknown selection {config.eval.selection!r}; use one of {', '.join(SELECTIONS)}")
  if config.eval.selection == "val" and config.data.split.val_fraction <= 0:
    fail("eval.selection", "'val' needs validation cases: set data.split.val_fraction > 0 or use 'last'")
  if config.eval.selection == "oracle" and not config.data.held_out:
    fail("eval.selection", "'oracle' selects on held-out (target) labels: set data.held_out")
  for key in ("num_steps", "batch_size", "log_every", "eval_every"):
    if config[key] < 1:
      fail(key, "must be >= 1")
  if config.checkpoint.every < 1 or config.checkpoint.keep < 1:
    fail("checkpoint", "every and keep must be >= 1")
