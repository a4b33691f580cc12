"""MS-Net: multi-site network with domain-specific BN and multi-site-guided knowledge transfer
(Liu, Dou, Yu, Heng, IEEE TMI 2020; released code liuquande/MS-Net `network.py`, `train.py`;
../shared/reference/methods.md §3.1). `config.method='msnet'`, keys in `config.msnet`.

Networks (models/msnet.py, this project's U-Net parts): a shared encoder E with DSBN (one
BatchNorm per training site, shared kernels), K auxiliary decoders A_k (site k's own kernels and
plain BatchNorm: each only ever sees site k) and one universal decoder U with DSBN. On site k's
samples x_k (labels y_k): p_aux_k = softmax(A_k(E(x_k; BN_k))), p_univ_k = softmax(U(E(x_k; BN_k); BN_k)).

Losses (the released `_get_segmentation_cost`; weights `student_hard_dice = student_soft_dice =
0.5`, per-site weights 1):

    L_teacher = Σ_k S(p_aux_k, y_k)
    L_student = Σ_k [ gt_weight · S(p_univ_k, y_k) + transfer_weight · S(p_univ_k, onehot(argmax p_aux_k)) ]

S = losses.segmentation_loss with config.loss on site k's samples (batch-level sums over that site
only): configs/multisite/msnet.py sets the released S = Dice-B alone (loss.ce_weight=0,
loss.dice_variant='linear'; methods.md §1.1). The knowledge-transfer target is the hard argmax of
the site's auxiliary prediction under `stop_gradient`: no gradient reaches the auxiliary decoders
through L_student. L2 on kernels: this project's explicit term (config.loss.weight_decay ·
Σ w²/2, §1.7) is added to each objective over the parameters its optimizer trains (E + A_k for
L_teacher, E + U for L_student) — the released code has no L2 (set loss.weight_decay=0 for it).

Step (the released train.py order, two `session.run`s per iteration):
  1. Adam_T on L_teacher w.r.t. {E (kernels and every site's DSBN scale/bias), A_1..A_K};
  2. if step >= msnet.warmup_steps (released: 500; the teachers warm up first): Adam_S on
     L_student w.r.t. {E, U}, with the forward RECOMPUTED at the parameters produced by 1 —
     including the auxiliary argmax targets.
Two optax states over overlapping parameter sets: `state.opt_state` = Adam_T over {encoder,
teachers_k}, `state.task_opt_state` = Adam_S over {encoder, student}; a state's parameters outside
its optimizer's set are left bit-identical by construction. Both optimizers are config.optimizer
(released: Adam 1e-3, one learning-rate variable ×0.95 every 500 iterations for both:
optimizer.schedule='exponential'); Adam_S's learning rate is read at the global step (its schedule
count starts at warmup_steps: TF's one `learning_rate_node`) while its moment bias correction counts
its own updates (TF: each AdamOptimizer's own beta powers). The two phases (teacher warm-up, then
both updates) are two pure steps (methods/base.Phases), not a lax.cond.

Per-site branches and BatchNorm (§1.8): the pooled batch is domain-balanced; A_k runs on site k's
rows only (models/domains.group_by_domain), so its BatchNorm statistics and its loss are those of
site k; E's and U's DSBN normalize each site's samples with that site's statistics. Every forward
pass runs BatchNorm in training mode and updates the running statistics it touches, as TF's
`updates_collections=None` does: E's and the A_k's in both passes (the student pass computes the
auxiliary targets with train-mode BN too), U's in the student pass.

Data parallelism: as deepall.finish_step — the Dice sums run over the global batch
(losses.global_sum), gradients and metrics are averaged over devices; `bn_sync` makes every
BatchNorm's statistics global (DSBN: psum'd per-site sums; A_k: pmean over the devices' site-k
rows, equal in number on every device); without it the statistics are averaged after the step.

Evaluation: the universal branch is deployed (`eval_network`: E + U with the test site's DSBN,
label "MS-Net"); `msnet.eval_branch='auxiliary'` evaluates E + A_k of the test site k instead
("MS-Net (auxiliary)"); an unseen site gets the DSBN mean and the ensemble of the K auxiliary
decoders (mean softmax) under model.unseen_domain='average', an error under 'refuse'. The released
test reports both branches of one checkpoint; so does a run: <workdir>/results.* hold the branch
of msnet.eval_branch, and `write_figures` (the trainer calls it on model <name>'s selected state)
scores the OTHER branch of that same state on the test cases of every site into
<workdir>/<name>/results_auxiliary.{md,csv,json} (rows "MS-Net (auxiliary)"; results_universal.*,
rows "MS-Net", when eval_branch='auxiliary'). That table is Dice only, whatever eval.distances
says (the talk's MS-Net table reports Dice; ASSD/HD95 would double the final evaluation's cost).
For the other branch with distances, or on a run trained before write_figures existed, score it
from the checkpoints without retraining (writes <workdir>/results_auxiliary.*; results.* stay the
universal branch's):

    python -c "
    from pathlib import Path
    from medgen_jax import evaluation, runs
    from medgen_jax.data.pipeline import prepare_data
    w = Path('runs/multisite/msnet'); c = runs.load_run_config(w); c.msnet.eval_branch = 'auxiliary'
    d = prepare_data(c.data, run_dir=w, build_train=False)
    t = evaluation.restore_models(c, w, num_classes=d.num_classes, sources=d.sources)
    print(evaluation.evaluate_models(c, d, t, w, results_name='results_auxiliary')['markdown'])"

(`python -m medgen_jax.evaluate` overrides only --selection.)

Metrics: loss (= loss_teacher in the warm-up, loss_teacher + loss_student after), loss_teacher,
loss_student, loss_gt and loss_transfer (Σ_k S against the labels / the auxiliary argmax),
teacher_grad_norm, student_grad_norm, phase (0 warm-up, 1 both updates).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medgen_jax import augment, losses
from medgen_jax.methods.base import (Phases, device_mean, flag_non_finite, fold_device,
                                     segmenter_variables, state_norms)
from medgen_jax.methods import deepall
from medgen_jax.methods.deepall import bn_synced
from medgen_jax.models.domains import group_by_domain
from medgen_jax.models.msnet import BRANCHES, MSNet, parts, teacher_name
from medgen_jax.train_state import TrainState, compute_dtype, create_train_state, make_optimizer

LABEL = "MS-Net"
SAMPLER = "pooled"
GROUPS_BY_DOMAIN = True   # per-site teachers split each device shard (trainer checks balance)


def label(config, sources) -> str:
  base = LABEL if config.msnet.eval_branch == "universal" else f"{LABEL} (auxiliary)"
  return base + (" + BigAug" if config.augment.enabled else "")


def uses_domains(config) -> bool:
  """The evaluated network picks the test site's DSBN (and, auxiliary, its decoder)."""
  return True


