"""Parts shared by the unsupervised domain adaptation methods (DANN, ADDA, AdaOutput, PnP-AdaNet).

Batches come from the source + target sampler: {'source': {'image', 'label', 'domain'},
'target': {'image', 'domain'}}; the target half has no labels (data/sampler.py), so no method
here can train on them. Source and target pass through the network separately, each in train
mode; BatchNorm running statistics are updated by the source pass, then the target pass (as two
sequential PyTorch forward calls would), so the evaluated model carries statistics of both.

Model selection: UDA configs use `eval.selection='last'` (a fixed iteration, as SIFA/PnP-AdaNet
report), or 'val' on the source validation cases; 'oracle' (target labels) is labelled so.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from medgen_jax import augment

LEVEL_PREFIXES = ("down", "up")


def validate_target(config) -> None:
  """An adaptation method needs unlabelled target data: data.target_adaptation and held_out."""
  if not config.data.get("target_adaptation") or not config.data.held_out:
    raise ValueError(f"config.method={config.method!r} adapts to an unlabelled target domain: set "
                     "data.target_adaptation=True and the target site(s) in data.held_out")


def check_level(name: str, depth: int, key: str) -> None:
  valid = [f"down{i}" for i in range(depth)] + ["bottleneck"] + [f"up{i}" for i in range(depth)]
  if name not in valid:
    raise ValueError(f"config.{key}={name!r}: not a U-Net block; use one of {', '.join(valid)}")


def augment_source(key, batch, config):
  """BigAug (when enabled) on the labelled source half only."""
  return augment.maybe_augment(key, batch["source"], config.get("augment"))


def forward(model, params, batch_stats, images, key, *, train: bool = True):
  """(logits, levels, new batch_stats): one train-mode pass that returns every block's output."""
  (logits, levels), updates = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                          train=train, return_levels=True, mutable=["batch_stats"],
                                          rngs={"dropout": key})
  return logits, levels, updates.get("batch_stats", batch_stats)


def adam(learning_rate: float, b1: float = 0.9, b2: float = 0.999):
  return optax.adam(learning_rate, b1=b1, b2=b2)


def label_tree(params, is_trainable):
  """'train' / 'frozen' per leaf, by the leaf's top-level module name."""
  return {name: jax.tree.map(lambda _: "train" if is_trainable(name) else "frozen", sub)
          for name, sub in params.items()}


def partial_optimizer(tx, params, is_trainable):
  """`tx` on the parameters of the top-level modules for which `is_trainable(name)`, zero
  updates (no optimizer state) for the others: how ADDA and PnP-AdaNet freeze the shared part."""
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                               label_tree(params, is_trainable))


def keep_frozen_stats(old, new, is_trainable):
  """BatchNorm statistics: the new ones for trainable modules, the old ones for frozen modules
  (a frozen block keeps its source statistics even though the target passed through it)."""
  return {name: (new[name] if is_trainable(name) else old[name]) for name in old}


def encoder_blocks(num: int):
  """is_trainable for the first `num` encoder blocks (down0 .. down{num-1})."""
  names = {f"down{i}" for i in range(num)}
  return lambda name: name in names


def whole_encoder(depth: int):
  names = {f"down{i}" for i in range(depth)} | {"bottleneck"}
  return lambda name: name in names


def tree_select(pred, on_true, on_false):
  """Elementwise `pred ? on_true : on_false` over two pytrees of the same structure."""
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)
