"""MASF on the six-site prostate collection: 2 meta-train + 1 meta-test of the 5 source sites.

    python -m medgen_jax.train --config configs/masf_prostate.py --workdir runs/masf_prostate \
        --config.data.root=/path/to/Processed_data_nii --config.data.held_out='("BIDMC",)'

β1 = 1 (global alignment, τ = 2), β2 = 0.005 (semi-hard triplet, margin 10). Optimizers as
released (`meta.optimizers='released'`, methods.md §3.7): Adam(outer_lr = optimizer.learning_rate)
on the meta-train task loss plus a second Adam(outer_lr) on the meta objective with each gradient
tensor clipped at norm 2.0 (`meta.outer_clip`), the two updates summed; the inner gradient is
clipped per tensor at 2.0 as well (`meta.clip`). Exact second-order meta-gradient (the released
code is first order: `--config.meta.first_order=True`). Data as configs/deepall_prostate.py.
Not as released: the inner gradient here is that of the *mean* task loss, while TF's
tf.gradients of the per-sample loss vector sums over the batch (128 images per domain in the
PACS release), so the same clip of 2.0 bites far less often here; the task loss is one loss over
the pooled meta-train batch; every parameter (BN scale/offset included) is adapted.
Numbers: none (data not downloadable here; exercised by the tests).
"""

from medgen_jax.config import base_config, prostate6


def get_config():
  config = prostate6(base_config())
  config.method = "masf"
  config.batch_size = 15
  config.meta.inner_lr = 1e-4
  config.meta.clip = 2.0                  # inner gradient, per tensor (released value; see above)
  config.meta.optimizers = "released"     # task Adam + meta Adam, both at optimizer.learning_rate
  config.meta.outer_clip = 2.0            # meta gradient, per tensor, as released
  return config
