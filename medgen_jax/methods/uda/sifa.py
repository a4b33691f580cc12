"""SIFA: synergistic image and feature adaptation (Chen, Dou, Chen, Qin, Heng; AAAI 2019 =
SIFA-v1, IEEE TMI 2020 = this default), from the released code cchen-cc/SIFA (master be5b792:
model.py, main.py, losses.py; methods.md §3.5).

Names as in the code: A = source (MR by default), B = target. Networks (models/sifa.py,
models/gan.py):
  g_A     ResNet generator A → B (config.gan; SIFA: ngf 32, 9 blocks, skip, zero padding)
  e_B     the shared encoder (BN), applied to real B and to translated A       } the top-level
  s_B     pixel classifier on e_B's latent; s_B_ll on latent_ll (deep sup.)  } network: evaluated
  de_B    decoder latent → A-like image, tanh(image + out) (IN)
  d_A     PatchGAN with 2 outputs: [0] real A vs fake A, [1] the auxiliary head (cycle A vs fake A)
  d_B     PatchGAN: real B vs fake B;  d_P, d_P_ll: PatchGANs on the B-side LOGITS (output space)
Forward (model.get_outputs): fake_B = g_A(x_A); z_B, z_B_ll = e_B(x_B); fake_A = de_B(z_B, x_B);
pred_B = s_B(z_B), pred_B_ll = s_B_ll(z_B_ll); z_fB, z_fB_ll = e_B(fake_B); cyc_A = de_B(z_fB,
fake_B); pred_fB = s_B(z_fB), pred_fB_ll = s_B_ll(z_fB_ll); cyc_B = g_A(fake_A).

Losses (main.py::compute_losses, TMI), LSG/LSD = LSGAN (losses/adversarial.py), cyc = 10·L1:
  G_A  (g_A)             cyc_A + cyc_B + LSG(d_B(fake_B))
  D_B  (d_B)             LSD(d_B(x_B), d_B(pool_B))
  Seg  (e_B, s_B, s_B_ll) WCE + Dice(pred_fB, y_A) + 1e-4·Σ½‖w‖² (every parameter, BN γ/β too)
                         + 0.1·[WCE + Dice](pred_fB_ll, y_A)                (`sifa.ll_seg_weight`)
                         + 0.1·G_B loss                                     (`sifa.gen_b_weight`)
                         + 0.1·LSG(d_P(pred_B)) + 0.01·LSG(d_P_ll(pred_B_ll))  (`mask_weight`, `mask_ll_weight`)
                         + 0.1·LSG(d_A.aux(fake_A))                         (`sifa.aux_weight`)
  G_B  (de_B)            cyc_A + cyc_B + LSG(d_A.img(fake_A))
  D_A  (d_A)             LSD(d_A.img(x_A), d_A.img(pool_A)) + LSD(d_A.aux(cyc_A), d_A.aux(pool_A))
  D_P  (d_P)             LSD(d_P(pred_fB), d_P(pred_B));  D_P_ll analogous with the ll heads
The seg loss reaches e_B through de_B and d_A's auxiliary head, but only e_B, s_B, s_B_ll move.

One trainer step = one SIFA iteration: the seven updates in the released order G_A → D_B → Seg →
G_B → D_A → D_P → D_P_ll, each a separate gradient with a fresh forward pass at the current
parameters (TF ran them as separate session.runs), all inside one jitted / pmapped function.
pool_B takes update 1's fake_B, pool_A update 4's fake_A (main.py feeds the fetched fakes through
fake_image_pool). Optimisers: Adam(`gan.learning_rate` 2e-4, b1 `gan.b1` 0.5) for g_A, de_B and
every discriminator, config.optimizer for the segmenter (SIFA's seg optimizer is Adam 2e-4 with
TF's default b1 0.9: the config sets it). No learning-rate decay in the TMI code.

SIFA-v1 (`sifa.deep_supervision=False`, configs/uda/sifa_v1.py): no s_B_ll / d_P_ll, 3 adjacent
slices as input (`data.context_slices=3`), dropout (`sifa.dropout` 0.25 = keep 0.75), w_P ramped
(0 before `sifa.mask_ramp_start`, linear to `mask_weight` at `mask_ramp_end`; the release: epochs
5 → 7), the segmenter's rate 1e-3 × 0.9 every 2 epochs.

Differences from the released code, on purpose:
* BatchNorm statistics of e_B move only in the Seg update (its two passes, x_B then fake_B),
  so each update changes exactly the networks it owns; TF's updates_collections=None moved them in
  every session.run that evaluated e_B (11 times per iteration). Every pass uses batch statistics
  (training mode), as TF's is_training=True. D_P and D_P_ll share one forward pass: nothing
  changes between them.
* v1 with 3-slice inputs: g_A and de_B output all 3 channels (skip on all), the discriminators and
  the cycle see all 3; the release used the middle slice for those.
* Intensities: each modality's training-data range mapped to [−1, 1] ('site_range', computed by
  code from the training cases, never the test cases); the release hand-edits min/max constants.
* Model selection: the last iteration (eval.selection='last'), never the release's best Dice on
  target training labels ('oracle' is available and labelled as such).
Architecture differences: models/sifa.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from medgen_jax import losses
from medgen_jax.methods import deepall
from medgen_jax.methods.base import device_mean, flag_non_finite, fold_device, init_net, state_norms, update_net
from medgen_jax.methods.uda import common, previews, translation
from medgen_jax.models.gan import PatchGAN
from medgen_jax.models.sifa import SIFADecoder, SIFASegmenter
from medgen_jax.train_state import TrainState, compute_dtype, create_train_state, make_optimizer

LABEL = "SIFA"
SAMPLER = "source_target"
DISCRIMINATORS = ("d_A", "d_B", "d_P", "d_P_ll")


def label(config, sources) -> str:
  return LABEL if config.sifa.deep_supervision else "SIFA w/o deep supervision"


def validate(config) -> None:
  c = config.sifa
  common.validate_target(config)
  translation.validate(config, label(config, ()))
  height, width = config.data.in_plane_shape
  if height % 8 or width % 8:
    raise ValueError(f"config.data.in_plane_shape={tuple(config.data.in_plane_shape)}: SIFA's encoder pools "
                     f"three times and its decoder upsamples back: height and width must be multiples of 8")
  if config.model.norm != "batch":
    raise ValueError(f"config.model.norm={config.model.norm!r}: SIFA's encoder uses BatchNorm (model.norm='batch')")
  if not 0.0 <= c.dropout < 1.0:
    raise ValueError(f"config.sifa.dropout={c.dropout}: a rate in [0, 1)")
  if c.mask_ramp_end and not 0 <= c.mask_ramp_start < c.mask_ramp_end:
    raise ValueError(f"config.sifa.mask_ramp_start/end=({c.mask_ramp_start}, {c.mask_ramp_end}): need "
                     f"0 <= start < end (or end = 0 for a constant weight)")


# --- Networks ------------------------------------------------------------------------------------


def segmenter(config, info, *, train: bool) -> SIFASegmenter:
  """e_B + s_B (+ s_B_ll): the top-level network; BN synchronised over devices when bn_sync."""
  sync = train and config.bn_sync and info.axis_name is not None
  return SIFASegmenter(num_classes=info.num_classes, base_features=config.sifa.encoder_features,
                       deep_supervision=config.sifa.deep_supervision, dropout_rate=config.sifa.dropout,
                       bn_axis_name=info.axis_name if sync else None, dtype=compute_dtype(config.dtype))


def decoder(config, info) -> SIFADecoder:
  c = config.sifa
  return SIFADecoder(features=c.decoder_features, num_blocks=c.decoder_blocks, out_channels=info.input_shape[-1],
                     skip=config.gan.skip, dtype=compute_dtype(config.dtype))


def discriminators(config):
  """{name: PatchGAN}: d_A with the auxiliary head, d_B, d_P and d_P_ll (on logits)."""
  c = config.gan
  make = lambda out: PatchGAN(features=c.disc_features, num_layers=c.disc_layers, out_features=out,
                              pad=c.disc_pad, use_bias=False, dtype=compute_dtype(config.dtype))
  nets = {"d_A": make(2), "d_B": make(1), "d_P": make(1)}
  if config.sifa.deep_supervision:
    nets["d_P_ll"] = make(1)
  return nets


def eval_network(config, info):
  return segmenter(config, info, train=False), lambda state: {"params": state.params,
                                                              "batch_stats": state.batch_stats}


def init_state(key, config, info) -> TrainState:
  tx = make_optimizer(config.optimizer, num_steps=config.num_steps)
  state = create_train_state(key, segmenter(config, info, train=False), tx, input_shape=(1, *info.input_shape))
  image = jnp.zeros((1, *info.input_shape), jnp.float32)
  latent = jax.eval_shape(lambda p: segmenter(config, info, train=False).apply(
      {"params": p, "batch_stats": state.batch_stats}, image, return_all=True)["latent"], state.params)
  logits = jnp.zeros((1, *info.input_shape[:2], info.num_classes), jnp.float32)
  keys = iter(jax.random.split(jax.random.fold_in(key, 7), 8))
  nets = {"g_A": translation.init_gan_net(next(keys), translation.generator(config), image, config)}
  de_B = decoder(config, info)
  params = jax.jit(lambda k: de_B.init(k, jnp.zeros(latent.shape, jnp.float32), image, train=False))(next(keys))
  nets["de_B"] = init_net(params["params"], {}, translation.gan_adam(config))
  for name, module in discriminators(config).items():
    nets[name] = translation.init_gan_net(next(keys), module, image if name in ("d_A", "d_B") else logits, config)
  pool_shape = (config.batch_size, *info.input_shape)
  nets.update(pool_A=translation.init_pool(config, pool_shape), pool_B=translation.init_pool(config, pool_shape))
  return state.replace(nets=nets)


# --- The forward graph ---------------------------------------------------------------------------


def mask_weight_at(config, step):
  """w_P: `sifa.mask_weight`, ramped from 0 between mask_ramp_start and mask_ramp_end (SIFA-v1)."""
  c = config.sifa
  if not c.mask_ramp_end:
    return jnp.asarray(c.mask_weight, jnp.float32)
  ramp = (jnp.asarray(step, jnp.float32) - c.mask_ramp_start) / (c.mask_ramp_end - c.mask_ramp_start)
  return c.mask_weight * jnp.clip(ramp, 0.0, 1.0)


class Graph:
  """SIFA's networks bound to one config: small pure helpers over explicit parameters."""

  def __init__(self, config, info):
    self.config, self.info = config, info
    self.gen = translation.generator(config)
    self.seg = segmenter(config, info, train=True)
    self.dec = decoder(config, info)
    self.discs = discriminators(config)

  def g_A(self, params, x):
    return self.gen.apply({"params": params}, x, train=True)

  def e_B(self, params, stats, x, key):
    """s_B / s_B_ll outputs and latents of a training-mode pass, and the new BN statistics."""
    out, updates = self.seg.apply({"params": params, "batch_stats": stats}, x, train=True, return_all=True,
                                  mutable=["batch_stats"], rngs={"dropout": key})
    return out, updates["batch_stats"]

  def de_B(self, params, latent, image):
    return self.dec.apply({"params": params}, latent, image, train=True)

  def d(self, name, params, x):
    return self.discs[name].apply({"params": params}, x, train=True)

  def forward(self, state: TrainState, batch, key, *, g_A=None, seg=None, de_B=None):
    """Every output of model.get_outputs at the state's parameters (or the given overrides, for a
    gradient); returns (outputs, BN statistics after the x_B pass then the fake_B pass)."""
    nets = state.nets
    g_A = nets["g_A"].params if g_A is None else g_A
    seg = state.params if seg is None else seg
    de_B = nets["de_B"].params if de_B is None else de_B
    key_b, key_fb = jax.random.split(key)
    x_A, x_B = batch["source"]["image"], batch["target"]["image"]
    fake_B = self.g_A(g_A, x_A)
    out_B, stats = self.e_B(seg, state.batch_stats, x_B, key_b)
    fake_A = self.de_B(de_B, out_B["latent"], x_B)
    out_fB, stats = self.e_B(seg, stats, fake_B, key_fb)
    cyc_A = self.de_B(de_B, out_fB["latent"], fake_B)
    cyc_B = self.g_A(g_A, fake_A)
    return {"fake_B": fake_B, "fake_A": fake_A, "cyc_A": cyc_A, "cyc_B": cyc_B, "pred_B": out_B["logits"],
            "pred_fB": out_fB["logits"], "pred_B_ll": out_B.get("logits_ll"),
            "pred_fB_ll": out_fB.get("logits_ll")}, stats

  def cycles(self, batch, out):
    w = self.config.gan.cycle_weight
    return (losses.cycle_loss(batch["source"]["image"], out["cyc_A"], weight=w)
            + losses.cycle_loss(batch["target"]["image"], out["cyc_B"], weight=w))


