"""MM-WHS cardiac CT/MR as released, pre-processed, by the PnP-AdaNet / SIFA authors (no TensorFlow).

Release layout (`PnpAda_release_data.zip` and SIFA's test sets), ROOT being the data root:

    ROOT/ct_train_tfs/ct_train_slice{0..8399}.tfrecords    one tf.train.Example per file
    ROOT/ct_val_tfs/ct_val_slice{0..1199}.tfrecords        (mr_train_tfs/, mr_val_tfs/ alike)
    ROOT/lists/{ct,mr}_{train,val}_list                    optional (PnP repo): one path per line,
                                                           relative to ROOT (a leading './' is allowed)
    ROOT/**/*.npz                                          test volumes, e.g. image_ct_1003.npz

Each slice record holds `data_vol` and `label_vol` (one bytes value each: raw little-endian float32,
row-major (H, W, C), 256x256x3 in the release) and their shapes as int64 `dsize_dim0..2` /
`lsize_dim0..2`. The README's `lsize_dim2 = 1` is wrong for the release (it is 3, SIFA#18): both
1 and 3 are accepted and the label is the middle channel (`label[..., C // 2]`), as in all the
official training code. Other features (e.g. 'mask', 'bias', SIFA#15) are ignored.

Labels: 0 background, 1 MYO (LV myocardium), 2 LAC (LA blood cavity), 3 LVC (LV blood cavity),
4 AA (ascending aorta). The released labels also hold 5, which is not a target class: it is mapped
to background 0 (what the official evaluation does with `gt[gt > 4] = 0`). Any other value, or a
non-integer label, is an error (raw MM-WHS values such as 205/420/500/820 mean the data was not
pre-processed by the PnP/SIFA pipeline).

Test volumes (`.npz`, written by SIFA's `savenpz.py`): `arr_0` image (H, W, D), `arr_1` label
(H, W, D). SIFA's `evaluate.py` flips axes 0 and 1 before inference so that they match the
orientation of the training slices; `read_npz_volume(flip=True)` (the default) does the same.

Modality (CT / MR) comes from the folder or file name (a `ct` / `mr` token, e.g. `ct_train_tfs`,
`image_mr_1007.npz`). File names carry no case id (SIFA#10, #16), so slices cannot be regrouped
into the original volumes; see convert.py for how pseudo-volumes are formed.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from medgen_jax.data.errors import DataError, Problem
from medgen_jax.data.tfrecord import read_examples

LABELS = {0: "background", 1: "MYO", 2: "LAC", 3: "LVC", 4: "AA"}
LABEL_REMAP = {5: 0}  # released value 5 is not a target class
RAW_LABEL_VALUES = frozenset(range(6))
_SHAPE_KEYS = ("dsize_dim0", "dsize_dim1", "dsize_dim2", "lsize_dim0", "lsize_dim1", "lsize_dim2")
_SLICE_DIRS = re.compile(r"^(?P<mod>ct|mr)_(?P<split>train|val|test)_tfs$", re.IGNORECASE)
_MODALITY = re.compile(r"(?:^|[^a-z])(ct|mr)(?:[^a-z]|$)", re.IGNORECASE)
_FIX_FEATURES = ("re-copy the file from the PnP-AdaNet/SIFA release; a record needs data_vol, label_vol "
                 "(float32 bytes) and dsize_dim0..2, lsize_dim0..2 (int64)")


def remap_labels(path, raw: np.ndarray) -> np.ndarray:
  """Released float labels (0..5) -> uint8 training labels (5 -> 0). DataError on anything else."""
  raw = np.asarray(raw)
  finite = np.isfinite(raw)
  if not finite.all() or not np.array_equal(raw, np.round(raw)):
    raise DataError.single(path, "label has non-integer values", "re-copy the file: released labels are "
                           "integer-valued 0..5")
  values = set(np.unique(raw).astype(np.int64).tolist())
  bad = sorted(values - RAW_LABEL_VALUES)
  if bad:
    hint = " (raw MM-WHS label values: the data is not the PnP/SIFA pre-processed release)" \
        if any(v >= 200 for v in bad) else ""
    raise DataError.single(path, f"label values {bad[:8]} are outside 0..5{hint}",
                           "use the PnP-AdaNet/SIFA release (labels 0 bg, 1 MYO, 2 LAC, 3 LVC, 4 AA, 5 ignored) "
                           "or map your labels to it")
  lut = np.arange(6, dtype=np.uint8)
  for k, v in LABEL_REMAP.items():
    lut[k] = v
  return lut[raw.astype(np.int64)]


def _int_feature(path, features, key) -> int:
  f = features.get(key)
  if f is None:
    raise DataError.single(path, f"feature {key!r} is missing", _FIX_FEATURES)
  if f.kind != "int64_list" or len(f.value) != 1:
    raise DataError.single(path, f"feature {key!r} must be one int64, not {f.kind} of "
                           f"{0 if f.value is None else len(f.value)} value(s)", _FIX_FEATURES)
  return int(f.value[0])


def _volume_feature(path, features, key, shape) -> np.ndarray:
  f = features.get(key)
  if f is None:
    raise DataError.single(path, f"feature {key!r} is missing", _FIX_FEATURES)
  if f.kind != "bytes_list" or len(f.value) != 1:
    raise DataError.single(path, f"feature {key!r} must be one bytes value, not {f.kind} of "
                           f"{0 if f.value is None else len(f.value)} value(s)", _FIX_FEATURES)
  raw = f.value[0]
  want = int(np.prod(shape)) * 4
  if len(raw) != want:
    raise DataError.single(path, f"feature {key!r} holds {len(raw)} bytes but its shape {tuple(shape)} "
                           f"needs {want} (float32)", "re-copy the file; it does not match its size "
                           "fields (wrong shape or dtype)")
  return np.frombuffer(raw, "<f4").reshape(shape)


def parse_slice(path, features) -> tuple[np.ndarray, np.ndarray]:
  """One parsed record -> (image float32 (H, W, C), label uint8 (H, W), middle channel, remapped)."""
  dims = {k: _int_feature(path, features, k) for k in _SHAPE_KEYS}
  dshape = (dims["dsize_dim0"], dims["dsize_dim1"], dims["dsize_dim2"])
  lshape = (dims["lsize_dim0"], dims["lsize_dim1"], dims["lsize_dim2"])
  if min(dshape + lshape) < 1:
    raise DataError.single(path, f"size fields {dims} must be positive", _FIX_FEATURES)
  if lshape[:2] != dshape[:2]:
    raise DataError.single(path, f"label size {lshape} differs in-plane from data size {dshape}",
                           "re-copy the file; image and label must cover the same pixels")
  image = _volume_feature(path, features, "data_vol", dshape)
  label = _volume_feature(path, features, "label_vol", lshape)
  if not np.isfinite(image).all():
    raise DataError.single(path, "data_vol has NaN or Inf values", "re-copy the file or drop this slice")
  return np.array(image, np.float32), remap_labels(path, label[..., lshape[2] // 2])


def read_slice(path, *, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """A released `.tfrecords` slice -> (image (H, W, C) float32, label (H, W) uint8).

  The file must hold exactly one record (one slice per file, as released)."""
  records = list(read_examples(path, verify=verify))
  if len(records) != 1:
    raise DataError.single(path, f"holds {len(records)} records; the release has one slice per file",
                           "split it into one file per slice, or use medgen_jax.data.tfrecord.read_examples")
  return parse_slice(path, records[0])


def read_npz_volume(path, *, flip: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """A SIFA test volume -> (image (H, W, D) float32, label (H, W, D) uint8), axes 0 and 1 flipped
  as SIFA's evaluate.py does (`flip=False` for volumes already aligned with the training slices)."""
  path = Path(path)
  try:
    with np.load(path, allow_pickle=False) as npz:
      keys = set(npz.files)
      if not {"arr_0", "arr_1"} <= keys:
        raise DataError.single(path, f"holds arrays {sorted(keys)}, not arr_0 (image) and arr_1 (label)",
                               "save the volume as np.savez(path, image, label) as SIFA's savenpz.py does")
      image, label = npz["arr_0"], npz["arr_1"]
  except DataError:
    raise
  except Exception as e:  # zipfile / pickle / OSError variants
    raise DataError.single(path, f"not a readable .npz file ({type(e).__name__}: {e})",
                           "re-copy the file, or re-create it with np.savez") from None
  if image.ndim != 3 or image.shape != label.shape:
    raise DataError.single(path, f"arr_0 {image.shape} and arr_1 {label.shape} must be equal 3-D shapes (H, W, D)",
                           "save the image and its label volume with the same (H, W, D) shape")
  if image.dtype.kind not in "fiu" or not np.isfinite(image).all():
    raise DataError.single(path, "arr_0 must hold finite numbers", "fix the exported image")
  label = remap_labels(path, label)
  image = image.astype(np.float32)
  if flip:
    image, label = image[::-1, ::-1], label[::-1, ::-1]
  return np.ascontiguousarray(image), np.ascontiguousarray(label)


