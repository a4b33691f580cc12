"""The method interface: what a method trains and how, so that the trainer never learns it.

A method module (`medgen_jax/methods/*.py`, registered in `methods/__init__.py`) declares:

  LABEL                 its name in result tables ("DeepAll", "DANN", ...)
  SAMPLER               what feeds its step: 'pooled' (SliceSampler over the sources),
                        'episodic' (EpisodicSampler: {'meta_train', 'meta_test'}) or
                        'source_target' (SourceTargetSampler: {'source': labelled slices,
                        'target': unlabelled target slices}, unsupervised domain adaptation)
  init_state(key, config, info) -> TrainState
                        every network it trains, each with params, BatchNorm statistics and
                        optimizer state (the segmenter at the top level, the others in
                        `TrainState.nets`); `key` = PRNGKey(config.seed)
  make_step(config, info) -> step(state, batch, key) -> (state, metrics)
                        the pure train step; `info.axis_name` is the data-parallel axis when
                        the trainer pmaps it (None on one device: the same function). A method
                        whose step changes with the step number (pre-training then adaptation,
                        critic and generator sub-steps) returns `Phases`: several pure steps
                        and the schedule that picks one from the step number
  eval_network(config, info) -> (model, variables_of)
                        the network that segments at evaluation (train=False, no cross-device
                        BatchNorm) and `variables_of(state)` -> its {'params', 'batch_stats'}

and optionally `label(config, sources)` (a richer table name), `model_runs(config, sources)`
(the models one run trains: [(name, sources)], default one model on all sources; Separate
trains one per site), `uses_domains(config)` (True: the evaluation network has domain-specific
layers and is applied as `model.apply(variables, x, train=False, domain=ids)`, the ids from
`domain_index`; default False), `GROUPS_BY_DOMAIN = True` (its step splits each device's shard
into equal per-site groups, models/domains.group_by_domain: the trainer then refuses batches whose
per-device share is not balanced), `validate(config)` (method-specific config checks, one clear error) and
`write_figures(config, data, state, out_dir)` (figures drawn from a trained model's selected
state, e.g. the translation methods' previews; the trainer calls it once per model, process 0).

A checkpoint is the whole TrainState (every network and optimizer), so a resume is exact for
any method. The helpers below are the shared tail of a step: device averaging, one network's
optimizer update, and the divergence flag the trainer reads.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from medgen_jax.models.domains import UNSEEN
from medgen_jax.train_state import NetState, TrainState

SAMPLERS = ("pooled", "episodic", "source_target")


@dataclasses.dataclass(frozen=True)
class Phases:
  """A train step made of several pure steps, `steps[schedule(step)]` running at step `step`.

  The trainer compiles each phase once and picks it on the host from the step number, which it
  knows without waiting for the device: on XLA:CPU a step inside a `lax.cond`/`lax.switch`
  branch runs ~5x slower than the same computation outside one (a DeepAll step: 1.0 s vs 0.19 s,
  measured), so phases are never branches of one program. Called as a function (tests, users
  who want one step) it is that `lax.switch`, equal in value. Every phase returns the same state
  structure; each returns its own metrics (a 'loss' among them).
  """

  steps: tuple
  schedule: Callable[[int], int]   # step number -> index into `steps`; plain Python on ints

  def __call__(self, state, batch, key):
    index = self.schedule_array(state.step)
    return switch_phases(index, self.steps, state, batch, key)

  def schedule_array(self, step):
    """The schedule on a traced step: every index where it holds (phases are step ranges or
    cycles the method describes through `schedule` evaluated by jnp operations)."""
    return self.schedule(step)


def switch_phases(index, steps, state, batch, key):
  """`lax.switch` over phases whose metrics differ: each phase's metrics are completed with NaN
  for the names only other phases compute, so all branches return one structure."""
  shapes = [jax.eval_shape(step, state, batch, key)[1] for step in steps]
  spec = {}
  for shape in shapes:
    spec.update(shape)

  def complete(step):
    def run(state, batch, key):
      new, metrics = step(state, batch, key)
      return new, {name: metrics[name] if name in metrics else jnp.full(s.shape, jnp.nan, s.dtype)
                   for name, s in spec.items()}
    return run

  return jax.lax.switch(index, [complete(s) for s in steps], state, batch, key)


@dataclasses.dataclass(frozen=True)
class RunInfo:
  """What a method needs to know about the run besides its config."""

  num_classes: int
  input_shape: tuple[int, int, int]   # one slice: (H, W, channels)
  axis_name: str | None = None         # the data-parallel axis inside the step, or None
  # The model's training sites, in the order of their domain ids: a pooled batch's
  # batch['domain'][b] indexes this tuple (data/sampler.SliceSampler). Domain-specific layers
  # (DSBN, adapters, ...) keep one parameter set per entry.
  domains: tuple[str, ...] = ()

  @property
  def num_domains(self) -> int:
    return max(len(self.domains), 1)


def domain_index(domains, site: str | None, *, policy: str = "average") -> int:
  """The domain id of `site` in a model trained on `domains` (RunInfo.domains); a site it was
  not trained on is `UNSEEN` (-1: the mean of the domain-specific parameters) under the
  'average' policy, and one clear ValueError under 'refuse' (config model.unseen_domain)."""
  domains = list(domains)
  if site in domains:
    return domains.index(site)
  if policy == "average":
    return UNSEEN
  what = f"site {site!r}" if site is not None else "a volume of unknown site"
  raise ValueError(f"{what}: the model has domain-specific layers for {domains} only and "
                   "config model.unseen_domain='refuse'. Fix: give the volume's site (predict --site), "
                   "or set model.unseen_domain='average' (the mean of the trained domains' parameters)")


def device_mean(tree, axis_name: str | None):
  """The mean over devices (identity on one device)."""
  return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def fold_device(key, axis_name: str | None):
  """A per-device PRNG key (dropout, augmentation) from the step's replicated key."""
  return key if axis_name is None else jax.random.fold_in(key, jax.lax.axis_index(axis_name))