# --- The seven updates -----------------------------------------------------------------------------


def _apply(state, name, grads, config, info):
  grads = device_mean(grads, info.axis_name)
  return state.replace(nets=dict(state.nets, **{name: update_net(state.nets[name], translation.gan_adam(config), grads)})), grads


def _generator_update(state, batch, key, config, info, *, net: str, fake: str, judge):
  """One generator-side update of SIFA over nets[net] (g_A or de_B): both cycles + the LSGAN
  term `judge(graph, image)` on its fake image `fake`. Returns (state, loss, grads, fake)."""
  graph = Graph(config, info)

  def objective(params):
    out, _ = graph.forward(state, batch, key, **{net: params})
    return graph.cycles(batch, out) + losses.lsgan_generator_loss(judge(graph, out[fake])), out[fake]

  (loss, image), grads = jax.value_and_grad(objective, has_aux=True)(state.nets[net].params)
  state, grads = _apply(state, net, grads, config, info)
  return state, device_mean(loss, info.axis_name), grads, image


def g_A_update(state, batch, key, config, info):
  """1. G_A: cyc_A + cyc_B + LSG(d_B(fake_B)) over g_A. Returns (state, metrics, fake_B)."""
  state, loss, grads, fake_B = _generator_update(
      state, batch, key, config, info, net="g_A", fake="fake_B",
      judge=lambda graph, x: graph.d("d_B", state.nets["d_B"].params, x))
  return state, {"loss_g_A": loss, "g_A_grad_norm": optax.tree.norm(grads)}, fake_B