def modality_of(path: Path, root: Path | None = None) -> str | None:
  """'CT' or 'MR' from a `ct`/`mr` token in the file name, else in its folders below `root`."""
  rel = path.parent.relative_to(root).parts if root is not None and root in path.parents else path.parent.parts
  for name in [path.stem, *reversed(rel)]:
    m = _MODALITY.search(name)
    if m:
      return m.group(1).upper()
  return None


def slice_index(path: Path) -> int:
  m = re.search(r"(\d+)(?=\D*$)", path.stem)
  return int(m.group(1)) if m else -1


def _read_list(root: Path, list_file: Path) -> tuple[list[Path], list[Problem]]:
  files, problems = [], []
  for n, line in enumerate(list_file.read_text().splitlines(), start=1):
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    p = Path(line)
    if line.startswith("/path/to"):
      return [], [Problem(str(list_file), f"holds the placeholder {line!r} (the PnP repo's MR lists are "
                          "placeholders), not slice paths", "delete it to use the folder's files in slice-number "
                          f"order, or list the files relative to {root}, one per line")]
    if p.is_absolute():
      problems.append(Problem(f"{list_file}:{n}", f"absolute path {line!r}; list paths are relative to the data root",
                              f"write it relative to {root}"))
      continue
    path = root / p
    if not path.is_file():
      problems.append(Problem(f"{list_file}:{n}", f"listed file {line} does not exist under {root}",
                              "restore the file or delete the line"))
      continue
    files.append(path)
  return files, problems