def validate(config) -> None:
  c = config.msnet
  if c.eval_branch not in BRANCHES:
    raise ValueError(f"config.msnet.eval_branch: unknown branch {c.eval_branch!r}; use universal "
                     "(the deployed universal decoder) | auxiliary (each site's auxiliary decoder)")
  if not 0 <= c.warmup_steps < config.num_steps:
    raise ValueError(f"config.msnet.warmup_steps={c.warmup_steps}: the universal decoder (the deployed "
                     f"network) trains only after the teacher warm-up, which must end before num_steps "
                     f"({config.num_steps}): use 0 <= msnet.warmup_steps < num_steps")
  if c.gt_weight < 0 or c.transfer_weight < 0 or c.gt_weight + c.transfer_weight == 0:
    raise ValueError(f"config.msnet: gt_weight={c.gt_weight}, transfer_weight={c.transfer_weight}: "
                     "weights of the student's two terms must be >= 0 and not both 0 (released: 0.5, 0.5)")
  if config.model.norm != "dsbn":
    raise ValueError(f"config.model.norm={config.model.norm!r}: MS-Net's shared encoder and universal "
                     "decoder have per-site BatchNorm by design (its auxiliary decoders plain BatchNorm): "
                     "set model.norm='dsbn'")


# --- Networks and optimizers ----------------------------------------------------------------------


