"""The base experiment config. Every `configs/*.py` starts from `base_config()` and overrides.

Configs are locked by the CLI: a misspelt key (`--config.optimiser.lr=...`) fails with a message
naming the close matches instead of being ignored.
"""

from __future__ import annotations

import ml_collections

from medgen_jax import methods
from medgen_jax.augment import default_augment_config
from medgen_jax.data.pipeline import default_data_config
from medgen_jax.models.unet3d import check_levels

METHODS = tuple(methods.MODULES)
SELECTIONS = ("val", "last", "oracle")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "deepall"          # a name of medgen_jax/methods (METHODS): deepall (= Joint), separate, ...
  c.seed = 0                    # init, dropout and data-sampling seed
  c.data = default_data_config()

  c.model = ml_collections.ConfigDict({
      "name": "unet", "base_features": 16, "depth": 4, "dropout": 0.0,
      "norm": "batch",          # batch | instance | group | dsbn (per-domain BN) | none
      "fast_ops": True,         # same math, XLA:CPU-friendly layers (see models/unet.py)
      # Domain-specific layers (DSBN, adapters, MS-Net, UMMKD) at a site the model was not
      # trained on: 'average' = the mean of the trained domains' parameters and statistics;
      # 'refuse' = an error before training/prediction (models/domains.py).
      "unseen_domain": "average",
      # Domain-specific parts on the shared U-Net, one set per training site (models/adapters.py;
      # methods deepall/separate): adapter none | series | parallel = a residual adapter at every
      # 3x3 conv (Rebuffi et al. 2017 / 2018; zero-initialized; use with norm 'dsbn'); se none |
      # shared | domain = squeeze-and-excitation (Hu et al.) after every block of se_blocks
      # (encoder | encoder_decoder: Enc / Enc-Dec USE-Net, Rundo et al.) with reduction ratio
      # se_reduction; 'domain' = one SE per site (the talk's USE-Net row).
      "adapter": "none", "se": "none", "se_reduction": 8, "se_blocks": "encoder_decoder",
      # model.name='unet3d' (3-D patches, data.patch_size; models/unet3d.py): per level a (D, H, W)
      # pool size of 1 or 2 (depth entries) and odd kernel sizes (depth + 1: the last is the
      # bottleneck's), e.g. ((1, 2, 2), ...) and ((1, 3, 3), ...) for thick slices; () = 2 and 3
      # everywhere. models/unet3d.plan_pooling derives both from the spacing (nnU-Net's rule).
      "pool_sizes": (), "kernel_sizes": ()})

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

  c.batch_size = 12               # global slices per step (episodic methods: split evenly over
                                  # the meta-train + meta-test domains of the step)
  c.num_steps = 2000
  c.dtype = "float32"             # compute dtype: float32 | bfloat16 (params stay float32)
  c.bn_sync = True                # BatchNorm statistics over all devices (else per device)

  c.log_every = 50
  c.eval_every = 500              # validation (source val cases) + checkpoint with metrics
  c.checkpoint = ml_collections.ConfigDict({"every": 500, "keep": 3, "async_save": False})
  c.eval = ml_collections.ConfigDict({
      "batch_size": 32,           # slices (3-D: patches) per inference batch
      "overlap": 0.5,             # 3-D: sliding-window overlap (inference.sliding_window_predict)
      "selection": "val",         # val (source-site validation) | last | oracle (target labels!)
      "distances": True})         # ASD/HD95 in the final evaluation
  c.progress_bar = True

  # Episodic meta-learning (mldg, masf, saml): meta.py, methods/*.py.
  c.meta = ml_collections.ConfigDict({
      "meta_train_domains": 2, "meta_test_domains": 1,
      "inner_lr": 1e-3,           # α of θ' = θ − α·clip(∇L_tr)
      "beta": 1.0,                # MLDG's weight of the meta-test loss
      "first_order": False,       # True: stop the gradient through the inner gradient
      "clip": 0.0,                # per-tensor norm clip of the inner gradient (0 = off)
      # How θ's two gradients (task ∇L_tr(θ), meta ∇_θ outer(θ')) are applied (methods/episodic.py):
      # summed: one optimizer on their sum | released (MASF, SAML as released): config.optimizer
      # on the clipped meta gradient + a task optimizer (same kind, task_learning_rate) on the task
      # gradient, updates summed.
      "optimizers": "summed",
      "task_learning_rate": 0.0,  # released: the task optimizer's rate (0 = optimizer.learning_rate)
      "outer_clip": 0.0,          # per-tensor norm clip of the meta gradient (0 = off)
      "per_domain_bn": False})    # True: BN statistics per domain in every forward pass (TF code)
  c.masf = ml_collections.ConfigDict({
      "global_weight": 1.0, "local_weight": 0.005, "temperature": 2.0,
      "alignment_variant": "talk",  # talk | masf_code
      "metric_loss": "triplet",     # triplet (semi-hard) | contrastive
      "margin": 10.0, "metric_lr": 1e-3, "metric_features": (32, 16)})
  c.saml = ml_collections.ConfigDict({
      "compactness_weight": 1.0, "smoothness_weight": 0.005,
      "perimeter_scale": 0.01, "compactness_reduction": "sum",   # released code's details
      "metric_loss": "triplet", "margin": 10.0, "metric_lr": 1e-3, "metric_features": (24, 16)})
  # Epi-FCR (methods/epi_fcr.py): domain-specific U-Nets (θ_k, ψ_k) trained every
  # step; the evaluated aggregated U-Net (θ, ψ) on Σ_k S + epir_weight·(fixed random decoder on θ)
  # + epic_weight·(ψ on site j's fixed encoder) + epif_weight·(θ with site j's fixed decoder), on a
  # random site i ≠ j each step; for the first `warmup_steps` steps the aggregated model trains on
  # Σ_k S alone (released run_main_epi_fcr.sh: 2.0 / 0.05 / 0.1, `ite <= 500` = 501 steps).
  c.epi_fcr = ml_collections.ConfigDict({
      "epif_weight": 2.0, "epic_weight": 0.05, "epir_weight": 0.1, "warmup_steps": 501})
  # LatReg (methods/latreg.py; Aslani et al., ISBI 2020): a site classifier
  # (flatten or spatial `pool` -> `num_layers` x Dense(`hidden`)+ReLU -> Dense(sites)) on U-Net
  # block `level`; loss L_seg + weight*L_reg, `loss` = uniform (CE to the uniform site
  # distribution; released weight 0.3) | randomized (CE to a random site per slice; 0.1) |
  # correlation (squared Pearson r of one-hot site and prediction; 0.2) | adversarial (not
  # released: site CE through gradient reversal scaled by `reversal_scale`).
  c.latreg = ml_collections.ConfigDict({
      "loss": "uniform", "weight": 0.3, "level": "bottleneck", "pool": "flatten", "hidden": 1024,
      "num_layers": 2, "reversal_scale": 1.0})
  # MetaReg (methods/metareg.py): the first round(meta_fraction * num_steps) steps
  # meta-train (F + one decoder per site, φ by ∂L_b/∂φ through inner_steps (l) regularized SGD
  # steps at inner_lr (α)); φ (one weight per decoder parameter, init phi_init, projected on φ >= 0
  # when phi_nonnegative) takes meta_optimizer sgd | adam at meta_lr; then the final F + decoder
  # train on L + Σ φ|θ|, the decoder from final_task_init scratch | mean (of the site decoders).
  c.metareg = ml_collections.ConfigDict({
      "meta_fraction": 0.5, "inner_steps": 1, "inner_lr": 1e-3, "meta_optimizer": "sgd",
      "meta_lr": 1.0, "phi_init": 0.0, "phi_nonnegative": True, "final_task_init": "scratch"})
  # MS-Net (methods/multisite/msnet.py; needs model.norm='dsbn'): shared DSBN encoder, one
  # auxiliary decoder per site (Adam_T on Σ_k S(aux_k, y_k)) and the universal DSBN decoder
  # (Adam_S on Σ_k gt_weight·S(univ_k, y_k) + transfer_weight·S(univ_k, argmax aux_k)), the
  # student starting after `warmup_steps` teacher-only steps (released: 500).
  c.msnet = ml_collections.ConfigDict({
      "warmup_steps": 500, "gt_weight": 0.5, "transfer_weight": 0.5,
      "eval_branch": "universal"})   # universal (deployed: "MS-Net") | auxiliary (site's own decoder)
  c.augment = default_augment_config()   # BigAug, any method
  # UMMKD (methods/multisite/ummkd.py): per-modality CE + Dice, + kd_weight · KD on class-wise
  # mean logits (T, symmetric KL, /C), one network whose `shared` part all modalities share:
  # all = Chilopod (kernels shared; BN per modality with model.norm='dsbn') | decoder = Y-shaped |
  # middle = X-shaped | encoder = inverse-Y (models/multimodal.py).
  c.ummkd = ml_collections.ConfigDict({
      "kd_weight": 0.5, "temperature": 2.0,
      "kd_class_mask": False,     # True: classes absent from either modality's batch add 0 (MASF's
                                  # mask); False: the released loss, every class incl. absent ones
      "shared": "all"})

  # Unsupervised domain adaptation (methods/uda/*.py): the target is data.held_out, whose
  # train+val cases are seen WITHOUT labels when data.target_adaptation=True. Discriminator /
  # critic inputs are U-Net blocks by name: down0..down{depth-1}, bottleneck, up{depth-1}..up0.
  c.dann = ml_collections.ConfigDict({
      "weight": 1.0,              # domain loss weight; the reversal scale follows λ_p = 2/(1+e^{-γp}) − 1
      "gamma": 10.0, "level": "bottleneck",
      "disc_features": 32, "disc_layers": 3, "disc_lr": 1e-3})
  c.adda = ml_collections.ConfigDict({
      "pretrain_steps": 1000,     # supervised source training first; then the target encoder adapts
      "level": "bottleneck", "disc_features": 32, "disc_layers": 3,
      "learning_rate": 2e-4, "b1": 0.5})   # ADDA's Adam for D and the target encoder
  c.adaoutput = ml_collections.ConfigDict({
      "weight": 0.001,            # λ_adv on the final output (Tsai et al.)
      "multi_level": False, "aux_level": "up1", "aux_weight": 0.0002, "seg_aux_weight": 0.1,
      "disc_features": 64, "disc_lr": 1e-4, "disc_b1": 0.9, "disc_b2": 0.99,
      # > 0: the released code's "poly" decay, both rates x (1 - step/num_steps)^power (the
      # segmenter's then needs optimizer.schedule='constant'); 0: config.optimizer's schedule, constant D rate
      "poly_power": 0.0})
  c.pnp = ml_collections.ConfigDict({
      "pretrain_steps": 1000,     # stage 1: the source segmenter
      "critic_warmup_steps": 200, # stage 2a: critics only (generator frozen, mask weight 0)
      "critic_steps": 20,         # stage 2b: per cycle, this many critic steps then one DAM step
      "critic_steps_growth_every": 300,  # +1 critic step per cycle every this many cycles (released); 0 = off
      "adapt_levels": 2,          # the DAM: the target copy of encoder blocks down0..down{k-1}
      "levels": ("down1", "down2", "bottleneck"),   # the feature critic's multi-level input (pooled
                                  # to the coarsest of them, + the pooled softmax)
      "mask_weight": 0.3, "mu": 0.002, "clip": 0.03, "weight_decay": 1e-4,
      "learning_rate": 3e-4,      # RMSProp of the critics and the DAM
      "rmsprop_initial_scale": 1.0,  # RMSProp's mean square starts here: 1 = TF1 (released), 0 = optax/PyTorch
      "critic_features": 32, "critic_layers": 3,
      "mask_critic_features": 16})   # the mask critic (on the softmax) has critic_layers layers too
  # Image translation (methods/uda/translation.py): cyclegan, seuda, cycada, sifa. Images must
  # lie in [-1, 1]: data.normalization.name='site_range'.
  c.gan = ml_collections.ConfigDict({
      "gen_features": 32, "gen_blocks": 9,   # ResNet generator (SIFA's g_A: ngf 32, 9 blocks)
      "skip": True,               # tanh(x + out): the generator learns a residual on its input (SIFA)
      "disc_features": 64, "disc_layers": 3, "disc_pad": 2,   # PatchGAN 70x70 (SIFA: 35x35 map at 256^2)
      "learning_rate": 2e-4, "b1": 0.5,      # Adam of every generator/discriminator
      "cycle_weight": 10.0, "identity_weight": 0.0,
      "pool_size": 50})           # image pool of generated batches (0 = off)
  c.seuda = ml_collections.ConfigDict({
      "pretrain_steps": 1000,     # the source segmenter first; then the translation, segmenter frozen
      "semantic_weight": 0.5,     # λ_sem of the mask discriminator's generator term (unverified)
      "mask_disc_features": 64})
  c.cycada = ml_collections.ConfigDict({
      "pretrain_steps": 1000,     # the source segmenter f_S first; then translation + the task model
      "semantic_weight": 1.0,     # semantic consistency CE(f_S(G(x)), argmax f_S(x)), both directions
      "feature_weight": 0.1,      # feature-level GAN on the task model's block `feature_level` (0 = off)
      "feature_level": "bottleneck", "disc_features": 32, "disc_layers": 3, "disc_lr": 2e-4})
  c.sifa = ml_collections.ConfigDict({
      "deep_supervision": True,   # TMI: s_B_ll + d_P_ll on latent_ll; False = SIFA-v1 (AAAI)
      "encoder_features": 16, "decoder_features": 32, "decoder_blocks": 4, "dropout": 0.0,
      "ll_seg_weight": 0.1, "gen_b_weight": 0.1, "aux_weight": 0.1,
      "mask_weight": 0.1, "mask_ll_weight": 0.01,
      # SIFA-v1's w_P: 0 before step mask_ramp_start, linear to mask_weight at mask_ramp_end (0, 0 = constant)
      "mask_ramp_start": 0, "mask_ramp_end": 0})
  return c