def discover(root) -> tuple[dict[tuple[str, str], list[Path]], dict[str, list[Path]], list[Problem]]:
  """The released files of ROOT: ({(modality, split): slice files in order}, {modality: npz volumes},
  problems). Slice folders are `<ct|mr>_<train|val|test>_tfs/`; when `lists/<mod>_<split>_list`
  exists its order and membership are used, else the folder's files in slice-number order. Other
  folders' `.tfrecords` get the modality from their name and the split 'train'."""
  root = Path(root)
  if not root.is_dir():
    raise DataError.single(root, "folder does not exist", "give the MM-WHS data root (holding ct_train_tfs/ ...)")
  slices: dict[tuple[str, str], list[Path]] = {}
  volumes: dict[str, list[Path]] = {}
  problems: list[Problem] = []
  tf_files = sorted(p for p in root.rglob("*.tfrecords") if not any(q.startswith(".") for q in p.relative_to(root).parts))
  for f in tf_files:
    m = _SLICE_DIRS.match(f.parent.name)
    mod, split = (m.group("mod").upper(), m.group("split").lower()) if m else (modality_of(f, root), "train")
    if mod is None:
      problems.append(Problem(str(f), "modality cannot be told from the folder or file name",
                              "put the slices in ct_train_tfs/ or mr_train_tfs/ (a 'ct' or 'mr' token in a name)"))
      continue
    slices.setdefault((mod, split), []).append(f)
  for key in slices:
    slices[key].sort(key=lambda p: (str(p.parent), slice_index(p), p.name))
  lists_dir = root / "lists"
  if lists_dir.is_dir():
    for list_file in sorted(lists_dir.iterdir()):
      m = re.match(r"^(ct|mr)_(train|val|test)_list$", list_file.name, re.IGNORECASE)
      if not m or not list_file.is_file():
        continue
      files, list_problems = _read_list(root, list_file)
      problems.extend(list_problems)
      if files:
        slices[(m.group(1).upper(), m.group(2).lower())] = files
  for f in sorted(p for p in root.rglob("*.npz") if not any(q.startswith(".") for q in p.relative_to(root).parts)):
    mod = modality_of(f, root)
    if mod is None:
      problems.append(Problem(str(f), "modality cannot be told from the folder or file name",
                              "name test volumes e.g. image_ct_1003.npz / image_mr_1007.npz"))
      continue
    volumes.setdefault(mod, []).append(f)
  if not slices and not volumes and not problems:
    problems.append(Problem(str(root), "holds no .tfrecords slices and no .npz volumes",
                            "give the folder that holds ct_train_tfs/, mr_train_tfs/ ... of the PnP-AdaNet release"))
  return dict(sorted(slices.items())), dict(sorted(volumes.items())), problems


def looks_like_mmwhs(root: Path) -> bool:
  """ROOT or a sub-folder holds .tfrecords or .npz files, and none of them holds NIfTI files (so a
  `prostate6`/`sites` folder with a stray .npz is not taken for the release)."""
  root = Path(root)
  if not root.is_dir():
    return False
  folders = [root, *(q for q in root.iterdir() if q.is_dir() and not q.name.startswith("."))]
  if any(next(p.glob("*.nii*"), None) is not None for p in folders):
    return False
  return any(next(p.glob("*.tfrecords"), None) is not None or next(p.glob("*.npz"), None) is not None
             for p in folders)