def d_B_update(state, batch, fake_B, key, config, info):
  """2. D_B: LSD(d_B(x_B), d_B(pool_B(fake_B)))."""
  graph = Graph(config, info)
  pool, fake = translation.pool_query(state.nets["pool_B"], fake_B, key, size=config.gan.pool_size,
                                      axis_name=info.axis_name)

  def objective(psi):
    return losses.lsgan_discriminator_loss(graph.d("d_B", psi, batch["target"]["image"]), graph.d("d_B", psi, fake))

  loss, grads = jax.value_and_grad(objective)(state.nets["d_B"].params)
  state = state.replace(nets=dict(state.nets, pool_B=pool))
  state, _ = _apply(state, "d_B", grads, config, info)
  return state, {"loss_d_B": device_mean(loss, info.axis_name)}


def l2_all(params, *, coefficient: float):
  """coefficient · Σ w²/2 over EVERY parameter of e_B, s_B, s_B_ll: the release sums tf.nn.l2_loss
  over all their trainable variables (main.py: `'/e_B/' in v.name or ...`), the BatchNorm γ and β
  included, not only the kernels (methods.md §1.7 says kernels: the code wins)."""
  return coefficient * sum(jnp.sum(jnp.square(w.astype(jnp.float32))) for w in jax.tree.leaves(params)) / 2.0


