"""LatReg on the six-site prostate collection, one site held out: the "LatReg [2]" row of SAML's
prostate table (Aslani et al., ISBI 2020; methods/latreg.py).

    python -m medgen_jax.train --config configs/latreg_prostate.py --workdir runs/latreg_prostate \
        --config.data.root=/path/to/Processed_data_nii --config.data.held_out='("BIDMC",)'

Data, preprocessing, loss and optimizer as configs/deepall_prostate.py (batch 10 pooled over the
5 source sites), plus the released "uniform entropy" regularizer: 0.3 · CE(uniform over the 5
sites, softmax(C_ψ(bottleneck))), C_ψ = Flatten → 2 × Dense(1024) + ReLU → Dense(5). At 384x384
the flattened bottleneck is 24x24x256 = 147,456 features, so C_ψ's first layer holds 151 M
weights (~1.8 GB with Adam's moments: a GPU run); `--config.latreg.pool=mean` reads the
spatial mean instead (256 features). SAML does not say which variant or weight it ran for its
LatReg row; this is the released default of the uniform variant.

Numbers: none (the prostate data cannot be downloaded here).
"""

from medgen_jax.config import base_config, prostate6


def get_config():
  config = prostate6(base_config())
  config.method = "latreg"
  config.batch_size = 10
  config.latreg.loss = "uniform"
  config.latreg.weight = 0.3
  return config
