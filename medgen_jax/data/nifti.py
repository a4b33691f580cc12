"""NIfTI reading and writing through nibabel.

Reading returns the volume in the closest canonical orientation (RAS+: array axis 0 increases
towards the patient's Right, axis 1 towards Anterior, axis 2 towards Superior), so an axial slice
is always `data[:, :, k]` whatever orientation the scanner stored. Voxel
spacing (mm) travels with the data. `scl_slope`/`scl_inter` are applied by nibabel.

A `.nii.gz` is decompressed in full and its gzip trailer checked (CRC-32 and length, every
member) before nibabel parses the bytes: nibabel stops reading at the end of the voxel data and
never reaches the trailer, so a bit flipped in a stored (or otherwise still decodable) block would
load as silently wrong voxels. The check adds about one CRC-32 pass over the decompressed bytes.

Writing is atomic (temporary file + rename: an interrupted write never leaves a half file under
the final name) and byte-deterministic (gzip header without time stamp or file name).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from medgen_jax.data.errors import DataError
from medgen_jax.paths import write_bytes_atomic

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclasses.dataclass(frozen=True)
class Volume:
  """A 3-D volume in RAS+ orientation with its voxel spacing in mm."""

  data: np.ndarray
  affine: np.ndarray
  path: str

  @property
  def spacing(self) -> tuple[float, float, float]:
    return voxel_spacing(self.affine)


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
  """Voxel size in mm along each array axis: the column norms of the affine's 3x3 part."""
  return tuple(float(s) for s in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))


def strip_nifti_suffix(name: str) -> str | None:
  """'Case01_image.nii.gz' -> 'Case01_image'; None when not a NIfTI file name."""
  lower = name.lower()
  for suffix in NIFTI_SUFFIXES:
    if lower.endswith(suffix):
      return name[: -len(suffix)]
  return None


def load_nifti(path: str | os.PathLike, *, channel: int | None = None,
               dtype=np.float32) -> Volume:
  """Loads a 3-D NIfTI volume, reoriented to RAS+, scaling applied, as `dtype`.

  A 4-D image is an error unless `channel` selects one volume along the 4th axis; trailing
  singleton axes (shape (X, Y, Z, 1)) are dropped. Raises DataError naming the file on anything
  unreadable: missing, not NIfTI, truncated or corrupt compressed data.
  """
  path = Path(path)
  if not path.is_file():
    raise DataError.single(path, "file does not exist", "check the path and the dataset layout")
  try:
    if path.name.lower().endswith(".nii.gz"):
      img = _nifti_from_bytes(read_gzip_verified(path))
    else:
      img = nib.load(str(path))
  except DataError:
    raise
  except Exception as e:  # nibabel raises several types for a non-NIfTI file.
    raise DataError.single(path, f"not a readable NIfTI file ({type(e).__name__}: {e})",
                           "re-export the volume as NIfTI-1 (.nii or .nii.gz)") from None
  if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
    raise DataError.single(path, f"is a {type(img).__name__}, not NIfTI",
                           "convert it to NIfTI (.nii.gz), e.g. with dcm2niix or nibabel")
  shape = tuple(img.shape)
  while len(shape) > 3 and shape[-1] == 1:
    shape = shape[:-1]
  if len(shape) == 4:
    if channel is None:
      raise DataError.single(path, f"is 4-D with shape {tuple(img.shape)}",
                             "select one channel (data.channel=<index>) or save a 3-D volume")
    if not 0 <= channel < shape[3]:
      raise DataError.single(path, f"channel {channel} does not exist in shape {shape}",
                             f"choose a channel in [0, {shape[3] - 1}]")
  elif len(shape) != 3:
    raise DataError.single(path, f"has shape {tuple(img.shape)}, not 3-D",
                           "save a 3-D volume (X, Y, Z)")
  try:
    data = np.asanyarray(img.dataobj)
  except (EOFError, OSError, ValueError, zlib.error) as e:
    raise DataError.single(path, f"truncated or corrupt data ({type(e).__name__}: {e})",
                           "re-copy or re-export the file; its data block is incomplete") from None
  data = data.reshape(shape)
  if len(shape) == 4:
    data = data[..., channel]
  data, affine = to_ras(data, img.affine)
  return Volume(data=np.ascontiguousarray(data, dtype=dtype), affine=affine, path=str(path))