def network(config, info, *, train: bool, branch: str = "universal") -> MSNet:
  """MSNet with config.model's U-Net widths, one domain per training site (info.domains); for
  training, BatchNorm synchronized over the data-parallel axis when `config.bn_sync`."""
  m = config.model
  return MSNet(num_classes=info.num_classes, num_domains=info.num_domains, base_features=m.base_features,
               depth=m.depth, dropout=m.dropout,
               bn_axis_name=info.axis_name if train and bn_synced(config, info) else None,
               dtype=compute_dtype(config.dtype), fast_ops=m.fast_ops, branch=branch)


def teacher_path(num_domains: int) -> tuple[str, ...]:
  """The parameters Adam_T trains: the shared encoder and every auxiliary decoder."""
  return ("encoder",) + tuple(teacher_name(k) for k in range(num_domains))


STUDENT_PATH = ("encoder", "student")   # what Adam_S trains


def subset(tree, names):
  return {name: tree[name] for name in names}


def start_schedule_at(opt_state, step: int):
  """`opt_state` whose learning-rate schedule(s) start at `step` (every optax
  ScaleByScheduleState count set to it): Adam_S then reads the learning rate at the global step
  although it first updates at msnet.warmup_steps; its Adam moment count stays its own."""
  is_schedule = lambda s: isinstance(s, optax.ScaleByScheduleState)
  return jax.tree.map(lambda s: s._replace(count=jnp.asarray(step, s.count.dtype)) if is_schedule(s) else s,
                      opt_state, is_leaf=is_schedule)


def init_msnet_state(key, model: MSNet, teacher_tx, student_tx, *, input_shape, student_start: int = 0) -> TrainState:
  """MSNet's variables from `key` (create_train_state's init and rng split), Adam_T's state over
  teacher_path in `opt_state`, Adam_S's over STUDENT_PATH in `task_opt_state`."""
  state = create_train_state(key, model, optax.identity(), input_shape=input_shape)
  return state.replace(
      opt_state=teacher_tx.init(subset(state.params, teacher_path(model.num_domains))),
      task_opt_state=start_schedule_at(student_tx.init(subset(state.params, STUDENT_PATH)), student_start))


def optimizers(config):
  """(Adam_T, Adam_S): config.optimizer twice (the released code: two AdamOptimizers on one
  learning-rate variable)."""
  return (make_optimizer(config.optimizer, num_steps=config.num_steps),
          make_optimizer(config.optimizer, num_steps=config.num_steps))


# --- Losses ---------------------------------------------------------------------------------------


def site_loss(logits, labels, loss_config, *, num_classes: int, axis_name: str | None = None):
  """S(p, y) on one site's samples: config.loss's CE + Dice, sums over those samples only (and
  over devices with `axis_name`). Returns (loss, per-class Dice)."""
  loss, metrics = deepall.config_segmentation_loss(logits, labels, loss_config, num_classes=num_classes,
                                                   axis_name=axis_name)
  return loss, metrics["dice"]


def teacher_loss(aux_logits, labels, loss_config, *, num_classes: int, axis_name: str | None = None):
  """L_teacher = Σ_k S(A_k logits, y_k); inputs grouped by site [K, n, H, W(, C)]."""
  return sum(site_loss(aux_logits[k], labels[k], loss_config, num_classes=num_classes,
                       axis_name=axis_name)[0] for k in range(aux_logits.shape[0]))


def transfer_loss(univ_logits, aux_logits, labels, loss_config, *, num_classes: int, gt_weight: float,
                  transfer_weight: float, axis_name: str | None = None):
  """L_student = Σ_k [gt_weight · S(univ_k, y_k) + transfer_weight · S(univ_k, argmax aux_k)] with
  the argmax under stop_gradient; inputs grouped by site [K, n, H, W(, C)].
  Returns (L_student, {'loss_gt': Σ_k S(univ_k, y_k), 'loss_transfer': Σ_k S(univ_k, argmax aux_k)})."""
  targets = jnp.argmax(jax.lax.stop_gradient(aux_logits), axis=-1)
  gt = transfer = 0.0
  for k in range(univ_logits.shape[0]):
    gt += site_loss(univ_logits[k], labels[k], loss_config, num_classes=num_classes, axis_name=axis_name)[0]
    transfer += site_loss(univ_logits[k], targets[k], loss_config, num_classes=num_classes,
                          axis_name=axis_name)[0]
  return gt_weight * gt + transfer_weight * transfer, {"loss_gt": gt, "loss_transfer": transfer}


