"""Tiny on-disk datasets for tests: written with nibabel directly, independent of our writer."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import jax
import numpy as np

from medgen_jax.config import base_config

AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])


def write_nii(path: Path, data, affine=AFFINE, dtype=None) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  img = nib.Nifti1Image(np.asarray(data), affine)
  if dtype is not None:
    img.set_data_dtype(dtype)
  nib.save(img, str(path))
  return path


def toy_case(rng, shape=(12, 10, 6), num_classes=4):
  """An image whose intensity depends on the label, and the label: a few boxes."""
  label = np.zeros(shape, np.uint8)
  for k in range(1, num_classes):
    x0, y0 = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
    label[x0:x0 + 4, y0:y0 + 4, 1:-1] = k
  image = (label * 100.0 + rng.normal(0, 5, shape)).astype(np.float32)
  return image, label


def make_sites_dataset(root: Path, *, sites=("A", "B", "C"), cases=3, num_classes=4, seed=0,
                       dataset_json=True, shape=(12, 10, 6)) -> Path:
  rng = np.random.default_rng(seed)
  for site in sites:
    for j in range(cases):
      image, label = toy_case(rng, shape, num_classes)
      write_nii(root / site / f"case{j}_image.nii.gz", image)
      write_nii(root / site / f"case{j}_label.nii.gz", label)
  if dataset_json:
    labels = {str(k): f"class{k}" for k in range(num_classes)}
    labels["0"] = "background"
    (root / "dataset.json").write_text(json.dumps({"modality": "T1", "labels": labels}))
  return root


def tiny_config(root, **overrides):
  """A locked config that trains a 4-feature, depth-2 U-Net on 16x16 slices in seconds.
  Overrides use dotted keys: tiny_config(root, **{"meta.first_order": True})."""
  c = base_config()
  c.data.root = str(root)
  c.data.held_out = ("C",)
  c.data.in_plane_shape = (16, 16)
  c.model.base_features = 4
  c.model.depth = 2
  c.batch_size = 4
  c.num_steps = 6
  c.log_every = 2
  c.eval_every = 3
  c.checkpoint.every = 3
  c.eval.batch_size = 8
  c.progress_bar = False
  for key, value in overrides.items():
    target = c
    *path, last = key.split(".")
    for p in path:
      target = target[p]
    target[last] = value
  c.lock()
  return c


def leaves_equal(a, b) -> bool:
  """Same tree size and every leaf bit-identical."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def every_leaf_changed(a, b) -> bool:
  """Same non-empty tree size and no leaf bit-identical."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) > 0 and all(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))
