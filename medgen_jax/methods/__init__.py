"""Methods: one module per method, each declaring what it trains and how (methods/base.py).

`get(name)` is the registry the trainer uses; adding a method is adding its module here.
Each module also keeps its lower-level `make_train_step(model, tx, config, ...)`, the step built
from given networks and optimizers, for tests and for users who bring their own networks.
"""

from __future__ import annotations

from medgen_jax.methods import deepall, intra_site, masf, mldg, saml
from medgen_jax.methods import epi_fcr, latreg, metareg
from medgen_jax.methods.uda import dann, source_only, supervised_target
from medgen_jax.methods.uda import adaoutput
from medgen_jax.methods.uda import adda, pnp_adanet
from medgen_jax.methods.uda import cycada, cyclegan, seuda, sifa
from medgen_jax.methods.multisite import msnet
from medgen_jax.methods.multisite import ummkd

MODULES = {
    # supervised and domain generalization
    "deepall": deepall, "separate": deepall, "mldg": mldg, "masf": masf, "saml": saml,
    "intra_site": intra_site, "epi_fcr": epi_fcr, "latreg": latreg, "metareg": metareg,
    # unsupervised domain adaptation (methods/uda/)
    "source_only": source_only, "dann": dann, "supervised_target": supervised_target,
    "adaoutput": adaoutput,
    "adda": adda, "pnp_adanet": pnp_adanet,
    "cyclegan": cyclegan, "seuda": seuda, "cycada": cycada, "sifa": sifa,
    # supervised multi-site (methods/multisite/)
    "msnet": msnet,
    # supervised multi-modal (methods/multisite/)
    "ummkd": ummkd,
}


def get(name: str):
  """The module of method `name`; a ValueError naming the choices otherwise."""
  if name not in MODULES:
    raise ValueError(f"config.method: unknown method {name!r}; use one of {', '.join(MODULES)}")
  return MODULES[name]


def label(config, sources) -> str:
  """The method's name in result tables."""
  module = get(config.method)
  return module.label(config, sources) if hasattr(module, "label") else module.LABEL


def model_runs(config, sources) -> list[tuple[str, list[str]]]:
  """[(model name, its source sites)] of one run: one model on all sources unless the method
  says otherwise (Separate: one per site)."""
  module = get(config.method)
  if hasattr(module, "model_runs"):
    return module.model_runs(config, sources)
  return [(config.method, list(sources))]


def uses_domains(config) -> bool:
  """True when the method's evaluation network takes each sample's domain id (DSBN, adapters,
  MS-Net, UMMKD: methods/base.py)."""
  module = get(config.method)
  return bool(module.uses_domains(config)) if hasattr(module, "uses_domains") else False