def read_gzip_verified(path: str | os.PathLike) -> bytes:
  """The decompressed content of a gzip file, every member's CRC-32 and length checked.

  Raises DataError naming the file when the stream is not gzip, ends early, or its checksum or
  length trailer does not match the data (`gzip.decompress` checks both for each member).
  """
  path = Path(path)
  try:
    compressed = path.read_bytes()
  except OSError as e:
    raise DataError.single(path, f"cannot be read ({e.strerror or e})",
                           "check the file's permissions and the disk") from None
  try:
    return gzip.decompress(compressed)
  except gzip.BadGzipFile as e:
    if compressed[:2] != b"\x1f\x8b":
      raise DataError.single(path, "is named .gz but is not gzip-compressed",
                             "rename it to .nii, or compress it with gzip") from None
    raise DataError.single(path, f"corrupt compressed data: gzip integrity check failed ({e})",
                           "re-copy or re-export the file; its content does not match the checksum "
                           "stored in it (a flipped bit or a bad copy)") from None
  except (EOFError, zlib.error) as e:
    raise DataError.single(path, f"truncated or corrupt compressed data ({type(e).__name__}: {e})",
                           "re-copy or re-export the file; its compressed stream is incomplete "
                           "or damaged") from None


def _nifti_from_bytes(raw: bytes) -> nib.Nifti1Image | nib.Nifti2Image:
  """Parses an in-memory NIfTI-1 or NIfTI-2 file (told apart by sizeof_hdr, as nibabel does)."""
  sizeof_hdr = {int.from_bytes(raw[:4], order) for order in ("little", "big")}
  klass = nib.Nifti2Image if 540 in sizeof_hdr else nib.Nifti1Image
  return klass.from_bytes(raw)


def to_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Flips/permutes the array axes to the closest canonical (RAS+) orientation."""
  current = nib.orientations.io_orientation(affine)
  transform = nib.orientations.ornt_transform(current, nib.orientations.axcodes2ornt("RAS"))
  new_data = nib.orientations.apply_orientation(data, transform)
  new_affine = affine @ nib.orientations.inv_ornt_aff(transform, data.shape[:3])
  return new_data, new_affine


def from_ras(data: np.ndarray, affine: np.ndarray, axcodes: str) -> tuple[np.ndarray, np.ndarray]:
  """Stores a RAS+ volume in another orientation (e.g. 'LPS'), affine updated to match."""
  transform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                              nib.orientations.axcodes2ornt(tuple(axcodes)))
  new_data = nib.orientations.apply_orientation(data, transform)
  new_affine = affine @ nib.orientations.inv_ornt_aff(transform, data.shape[:3])
  return new_data, new_affine


def write_nifti(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray, *,
                on_disk_dtype=None) -> None:
  """Writes `data` atomically and deterministically; `.nii.gz` gets a time-stamp-free gzip.

  With an integer `on_disk_dtype` and float `data`, nibabel stores scl_slope/scl_inter, which
  `load_nifti` applies on reading (as scanners' int16 exports do).
  """
  path = Path(path)
  img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))
  img.header.set_xyzt_units("mm")
  img.header.set_qform(img.affine, code=1)
  img.header.set_sform(img.affine, code=1)
  if on_disk_dtype is not None:
    img.set_data_dtype(on_disk_dtype)
  raw = img.to_bytes()
  if path.name.lower().endswith(".gz"):
    raw = gzip.compress(raw, compresslevel=6, mtime=0)
  write_bytes_atomic(path, raw)