def seg_update(state, batch, key, config, info):
  """3. Seg: the segmenter (e_B, s_B, s_B_ll) on the seg loss of the module docstring (config.optimizer)."""
  c = config.sifa
  graph = Graph(config, info)
  nets = state.nets
  labels = batch["source"]["label"]

  def seg_terms(logits):
    loss, metrics = deepall.config_segmentation_loss(logits, labels, config.loss, num_classes=info.num_classes,
                                                     axis_name=info.axis_name)
    return loss, metrics

  def objective(params):
    out, stats = graph.forward(state, batch, key, seg=params)
    seg, metrics = seg_terms(out["pred_fB"])
    l2 = l2_all(params, coefficient=config.loss.weight_decay)
    d_A_fake = graph.d("d_A", nets["d_A"].params, out["fake_A"])
    g_B = graph.cycles(batch, out) + losses.lsgan_generator_loss(d_A_fake[..., 0])
    mask = losses.lsgan_generator_loss(graph.d("d_P", nets["d_P"].params, out["pred_B"]))
    aux = losses.lsgan_generator_loss(d_A_fake[..., 1])
    total = (seg + l2 + c.gen_b_weight * g_B + mask_weight_at(config, state.step) * mask + c.aux_weight * aux)
    extra = {}
    if c.deep_supervision:
      seg_ll, _ = seg_terms(out["pred_fB_ll"])
      mask_ll = losses.lsgan_generator_loss(graph.d("d_P_ll", nets["d_P_ll"].params, out["pred_B_ll"]))
      total = total + c.ll_seg_weight * seg_ll + c.mask_ll_weight * mask_ll
      extra = {"loss_seg_ll": seg_ll, "loss_mask_ll_adv": mask_ll}
    metrics = dict(metrics, **extra, loss=total, loss_seg=seg, loss_l2=l2, loss_seg_g_B=g_B,
                   loss_mask_adv=mask, loss_aux_adv=aux)
    return total, (metrics, stats)

  (_, (metrics, stats)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  tx = make_optimizer(config.optimizer, num_steps=config.num_steps)
  new, metrics = deepall.finish_step(state, tx, grads, metrics, stats, axis_name=info.axis_name,
                                     bn_sync=config.bn_sync and info.axis_name is not None)
  return new.replace(step=state.step), metrics     # the iteration's step + 1 comes at its end


def g_B_update(state, batch, key, config, info):
  """4. G_B: cyc_A + cyc_B + LSG(d_A.img(fake_A)) over de_B. Returns (state, metrics, fake_A)."""
  state, loss, grads, fake_A = _generator_update(
      state, batch, key, config, info, net="de_B", fake="fake_A",
      judge=lambda graph, x: graph.d("d_A", state.nets["d_A"].params, x)[..., 0])
  return state, {"loss_g_B": loss, "de_B_grad_norm": optax.tree.norm(grads)}, fake_A


def d_A_update(state, batch, fake_A, key, config, info):
  """5. D_A: LSD(d_A.img(x_A), d_A.img(pool_A)) + LSD(d_A.aux(cyc_A), d_A.aux(pool_A))."""
  graph = Graph(config, info)
  pool_key, forward_key = jax.random.split(key)
  pool, fake = translation.pool_query(state.nets["pool_A"], fake_A, pool_key, size=config.gan.pool_size,
                                      axis_name=info.axis_name)
  out, _ = graph.forward(state, batch, fold_device(forward_key, info.axis_name))
  cyc_A = jax.lax.stop_gradient(out["cyc_A"])

  def objective(psi):
    real, fake_out, cyc = (graph.d("d_A", psi, x) for x in (batch["source"]["image"], fake, cyc_A))
    return (losses.lsgan_discriminator_loss(real[..., 0], fake_out[..., 0])
            + losses.lsgan_discriminator_loss(cyc[..., 1], fake_out[..., 1]))

  loss, grads = jax.value_and_grad(objective)(state.nets["d_A"].params)
  state = state.replace(nets=dict(state.nets, pool_A=pool))
  state, _ = _apply(state, "d_A", grads, config, info)
  return state, {"loss_d_A": device_mean(loss, info.axis_name)}


def d_P_updates(state, batch, key, config, info):
  """6., 7. D_P: LSD(d_P(pred_fB), d_P(pred_B)); D_P_ll the same on the ll heads (one forward)."""
  graph = Graph(config, info)
  out, _ = graph.forward(state, batch, key)
  out = jax.lax.stop_gradient(out)
  metrics = {}
  pairs = [("d_P", "pred_fB", "pred_B")]
  if config.sifa.deep_supervision:
    pairs.append(("d_P_ll", "pred_fB_ll", "pred_B_ll"))
  for name, real, fake in pairs:
    def objective(psi):
      return losses.lsgan_discriminator_loss(graph.d(name, psi, out[real]), graph.d(name, psi, out[fake]))
    loss, grads = jax.value_and_grad(objective)(state.nets[name].params)
    state, _ = _apply(state, name, grads, config, info)
    metrics[f"loss_{name}"] = device_mean(loss, info.axis_name)
  return state, metrics


def iteration(state: TrainState, batch, key, config, info):
  """The seven updates in the released order; step + 1. `key`: the step's replicated key."""
  keys = jax.random.split(key, 8)
  local = [fold_device(k, info.axis_name) for k in keys]
  new, m1, fake_B = g_A_update(state, batch, local[0], config, info)
  new, m2 = d_B_update(new, batch, fake_B, keys[1], config, info)
  new, m3 = seg_update(new, batch, local[2], config, info)
  new, m4, fake_A = g_B_update(new, batch, local[3], config, info)
  new, m5 = d_A_update(new, batch, fake_A, keys[4], config, info)
  new, m6 = d_P_updates(new, batch, local[5], config, info)
  new = new.replace(step=state.step + 1)
  metrics = {**m1, **m2, **m3, **m4, **m5, **m6, "mask_weight": mask_weight_at(config, state.step)}
  checked = [v for k, v in metrics.items() if k.startswith("loss") or k.endswith("grad_norm")]
  return flag_non_finite(state, new, checked + state_norms(new)), metrics


def make_step(config, info):
  return lambda state, batch, key: iteration(state, batch, key, config, info)


def write_figures(config, data, state, out_dir):
  """translation_preview.png: x_A → fake_B (g_A), cyc_A = de_B(e_B(fake_B), fake_B), e_B + s_B on
  the target (inference mode)."""
  info = previews.RunInfo(num_classes=data.num_classes,
                          input_shape=(*config.data.in_plane_shape, config.data.context_slices))
  seg, dec = segmenter(config, info, train=False), decoder(config, info)
  variables = {"params": state.params, "batch_stats": state.batch_stats}

  def reconstruct(fake_B):
    latent = seg.apply(variables, fake_B, train=False, return_all=True)["latent"]
    return dec.apply({"params": state.nets["de_B"].params}, latent, fake_B, train=False)

  return previews.write_translation_preview(
      config, data, out_dir,
      translate=lambda x: translation.generator(config).apply({"params": state.nets["g_A"].params}, x, train=False),
      reconstruct=reconstruct, segment=previews.evaluated(eval_network, config, data, state))