# --- Forward passes (training mode) ----------------------------------------------------------------


def make_forward(model: MSNet):
  """(encode, auxiliary, universal): MSNet's parts applied in training mode, each returning the
  BatchNorm statistics it updated merged into the whole `batch_stats` tree."""
  encoder, teacher, student = parts(model)
  num_domains = model.num_domains

  def encode(params, stats, images, domain, key):
    features, updates = encoder.apply({"params": params["encoder"], "batch_stats": stats["encoder"]},
                                      images, train=True, domain=domain, rngs={"dropout": key},
                                      mutable=["batch_stats"])
    return features, dict(stats, encoder=updates["batch_stats"])

  def auxiliary(params, stats, features, domain):
    """Site k's decoder on site k's rows: logits [K, B/K, H, W, C] (rows grouped by site)."""
    grouped = group_by_domain(features, domain, num_domains)
    stats, logits = dict(stats), []
    for k in range(num_domains):
      name = teacher_name(k)
      out, updates = teacher.apply({"params": params[name], "batch_stats": stats[name]},
                                   jax.tree.map(lambda a: a[k], grouped), train=True, mutable=["batch_stats"])
      logits.append(out)
      stats[name] = updates["batch_stats"]
    return jnp.stack(logits), stats

  def universal(params, stats, features, domain):
    """The universal decoder on the whole batch (DSBN by site): logits [K, B/K, H, W, C]."""
    out, updates = student.apply({"params": params["student"], "batch_stats": stats["student"]},
                                 features, train=True, domain=domain, mutable=["batch_stats"])
    return group_by_domain(out, domain, num_domains), dict(stats, student=updates["batch_stats"])

  return encode, auxiliary, universal


def make_objectives(model: MSNet, config, *, num_classes: int, axis_name: str | None = None):
  """(teacher_objective, student_objective), each f(params, batch_stats, batch, key) ->
  (loss, (metrics, new batch_stats)) of the WHOLE MSNet parameter tree (the gradient of the
  parameters an objective does not train is zero: absent from it, or behind the argmax)."""
  encode, auxiliary, universal = make_forward(model)
  k = model.num_domains
  teachers, c = teacher_path(k), config.msnet

  def teacher_objective(params, stats, batch, key):
    features, stats = encode(params, stats, batch["image"], batch["domain"], key)
    aux, stats = auxiliary(params, stats, features, batch["domain"])
    labels = group_by_domain(batch["label"], batch["domain"], k)
    seg = teacher_loss(aux, labels, config.loss, num_classes=num_classes, axis_name=axis_name)
    l2 = losses.l2_kernel_loss(subset(params, teachers), coefficient=config.loss.weight_decay)
    return seg + l2, ({"loss_teacher": seg + l2}, stats)

  def student_objective(params, stats, batch, key):
    features, stats = encode(params, stats, batch["image"], batch["domain"], key)
    aux, stats = auxiliary(params, stats, features, batch["domain"])
    univ, stats = universal(params, stats, features, batch["domain"])
    labels = group_by_domain(batch["label"], batch["domain"], k)
    seg, parts_ = transfer_loss(univ, aux, labels, config.loss, num_classes=num_classes,
                                gt_weight=c.gt_weight, transfer_weight=c.transfer_weight, axis_name=axis_name)
    l2 = losses.l2_kernel_loss(subset(params, STUDENT_PATH), coefficient=config.loss.weight_decay)
    return seg + l2, (dict(parts_, loss_student=seg + l2), stats)

  return teacher_objective, student_objective


# --- The step -------------------------------------------------------------------------------------


