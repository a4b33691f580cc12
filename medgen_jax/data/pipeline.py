"""From a data config to validated, normalized, domain-labelled slice batches.

`prepare_data(config.data, run_dir=...)`:
1. generates the embedded brain-sites benchmark if `root` is missing and `synthesize.if_missing`
   (process 0 only; the other processes wait for it);
2. loads and validates every case of the source and held-out sites (`load_dataset`);
3. reads the split: the run's own `run_dir/splits.json` when resuming a run (the data must still
   hold exactly the sites and cases listed in `run_dir/data_info.json` when the run started, else
   a DataError says what changed), else `split_file`, else makes one (`make_splits`);
4. fits the normalizer on the *training cases of the source sites only* (histogram landmarks
   never see a validation, test or held-out volume; `site_range` also fits each target site's
   own range on its unlabelled adaptation cases, see below), or, when resuming, reads the run's
   `run_dir/normalizer.json` instead of refitting;
5. builds the training slice cache (unless `build_train=False`, for evaluation and prediction),
   or, with `data.patch_size` set (3-D patches), keeps the source sites' training volumes whole
   (`PreparedData.volumes`, data/patches.build_volumes: the same preprocessing).
   Validation/test volumes stay whole for 3-D evaluation.

Unsupervised domain adaptation (`target_adaptation=True`): each held-out (target) site's
train+val cases are unlabelled adaptation data (`cases['adapt']`) and its test cases its test
set (see splits.protocol_cases). With `build_train`, `PreparedData.adapt` is their image-only
slice cache (`SiteSlices.labels is None`; no adaptation case's `label` is ever read, so no
target label can reach a training batch), drawn by `SourceTargetSampler`. Its slices are the
'nonempty' ones (every slice whose image is not constant): `data.slices='foreground'` needs
labels, so target slices are not restricted to the labelled structure's extent as source
slices then are. Target volumes are normalized like every other volume, by the one fitted
normalizer: `histogram` maps them onto the landmarks of the source training volumes (fitted on
those only: an intensity-histogram alignment that cannot give e.g. CT and MR intensities the
same tissue meaning); `whitening` and `scaled` use each volume's own statistics (nothing
fitted, so a target volume is normalized exactly as it would be as a source); `site_range`
(SIFA's per-modality min/max -> [-1, 1]) maps each site with its own range, fitted on that
site's volumes only: a source site's on its training cases, a target site's on its unlabelled
adaptation cases (images only, never its test cases: changing a target test volume changes no
fitted range). In domain generalization (`target_adaptation=False`) a held-out site has no such
volumes, so `site_range` is refused at prepare time with a DataError (set
`data.target_adaptation=True`, or use a per-volume normalization such as 'scaled'). Target
labels are read from disk only by the validation in `load_dataset` and, for the target test
cases, by evaluation; model selection on 'val' uses source cases only.

Nothing here writes files: the trainer saves splits.json and normalizer.json once a run starts.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ml_collections

from medgen_jax import parallel
from medgen_jax.data.errors import DataError
from medgen_jax.data.layouts import DatasetInfo
from medgen_jax.data.loading import Case, load_dataset
from medgen_jax.data.normalize import Normalizer, make_normalizer
from medgen_jax.data.patches import VolumeSet, build_volumes
from medgen_jax.data.preprocess import correct_bias_field
from medgen_jax.data.sampler import SliceCache, build_slice_cache
from medgen_jax.data.splits import (check_same_cases, check_splits_match_cases, load_splits,
                                    make_splits, protocol_cases)
from medgen_jax.data.synthesize import ensure_benchmark
from medgen_jax.paths import as_path


def default_data_config() -> ml_collections.ConfigDict:
  """The `config.data` block every experiment config starts from (brain-sites defaults)."""
  c = ml_collections.ConfigDict()
  c.root = "data/brain-sites"
  c.layout = "auto"            # auto | prostate6 | sites | msd (MSD / nnU-Net imagesTr+labelsTr+dataset.json)
  c.msd = ml_collections.ConfigDict({  # msd layout: where each case's site comes from (set one)
      "site_csv": "",          # CSV with columns case,site
      "site_pattern": ""})     # regex with a named group 'site' searched in the case id
  c.sites = ()                 # source sites; () = every site folder not held out
  c.held_out = ()              # test-only sites (leave-one-site-out)
  c.channel = -1               # channel of 4-D images; -1 = images must be 3-D
  c.skip_bad_cases = False     # True: drop bad cases with a warning naming each file
  c.synthesize = ml_collections.ConfigDict(
      {"if_missing": True, "benchmark": "brain-sites", "sites": 4, "cases_per_site": 6, "seed": 0})
  c.split_file = ""            # '' = make one from `split` and save it as <workdir>/splits.json
  c.split = ml_collections.ConfigDict({"val_fraction": 0.2, "test_fraction": 0.2, "seed": 0})
  c.bias_correction = "none"   # none | n4 (SimpleITK: pip install 'medgen_jax[n4]')
  # N4 options (data/bias_field.py; used when bias_correction='n4'). cache_dir '' =
  # ~/.cache/medgen_jax/n4: each volume is corrected once, keyed by its bytes and these options.
  c.n4 = ml_collections.ConfigDict({
      "shrink_factor": 4, "iterations": (50, 50, 30, 20), "convergence_threshold": 0.001,
      "mask": "otsu", "cache_dir": ""})
  c.normalization = ml_collections.ConfigDict({
      "name": "whitening", "foreground": "none",
      "clip_percentiles": ml_collections.FieldReference(None, field_type=tuple),
      "percentiles": ml_collections.FieldReference(None, field_type=tuple),
      "standard_range": ml_collections.FieldReference(None, field_type=tuple),
      "output_range": ml_collections.FieldReference(None, field_type=tuple)})  # site_range only
  c.in_plane_shape = (128, 128)
  c.in_plane_spacing = ()      # () = keep the data's spacing; e.g. (1.0, 1.0) to resample
  c.context_slices = 1         # odd k: k adjacent slices as channels (2.5-D)
  # 3-D patches (data/patches.py, with model.name='unet3d'): (D, H, W) voxels, D along the slice
  # axis; () = 2-D slices. Training draws patches from whole volumes, the last
  # round(B * oversample_foreground) of each batch centred on a foreground voxel (nnU-Net's 0.33).
  c.patch_size = ()
  c.oversample_foreground = 0.33
  c.slices = "foreground"      # foreground | all: which slices are drawn for training
  c.cache_dtype = "float32"    # float32 | float16
  # True (unsupervised domain adaptation): each held-out (target) site's train+val cases become
  # unlabelled adaptation data (split 'adapt': images only, never labels), its test cases the
  # test set; False (domain generalization): every held-out case is a test case.
  c.target_adaptation = False
  return c


@dataclasses.dataclass
class PreparedData:
  info: DatasetInfo
  sources: list[str]
  held_out: list[str]
  domain_ids: dict[str, int]
  splits: dict
  protocol: dict[str, dict[str, list[str]]]   # split -> site -> case ids
  normalizer: Normalizer
  train: SliceCache | None                   # None when built without the training cache (or 3-D)
  cases: dict[str, dict[str, list[Case]]]    # split -> site -> whole volumes ('adapt': target sites'
                                             # unlabelled cases, empty unless target_adaptation)
  case_ids: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # every loaded case, per site
  adapt: SliceCache | None = None            # image-only target cache (target_adaptation and build_train)
  volumes: VolumeSet | None = None           # 3-D (data.patch_size set) with build_train: whole training
                                             # volumes for the patch sampler, instead of `train`

  @property
  def num_classes(self) -> int:
    return self.info.num_classes


def make_normalizer_from_config(norm: ml_collections.ConfigDict) -> Normalizer:
  options = {k: norm[k] for k in norm if k != "name"}
  return make_normalizer(norm.name, **options)


def load_run_normalizer(path, config_normalization: ml_collections.ConfigDict) -> Normalizer:
  """The normalizer a run fitted (`normalizer.json`), checked against the config's settings."""
  try:
    saved = Normalizer.from_dict(json.loads(path.read_text()))
  except (OSError, ValueError, TypeError) as e:
    raise DataError.single(path, f"is not a readable normalizer file ({type(e).__name__}: {e})",
                           "restore it from a backup, or train again in a new --workdir") from None
  expected = make_normalizer_from_config(config_normalization)
  if dataclasses.replace(saved, landmarks=None, site_ranges=None) != expected:
    raise DataError.single(path, f"holds {saved.name!r} normalization with other options than the "
                           f"config's data.normalization ({expected})",
                           "use the run's own config, or train again in a new --workdir")
  return saved


