"""Methods: each file holds its loss and its train step, built from shared parts.

Every module exposes `make_train_step(model, tx, config, *, num_classes, axis_name, bn_sync,
metric_model=None, metric_tx=None, task_tx=None)` returning the pure `step(state, batch, key)`
(`task_tx`: MASF/SAML's second optimizer when `meta.optimizers='released'`), and `EPISODIC`
(True: batches come from the episodic sampler as {'meta_train': ..., 'meta_test': ...}).
"""

from medgen_jax.methods import deepall, masf, mldg, saml

MODULES = {"deepall": deepall, "separate": deepall, "mldg": mldg, "masf": masf, "saml": saml}
WITH_METRIC_NET = ("masf", "saml")


def is_episodic(name: str) -> bool:
  return getattr(MODULES[name], "EPISODIC", False)
