"""Translation previews: what an image-level adaptation method did, as one PNG per trained model.

`write_translation_preview` draws a grid with one column per example slice and the rows
  source | source → target | reconstructed source | target | prediction | truth
The source slices are the most-labelled axial slices of the first source training case, the
target slices those of the first target TEST case (its labels are drawn as the truth row only:
nothing here trains or selects). Slices are preprocessed exactly as for training (the run's
normalizer, in-plane grid); images are drawn on [−1, 1] (the translation methods' range), label
maps with one colour per class. The trainer calls a method's optional `write_figures(config,
data, state, out_dir)` once a model is trained (methods/base.py); the methods here write
`<workdir>/<model>/translation_preview.png`.
"""

from __future__ import annotations

import io

import jax
import numpy as np

from medgen_jax.data.preprocess import preprocess_case
from medgen_jax.inference import slice_stack
from medgen_jax.methods.base import RunInfo
from medgen_jax.paths import as_path, write_bytes_atomic

ROWS = ("source", "source → target", "reconstructed source", "target", "prediction", "truth")
COLOURS = ["#00000000", "#1f77b4", "#d62728", "#f1c40f", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"]


def _slices(case, config, normalizer, count: int):
  """(images [n, H, W, C], labels [n, H, W]) of the `count` slices with the most foreground."""
  data = config.data
  image, label = preprocess_case(case.image, case.label, case.spacing, normalizer=normalizer,
                                 in_plane_shape=tuple(data.in_plane_shape),
                                 in_plane_spacing=tuple(data.in_plane_spacing) or None,
                                 bias_correction=data.bias_correction, bias_options=data.get("n4"),
                                 site=case.site)
  order = np.argsort(-(label > 0).sum(axis=(0, 1)), kind="stable")[:count]
  order = np.sort(order)
  stack = slice_stack(image, data.context_slices)
  return stack[order], np.moveaxis(label, 2, 0)[order]


def preview_slices(config, data, *, count: int = 4):
  """(source images, target images, target labels) for the preview (see the module docstring)."""
  source = data.cases["train"][data.sources[0]][0]
  target_site = data.held_out[0]
  target = (data.cases["test"].get(target_site) or data.cases["adapt"][target_site])[0]
  src, _ = _slices(source, config, data.normalizer, count)
  tgt, truth = _slices(target, config, data.normalizer, count)
  return src, tgt, truth


def write_grid(rows: dict, out, *, num_classes: int):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.colors import ListedColormap

  names = list(rows)
  columns = len(next(iter(rows.values())))
  labels_cmap = ListedColormap(["black"] + COLOURS[1:max(num_classes, 2)])
  fig, axes = plt.subplots(len(names), columns, figsize=(1.8 * columns, 1.8 * len(names)), squeeze=False)
  for r, name in enumerate(names):
    for c in range(columns):
      ax = axes[r, c]
      x = np.asarray(rows[name][c])
      if x.ndim == 3:   # an image: the middle channel (2.5-D inputs) on [−1, 1]
        ax.imshow(x[..., x.shape[-1] // 2].T, cmap="gray", vmin=-1, vmax=1, origin="lower")
      else:
        ax.imshow(x.T, cmap=labels_cmap, vmin=0, vmax=max(num_classes - 1, 1), origin="lower",
                  interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if c == 0:
        ax.set_ylabel(name, fontsize=8)
  fig.tight_layout()
  buffer = io.BytesIO()  # through write_bytes_atomic: the run folder may be a bucket
  fig.savefig(buffer, format="png", dpi=80)
  plt.close(fig)
  out = as_path(out)
  write_bytes_atomic(out, buffer.getvalue())
  return out


def write_translation_preview(config, data, out_dir, *, translate, reconstruct, segment):
  """The preview grid of one model: `translate` source → target images, `reconstruct` them
  back, `segment` target images → logits (the evaluated network)."""
  src, tgt, truth = preview_slices(config, data)
  # Compiled: op-by-op execution of the flax models costs more than their compilation.
  translate, reconstruct, segment = jax.jit(translate), jax.jit(reconstruct), jax.jit(segment)
  fake = np.asarray(translate(src))
  rows = dict(zip(ROWS, (src, fake, np.asarray(reconstruct(fake)), tgt,
                         np.argmax(np.asarray(segment(tgt)), axis=-1), truth)))
  return write_grid(rows, as_path(out_dir) / "translation_preview.png", num_classes=data.num_classes)


def evaluated(eval_network, config, data, state):
  """images -> logits of a method's evaluated network with the variables of `state`."""
  info = RunInfo(num_classes=data.num_classes, input_shape=(*config.data.in_plane_shape, config.data.context_slices))
  model, variables_of = eval_network(config, info)
  variables = variables_of(state)
  return lambda images: model.apply(variables, images, train=False)