def cpu_sized_brain(config: ml_collections.ConfigDict, *, num_steps: int) -> ml_collections.ConfigDict:
  """The quick start's CPU-sized brain-sites settings (3 mm slices, 80x80, U-Net 8-16-32-64 + 128,
  batch 12, cosine schedule), shared by `configs/*_brain.py:quick`."""
  config.data.in_plane_spacing = (3.0, 3.0)
  config.data.in_plane_shape = (80, 80)
  config.model.base_features = 8
  config.model.depth = 4
  config.batch_size = 12
  config.num_steps = num_steps
  config.optimizer.schedule = "cosine"
  config.log_every = 50
  config.eval_every = max(num_steps // 4, 1)
  config.checkpoint.every = config.eval_every
  return config


def gpu_sized_brain(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Full-size brain-sites settings (native 2 mm grid padded to 128x128, U-Net 16-32-64-128 +
  256, 10 cases per site, 20k steps of batch 24, cosine schedule), for a GPU."""
  config.data.in_plane_shape = (128, 128)
  config.data.synthesize.cases_per_site = 10
  config.model.base_features = 16
  config.batch_size = 24
  config.num_steps = 20_000
  config.optimizer.schedule = "cosine"
  config.log_every = 100
  config.eval_every = 1000
  config.checkpoint.every = 1000
  return config


UDA_BENCHMARKS = {
    # benchmark: (default source, target, spacing (mm) and in-plane shape of the full / quick size)
    "cardiac": ("cardiac-phantom", "MR", "CT", ((0.75, 0.75), (256, 256)), ((3.0, 3.0), (64, 64))),
    "brain": ("brain-modalities", "T1", "T2", ((), (128, 128)), ((3.0, 3.0), (80, 80))),
}


def uda_benchmark(config: ml_collections.ConfigDict, arg: str | None, *, method: str, num_steps: int,
                  quick_steps: int) -> ml_collections.ConfigDict:
  """The cross-modality adaptation setting shared by `configs/uda/*.py`: `arg` is
  [brain_]quick or brain or None (cardiac full size). The target's train+val cases are
  unlabelled adaptation data (data.target_adaptation), its test cases are scored; selection is
  the last checkpoint (a fixed iteration, as SIFA/PnP-AdaNet report: no target labels).
  Full size: 256x256 slices (MM-WHS crops), U-Net 16-..-256, batch 8 + 8, `num_steps`, a GPU run.
  `quick`: 64x64 (cardiac) / 80x80 (brain) slices at 3 mm, U-Net 8-..-128, batch 8 + 8,
  `quick_steps`, minutes on the 2-core CPU."""
  name = "brain" if arg and arg.startswith("brain") else "cardiac"
  quick = bool(arg) and arg.endswith("quick")
  benchmark, source, target, full, small = UDA_BENCHMARKS[name]
  config.method = method
  config.data.root = f"data/{benchmark}"
  config.data.synthesize.benchmark = benchmark
  config.data.synthesize.cases_per_site = 10
  config.data.split.val_fraction = 0.1
  config.data.split.test_fraction = 0.3
  if method == "supervised_target":
    config.data.sites, config.data.held_out, config.data.target_adaptation = (target,), (), False
  else:
    config.data.sites, config.data.held_out, config.data.target_adaptation = (source,), (target,), True
  config.eval.selection = "last"
  spacing, shape = small if quick else full
  config.data.in_plane_spacing = spacing
  config.data.in_plane_shape = shape
  config.model.base_features = 8 if quick else 16
  config.batch_size = 8
  config.num_steps = quick_steps if quick else num_steps
  config.optimizer.schedule = "cosine"
  config.log_every = 50 if quick else 200
  config.eval_every = config.checkpoint.every = config.num_steps if quick else 2000
  return config


def image_translation(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """What the translation configs (configs/uda/{cyclegan,seuda,cycada,sifa,sifa_v1}.py) add to
  `uda_benchmark`: each modality's training-data range mapped to [-1, 1] (the generators end in
  tanh; SIFA's mapping) and, for `quick`, CPU-sized translation networks (ResNet generator 8
  features / 3 blocks, PatchGAN 16 features); full size keeps SIFA's (32 / 9 blocks, 64)."""
  config.data.normalization.name = "site_range"
  if arg and arg.endswith("quick"):
    config.gan.gen_features = 8
    config.gan.gen_blocks = 3
    config.gan.disc_features = 16
  return config


def prostate6(config: ml_collections.ConfigDict, *, held_out: str = "BIDMC") -> ml_collections.ConfigDict:
  """The six-site prostate collection as SAML/MS-Net use it: whole-volume z-score, 2.5-D input of
  3 slices at 384x384, slices drawn within the gland, Dice with the linear denominator."""
  config.data.root = "data/prostate6"
  config.data.layout = "prostate6"
  config.data.held_out = (held_out,)
  config.data.in_plane_shape = (384, 384)
  config.data.context_slices = 3
  config.data.slices = "foreground"
  config.loss.dice_variant = "linear"
  config.num_steps = 10_000
  config.log_every = 100
  config.eval_every = 500
  config.checkpoint.every = 500
  return config


def saml_released(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """SAML's released loss and optimizers (configs/saml_prostate.py's docstring says what each is):
  Dice-B only, no L2, inner lr 1e-4 with per-tensor clip 10, a task Adam at 1e-4 plus the meta
  Adam at optimizer.learning_rate with the meta gradient clipped per tensor at 10."""
  config.method = "saml"
  config.loss.ce_weight = 0.0
  config.loss.dice_variant = "linear"
  config.loss.weight_decay = 0.0
  config.meta.inner_lr = 1e-4
  config.meta.clip = 10.0
  config.meta.optimizers = "released"
  config.meta.task_learning_rate = 1e-4   # Adam on the meta-train task loss
  config.meta.outer_clip = 10.0           # the meta objective's gradient clipped per tensor at 10
  return config


def multisite(config: ml_collections.ConfigDict, arg: str | None = None, *,
              quick_steps: int = 300) -> ml_collections.ConfigDict:
  """Multi-site learning, the setting of the talk's MS-Net tables (`configs/multisite/*.py`):
  every site is a source and each is tested on its own held-back test cases (no held-out site).

  `arg`: 'quick' = brain-sites with all six simulated sites (data/brain-sites6, 10 cases per
  site: 6 train / 2 val / 2 test) at the CPU size; None = the same data at the GPU size;
  'prostate6' = the real six-site prostate collection (give --config.data.root) at SAML's size."""
  if arg not in (None, "quick", "prostate6"):
    raise ValueError(f"config argument {arg!r}: use quick, prostate6 or nothing (the GPU size)")
  if arg == "prostate6":
    prostate6(config)
    config.data.held_out = ()
    return config
  config.data.root = "data/brain-sites6"
  config.data.synthesize.sites = 6
  config.data.held_out = ()
  if arg == "quick":
    cpu_sized_brain(config, num_steps=quick_steps)
  else:
    gpu_sized_brain(config)
  config.data.synthesize.cases_per_site = 10
  return config


MULTIMODAL_MODALITIES = {"cardiac": ("MR", "CT"), "brain": ("T1", "T2", "CT")}


def multimodal(config: ml_collections.ConfigDict, arg: str | None = None, *, num_steps: int = 20_000,
               quick_steps: int = 600) -> ml_collections.ConfigDict:
  """Unpaired multi-modal learning, the setting of UMMKD (Dou, Liu et al., TMI 2020) and its
  baselines (`configs/multimodal/*.py`): every modality of a cross-modality benchmark is a
  LABELLED source (data.held_out=(), no adaptation data), each tested on its own test cases.

  `arg`: cardiac_quick | brain_quick | cardiac | brain (None = cardiac): cardiac-phantom MR + CT
  or brain-modalities T1 + T2 + CT, at the sizes of `uda_benchmark` (same data, splits and
  normalization as configs/uda/*.py; last checkpoint). Batch: 8 slices per modality (the
  released 8 MR + 8 CT; brain_quick 4 per modality), so method 'separate' trains each modality's
  network on batches of that per-modality size. Full size: the released schedule (Adam 1e-3
  x0.95 every 1000 steps), `num_steps`; quick: cosine over `quick_steps`."""
  if arg not in (None, "cardiac", "cardiac_quick", "brain", "brain_quick"):
    raise ValueError(f"config argument {arg!r}: use cardiac_quick, brain_quick, cardiac or brain")
  name = "brain" if arg and arg.startswith("brain") else "cardiac"
  quick = bool(arg) and arg.endswith("quick")
  uda_benchmark(config, arg, method=config.method, num_steps=num_steps, quick_steps=quick_steps)
  modalities = MULTIMODAL_MODALITIES[name]
  config.data.sites, config.data.held_out, config.data.target_adaptation = modalities, (), False
  per_modality = 4 if quick and name == "brain" else 8
  config.batch_size = per_modality if config.method == "separate" else per_modality * len(modalities)
  if not quick:
    config.optimizer.schedule = "exponential"
    config.optimizer.decay_steps = 1000
    config.optimizer.decay_rate = 0.95
  return config


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
  validate_volumetric(config)   # before the method's own checks: a 2-D-only method is refused first
  module = methods.get(config.method)
  if hasattr(module, "validate"):
    module.validate(config)
  if config.model.unseen_domain not in ("average", "refuse"):
    fail("model.unseen_domain", f"unknown policy {config.model.unseen_domain!r}; use average | refuse")
  if config.model.norm == "dsbn" and module.SAMPLER != "pooled":
    fail("model.norm", f"'dsbn' (per-site BatchNorm picked by each slice's site) needs the pooled "
         f"sampler's per-model domain ids; method {config.method!r} draws {module.SAMPLER!r} batches: "
         "use 'batch'")
  adapters = {"model.adapter": (config.model.adapter, ("none", "series", "parallel")),
              "model.se": (config.model.se, ("none", "shared", "domain")),
              "model.se_blocks": (config.model.se_blocks, ("encoder", "encoder_decoder"))}
  for key, (value, choices) in adapters.items():
    if value not in choices:
      fail(key, f"unknown value {value!r}; use one of {' | '.join(choices)}")
  if config.model.se_reduction < 1:
    fail("model.se_reduction", "the SE reduction ratio must be >= 1")
  if ((config.model.adapter != "none" or config.model.se != "none")
      and config.method not in ("deepall", "separate")):
    fail("model.adapter" if config.model.adapter != "none" else "model.se",
         f"adapters and squeeze-and-excitation (models/adapters.py) are built by the DeepAll/Separate "
         f"U-Net only; method {config.method!r} would ignore or misuse them: set model.adapter='none' "
         "and model.se='none', or use method 'deepall'")
  if config.meta.optimizers not in ("summed", "released"):
    fail("meta.optimizers", f"unknown mode {config.meta.optimizers!r}; use summed | released")
  if config.meta.optimizers == "released" and config.method not in ("masf", "saml"):
    fail("meta.optimizers", f"'released' (a separate task optimizer, as MASF's and SAML's code) does "
         f"not exist for method {config.method!r}: use 'summed'")
  # Settings that would be silently ignored are refused, so a run never claims what it did not do.
  if config.method == "mldg" and config.meta.outer_clip > 0:
    fail("meta.outer_clip", "MLDG has no separate meta gradient to clip (one objective, one "
         "optimizer): set it to 0, or use optimizer.grad_clip_norm")
  if config.meta.optimizers == "summed" and config.meta.task_learning_rate > 0:
    fail("meta.task_learning_rate", "is used only with meta.optimizers='released' (one optimizer "
         "sees the summed objective otherwise): set it to 0, or use 'released'")


# Methods whose every network is config.model's (train_state.make_model) on a pooled batch, so
# that they train on 3-D patches unchanged; the others build 2-D networks or draw slice episodes.
VOLUMETRIC_METHODS = ("deepall", "separate", "intra_site", "source_only", "supervised_target", "ummkd")


def validate_volumetric(config: ml_collections.ConfigDict) -> None:
  """3-D patch training (data.patch_size with model.name='unet3d'): the settings it needs and
  the ones it cannot honour, each refused in one line naming the key and the fix."""
  def fail(key, message):
    raise ValueError(f"config.{key}: {message}")

  patch = tuple(config.data.patch_size)
  volumetric = config.model.name == "unet3d"
  if not patch and not volumetric:
    return
  if not patch:
    fail("model.name", "'unet3d' trains on 3-D patches: set data.patch_size=(D, H, W), e.g. (32, 64, 64), "
         "or use model.name='unet' for 2-D slices")
  if not volumetric:
    fail("data.patch_size", f"{patch} asks for 3-D patches, which only the 3-D U-Net takes: set "
         "model.name='unet3d', or data.patch_size=() for 2-D slices")
  if len(patch) != 3 or any(int(p) < 1 for p in patch):
    fail("data.patch_size", f"{patch}: needs 3 positive sizes (D, H, W), D along the slice axis")
  if config.method not in VOLUMETRIC_METHODS:
    fail("method", f"{config.method!r} trains 2-D networks or slice episodes only; 3-D patches "
         f"(data.patch_size) train {', '.join(VOLUMETRIC_METHODS)}: use one of them, or data.patch_size=()")
  if config.method == "ummkd" and config.ummkd.shared != "all":
    fail("ummkd.shared", f"{config.ummkd.shared!r}: the shared-stream networks (models/multimodal.py) are "
         "2-D; 3-D UMMKD is the Chilopod U-Net: set ummkd.shared='all' (with model.norm='dsbn')")
  if config.data.context_slices != 1:
    fail("data.context_slices", f"{config.data.context_slices}: a 3-D patch holds its neighbouring slices "
         "already: set it to 1")
  if config.model.adapter != "none" or config.model.se != "none":
    fail("model.adapter" if config.model.adapter != "none" else "model.se",
         "the 3-D U-Net has no adapters or squeeze-and-excitation: set model.adapter='none' and model.se='none'")
  if not 0.0 <= config.data.oversample_foreground <= 1.0:
    fail("data.oversample_foreground", f"{config.data.oversample_foreground} is not a fraction: use a "
         "value in [0, 1] (nnU-Net: 0.33)")
  if not 0.0 <= config.eval.overlap < 1.0:
    fail("eval.overlap", f"{config.eval.overlap}: the sliding windows' overlap must be in [0, 1) (0.5: "
         "nnU-Net and MONAI)")
  try:
    check_levels(patch, depth=config.model.depth, pool_sizes=config.model.pool_sizes,
                 kernel_sizes=config.model.kernel_sizes)
  except ValueError as e:   # names model.pool_sizes / model.kernel_sizes, or the patch
    raise ValueError(f"config.{e}" if str(e).startswith("model.") else f"config.data.patch_size: {e}") from None