def make_updates(model: MSNet, teacher_tx, student_tx, config, *, num_classes: int,
                 axis_name: str | None = None, bn_sync: bool = True):
  """(teacher_update, student_update), each (state, batch, key) -> (state, metrics): one
  optimizer update of its parameter set (the others bit-identical), gradients and metrics
  averaged over devices; the step counter is not advanced."""
  teacher_objective, student_objective = make_objectives(model, config, num_classes=num_classes,
                                                         axis_name=axis_name)

  def update(objective, names, tx, opt_state, state, batch, key):
    (_, (metrics, stats)), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params, state.batch_stats, batch, key)
    grads = device_mean(subset(grads, names), axis_name)
    metrics = device_mean(metrics, axis_name)
    if axis_name is not None and not bn_sync:   # keep the replicated state identical
      stats = jax.lax.pmean(stats, axis_name)
    trained = subset(state.params, names)
    updates, opt_state = tx.update(grads, opt_state, trained)
    params = dict(state.params, **optax.apply_updates(trained, updates))
    return state.replace(params=params, batch_stats=stats), opt_state, metrics, optax.tree.norm(grads)

  def teacher_update(state, batch, key):
    new, opt_state, metrics, norm = update(teacher_objective, teacher_path(model.num_domains), teacher_tx,
                                           state.opt_state, state, batch, key)
    return new.replace(opt_state=opt_state), dict(metrics, teacher_grad_norm=norm)

  def student_update(state, batch, key):
    new, opt_state, metrics, norm = update(student_objective, STUDENT_PATH, student_tx,
                                           state.task_opt_state, state, batch, key)
    return new.replace(task_opt_state=opt_state), dict(metrics, student_grad_norm=norm)

  return teacher_update, student_update


def phase_at(step, warmup_steps: int):
  """0 = teacher warm-up, 1 = teacher then student update, at (0-based) step `step` (traced inside
  a step function; a plain integer on the host, computed with numpy)."""
  xp = jnp if isinstance(step, jax.core.Tracer) else np
  return (xp.asarray(step) >= warmup_steps).astype(xp.int32)


def make_train_step(model: MSNet, teacher_tx, student_tx, config, *, num_classes: int,
                    axis_name: str | None = None, bn_sync: bool = True) -> Phases:
  """Phases (warm-up step, full step), switching at config.msnet.warmup_steps; see the module
  docstring for the order. With config.augment enabled, both updates of a step see the same
  augmented batch (TF fed the same arrays to both session.runs)."""
  teacher_update, student_update = make_updates(model, teacher_tx, student_tx, config,
                                                num_classes=num_classes, axis_name=axis_name, bn_sync=bn_sync)

  def prepare(batch, key):
    rows, sites = batch["image"].shape[0], model.num_domains
    if rows % sites:
      raise ValueError(f"MS-Net runs each site's auxiliary decoder on that site's slices: a device's batch of "
                       f"{rows} cannot hold the {sites} sites equally. Fix: make config.batch_size a "
                       f"multiple of {sites} sites x the number of devices")
    key = fold_device(key, axis_name)
    augment_key, teacher_key, student_key = jax.random.split(key, 3)
    return augment.maybe_augment(augment_key, batch, config.get("augment")), teacher_key, student_key

  def finish(old, new, metrics, checked, phase):
    new = new.replace(step=old.step + 1)
    metrics = dict(metrics, phase=jnp.asarray(phase, jnp.int32))
    return flag_non_finite(old, new, [metrics[name] for name in checked] + state_norms(new)), metrics

  def warmup_step(state: TrainState, batch, key):
    batch, teacher_key, _ = prepare(batch, key)
    new, metrics = teacher_update(state, batch, teacher_key)
    metrics = dict(metrics, loss=metrics["loss_teacher"])
    return finish(state, new, metrics, ("loss", "teacher_grad_norm"), 0)

  def full_step(state: TrainState, batch, key):
    batch, teacher_key, student_key = prepare(batch, key)
    new, teacher_metrics = teacher_update(state, batch, teacher_key)
    new, student_metrics = student_update(new, batch, student_key)   # forward recomputed at the new params
    metrics = dict(teacher_metrics, **student_metrics,
                   loss=teacher_metrics["loss_teacher"] + student_metrics["loss_student"])
    return finish(state, new, metrics, ("loss", "teacher_grad_norm", "student_grad_norm"), 1)

  warmup = config.msnet.warmup_steps
  return Phases((warmup_step, full_step), lambda step: phase_at(step, warmup))