def ensure_dataset(config: ml_collections.ConfigDict, *, progress=print) -> Path:
  """`config.root`, after generating the brain-sites benchmark there if it is missing and
  `synthesize.if_missing` (process 0 generates; the other processes wait for it)."""
  root = Path(config.root)
  benchmark = config.synthesize.get("benchmark", "brain-sites")
  if parallel.is_main_process() and not root.exists() and config.synthesize.if_missing \
      and root.name.startswith(benchmark):
    ensure_benchmark(root, benchmark=benchmark, sites=config.synthesize.sites,
                     cases_per_site=config.synthesize.cases_per_site,
                     seed=config.synthesize.seed, progress=progress)
  parallel.barrier("medgen_jax.prepare_data:dataset")
  return root


def prepare_data(config: ml_collections.ConfigDict, *, run_dir: str | Path | None = None,
                 build_train: bool = True, progress=print) -> PreparedData:
  """See the module docstring. `run_dir`: a run folder whose splits.json / normalizer.json,
  when present, are reused instead of recomputed."""
  root = ensure_dataset(config, progress=progress)
  held_out = list(config.held_out)
  requested = list(config.sites) + [s for s in held_out if s not in config.sites] if config.sites else None
  info, cases_by_site = load_dataset(root, layout=config.layout, sites=requested,
                                     channel=None if config.channel < 0 else config.channel,
                                     skip_bad_cases=config.skip_bad_cases,
                                     site_csv=config.msd.site_csv, site_pattern=config.msd.site_pattern)
  all_sites = sorted(cases_by_site)
  missing_held_out = [s for s in held_out if s not in cases_by_site]
  if missing_held_out:
    raise DataError.single(f"data.held_out={held_out}", f"site(s) {missing_held_out} do not exist",
                           f"choose from {all_sites}")
  sources = [s for s in (config.sites or all_sites) if s not in held_out]
  if not sources:
    raise DataError.single("data.sites", "no source site left after removing the held-out sites",
                           "keep at least one training site")
  domain_ids = {s: i for i, s in enumerate(all_sites)}
  case_ids = {s: [c.case_id for c in cases] for s, cases in cases_by_site.items()}

  run_info = as_path(run_dir) / "data_info.json" if run_dir is not None else None
  if run_info is not None and run_info.is_file():
    check_same_cases(json.loads(run_info.read_text()).get("cases", case_ids), case_ids, source=str(run_info))
  run_splits = as_path(run_dir) / "splits.json" if run_dir is not None else None
  if run_splits is not None and run_splits.is_file():
    splits = load_splits(run_splits)
    check_splits_match_cases(splits, case_ids, source=str(run_splits))
    if config.split_file and load_splits(config.split_file) != splits:
      raise DataError.single(config.split_file, f"differs from the split this run started with ({run_splits})",
                             "restore the split file, or train again in a new --workdir")
  elif config.split_file:
    splits = load_splits(config.split_file)
    check_splits_match_cases(splits, case_ids, source=config.split_file)
  else:
    splits = make_splits(case_ids, val_fraction=config.split.val_fraction,
                         test_fraction=config.split.test_fraction, seed=config.split.seed)
  target_adaptation = bool(config.get("target_adaptation", False))
  if target_adaptation and not held_out:
    raise DataError.single("data.target_adaptation=True", "needs target sites to adapt to",
                           "list the target site(s) in data.held_out")
  protocol = protocol_cases(splits, sources=sources, held_out=held_out,
                            target_adaptation=target_adaptation)
  by_key = {c.key: c for cases in cases_by_site.values() for c in cases}
  cases = {name: {site: [by_key[f"{site}/{cid}"] for cid in ids] for site, ids in per_site.items()}
           for name, per_site in protocol.items()}
  empty_train = [s for s in sources if not cases["train"][s]]
  if empty_train:
    raise DataError.single(f"sites {empty_train}", "have no training case",
                           "give them more cases or lower data.split.val_fraction/test_fraction")
  if target_adaptation:
    for split, what in (("adapt", "no unlabelled adaptation (train+val) case"), ("test", "no test case")):
      empty = [s for s in held_out if not cases[split][s]]
      if empty:
        raise DataError.single(f"target sites {empty}", f"have {what} with data.target_adaptation=True",
                               "give them more cases (>= 3 each), change data.split.test_fraction, "
                               "or set data.target_adaptation=False")

  normalizer = make_normalizer_from_config(config.normalization)
  fit_cases = {site: cases["train"][site] for site in sources}
  if normalizer.per_site:
    # Each site's own volumes: a source's training cases, a target's unlabelled adaptation cases
    # (images only; never a test case). A held-out site without them cannot be normalized.
    fit_cases.update({site: cases["adapt"][site] for site in held_out if cases["adapt"].get(site)})
    unfitted = [s for s in held_out if s not in fit_cases]
    if unfitted:
      raise DataError.single(
          f"data.normalization.name={normalizer.name!r}",
          f"fits each site's intensity range on that site's own training volumes, but held-out "
          f"site(s) {unfitted} have none (data.target_adaptation=False: every case of a held-out "
          "site is a test case, and test volumes are never fitted on)",
          "set data.target_adaptation=True (their train+val images become unlabelled adaptation "
          "data the range is fitted on), or use a per-volume normalization such as 'scaled'")
  run_normalizer = as_path(run_dir) / "normalizer.json" if run_dir is not None else None
  if run_normalizer is not None and run_normalizer.is_file():
    normalizer = load_run_normalizer(run_normalizer, config.normalization)
  else:
    # Fitted on what it will be applied to: the bias-corrected volumes (N4 is cached per volume,
    # so the slice caches below reuse these corrections).
    fit_pairs = [(site, correct_bias_field(c.image, method=config.bias_correction, spacing=c.spacing,
                                           options=config.get("n4")))
                 for site, site_cases in fit_cases.items() for c in site_cases]
    normalizer = normalizer.fit([image for _, image in fit_pairs],
                                sites=[site for site, _ in fit_pairs])
  train = volumes = None
  volumetric = bool(tuple(config.get("patch_size", ())))
  if build_train and volumetric:
    volumes = build_volumes(cases["train"], normalizer=normalizer,
                            domain_ids=domain_ids, in_plane_spacing=tuple(config.in_plane_spacing) or None,
                            in_plane_shape=tuple(config.in_plane_shape), bias_correction=config.bias_correction,
                            bias_options=config.get("n4"), cache_dtype=config.cache_dtype)
  elif build_train:
    train = build_slice_cache(cases["train"], normalizer=normalizer,
                              in_plane_shape=tuple(config.in_plane_shape), domain_ids=domain_ids,
                              in_plane_spacing=tuple(config.in_plane_spacing) or None,
                              context_slices=config.context_slices, cache_dtype=config.cache_dtype,
                              slices=config.slices, bias_correction=config.bias_correction,
                              bias_options=config.get("n4"))
  adapt = None
  if build_train and target_adaptation and not volumetric:   # no 3-D method adapts (config.validate)
    adapt = build_slice_cache(cases["adapt"], normalizer=normalizer,
                              in_plane_shape=tuple(config.in_plane_shape), domain_ids=domain_ids,
                              in_plane_spacing=tuple(config.in_plane_spacing) or None,
                              context_slices=config.context_slices, cache_dtype=config.cache_dtype,
                              slices="nonempty", bias_correction=config.bias_correction,
                              bias_options=config.get("n4"),
                              labelled=False)
  return PreparedData(info, sources, held_out, domain_ids, splits, protocol, normalizer, train, cases,
                      case_ids, adapt, volumes)