def update_net(net: NetState, tx: optax.GradientTransformation, grads, *, batch_stats=None) -> NetState:
  """One optimizer update of one network (gradients already averaged over devices)."""
  updates, opt_state = tx.update(grads, net.opt_state, net.params)
  return net.replace(params=optax.apply_updates(net.params, updates), opt_state=opt_state,
                     batch_stats=net.batch_stats if batch_stats is None else batch_stats)


def init_net(params, batch_stats, tx: optax.GradientTransformation | None) -> NetState:
  """A network's state; `tx` None = a frozen network (no optimizer state)."""
  return NetState(params=params, batch_stats=batch_stats or {},
                  opt_state=tx.init(params) if tx is not None else ())


def flag_non_finite(old: TrainState, new: TrainState, values) -> TrainState:
  """`new` with `first_bad_step` set to this step if any of `values` (scalars: losses,
  gradient norms, parameter norms) is not finite and no earlier step was."""
  finite = jnp.all(jnp.isfinite(jnp.stack([jnp.asarray(v, jnp.float32) for v in values])))
  first_bad = jnp.where((old.first_bad_step == 0) & ~finite, old.step + 1, old.first_bad_step)
  return new.replace(first_bad_step=first_bad.astype(jnp.int32))


def state_norms(state: TrainState) -> list:
  """Norms of every parameter and statistic of a state (for `flag_non_finite`)."""
  out = [optax.tree.norm(state.params), optax.tree.norm(state.batch_stats)]
  for net in state.nets.values():
    out += [optax.tree.norm(net.params), optax.tree.norm(net.batch_stats)]
  return out


def split_dice(metrics: dict) -> dict:
  """A per-class `dice` vector as scalars dice_0 .. dice_{C-1} (the writers log scalars)."""
  metrics = dict(metrics)
  dice = metrics.pop("dice", None)
  if dice is not None:
    metrics.update({f"dice_{c}": dice[c] for c in range(dice.shape[0])})
  return metrics


def segmenter_variables(state: TrainState) -> dict:
  """The top-level network's variables: what most methods evaluate."""
  return {"params": state.params, "batch_stats": state.batch_stats}


def default_label(module, config) -> str:
  label = module.LABEL
  if config.augment.enabled:
    label += " + BigAug"
  return label