# --- The method interface (methods/base.py) ------------------------------------------------------


def init_state(key, config, info) -> TrainState:
  teacher_tx, student_tx = optimizers(config)
  return init_msnet_state(key, network(config, info, train=False), teacher_tx, student_tx,
                          input_shape=(1, *info.input_shape), student_start=config.msnet.warmup_steps)


def make_step(config, info):
  teacher_tx, student_tx = optimizers(config)
  return make_train_step(network(config, info, train=True), teacher_tx, student_tx, config,
                         num_classes=info.num_classes, axis_name=info.axis_name,
                         bn_sync=bn_synced(config, info))


def eval_network(config, info):
  """E + U (universal, deployed) or E + A_k (auxiliary), by config.msnet.eval_branch."""
  return network(config, info, train=False, branch=config.msnet.eval_branch), segmenter_variables


def other_branch(config) -> str:
  """The branch a run does not report in results.* (write_figures scores it)."""
  return "auxiliary" if config.msnet.eval_branch == "universal" else "universal"


def write_figures(config, data, state, out_dir) -> dict:
  """The other branch's table (module docstring): the branch that config.msnet.eval_branch does
  not evaluate, on the same selected `state`, scored on the test cases of every site (the sites
  the model trained on "in-domain", any other "unseen", as evaluation.evaluate_models does),
  Dice only. Writes `out_dir`/results_<branch>.{md,csv,json}; returns {'records', 'markdown'}."""
  from medgen_jax import evaluation, methods, report   # evaluation imports the method registry
  from medgen_jax.paths import as_path, write_bytes_atomic
  out_dir = as_path(out_dir)
  branch = other_branch(config)
  other = config.copy_and_resolve_references()
  other.msnet.eval_branch = branch
  sources = dict(methods.model_runs(config, data.sources)).get(out_dir.name, list(data.sources))
  step = int(state.step)
  trained = evaluation.trained_model(other, data.num_classes, state, name=out_dir.name, sources=sources,
                                     step=step)
  predict, domain_of = trained.predictor()
  records = evaluation.evaluate_cases(
      predict, trained.variables, data.cases["test"], normalizer=data.normalizer, data_config=config.data,
      num_classes=data.num_classes, batch_size=config.eval.batch_size, distances=False,
      method=evaluation.method_label(other, trained), domain_of=domain_of,
      role_of=lambda site: "in-domain" if site in sources else "unseen")
  class_names = [data.info.labels[k] for k in sorted(data.info.labels) if k]
  notes = [f"MS-Net's {branch} branch of the state that results.md scores with its {config.msnet.eval_branch} "
           f"branch ({out_dir.name}: step {step}, selection rule {config.eval.selection}); Dice only "
           f"(methods/multisite/msnet.py gives the command that adds the distances)",
           f"method {config.method}, sources {sources}, held out {data.held_out or 'none'}",
           f"{config.num_steps} steps, batch {config.batch_size}, {config.data.in_plane_shape} slices, "
           f"normalization {config.data.normalization.name}, seed {config.seed}"]
  markdown = report.markdown_report(records, sites=sorted(data.cases["test"]), class_names=class_names,
                                    title=f"medgen_jax results, MS-Net {branch} branch", notes=notes)
  out_dir.mkdir(parents=True, exist_ok=True)
  name = f"results_{branch}"
  write_bytes_atomic(out_dir / f"{name}.md", (markdown + "\n").encode())
  write_bytes_atomic(out_dir / f"{name}.csv", report.records_csv(records).encode())
  write_bytes_atomic(out_dir / f"{name}.json", json.dumps(
      {"branch": branch, "selection": config.eval.selection, "steps": {out_dir.name: step},
       "records": records}, indent=1).encode())
  return {"records": records, "markdown": markdown}
