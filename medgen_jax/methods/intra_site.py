"""Intra-site (the upper reference of the SAML prostate table, Liu, Dou & Heng, MICCAI 2020):
DeepAll trained and tested on ONE site's own cases — in a leave-one-domain-out table, the
held-out site's own training cases, so it uses labels a domain-generalization method never sees.

Configure it with the site as the only source (`data.sites=(site,)`, nothing held out; the sweep
does this for every held-out site): it trains on the site's train cases, selects on its
validation cases and is tested on its test split. Reported as "Intra-site [target labels]".
A site's split does not depend on which sites are sources (data/splits.py), but a held-out site
in a DG run is tested on ALL its cases, the intra-site row on its test split only: the rows are
comparable in expectation, not volume for volume.
"""

from __future__ import annotations

from medgen_jax.methods import deepall

LABEL = "Intra-site [target labels]"
SAMPLER = "pooled"
init_state = deepall.init_state
make_step = deepall.make_step
eval_network = deepall.eval_network
make_train_step = deepall.make_train_step
uses_domains = deepall.uses_domains


def label(config, sources) -> str:
  return LABEL + (" + BigAug" if config.augment.enabled else "")


def validate(config) -> None:
  if len(config.data.sites) != 1 or config.data.held_out or config.data.get("target_adaptation"):
    raise ValueError(f"config.method='intra_site' trains and tests on one site's own cases (data.sites="
                     f"{tuple(config.data.sites)}, data.held_out={tuple(config.data.held_out)}): set "
                     "data.sites=(<site>,) and data.held_out=() — the sweep does this for each held-out site")
