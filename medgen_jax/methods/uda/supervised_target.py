"""Supervised target (upper bound): DeepAll trained WITH the target domain's labels.

Configure it with the target as the only source (`data.sites=(target,)`, no held-out site): it
trains on the target's train cases, selects on its validation cases and tests on its test split,
which are the same test cases an adaptation run with that target tests on (data/splits.py: a
site's split does not depend on which sites are sources). Reported as "Supervised target
[target labels]": it uses labels no adaptation method may see.
"""

from __future__ import annotations

from medgen_jax.methods import deepall

LABEL = "Supervised target [target labels]"
SAMPLER = "pooled"
init_state = deepall.init_state
make_step = deepall.make_step
eval_network = deepall.eval_network
make_train_step = deepall.make_train_step


def label(config, sources) -> str:
  return LABEL


def validate(config) -> None:
  if config.data.held_out or config.data.get("target_adaptation"):
    raise ValueError("config.method='supervised_target' trains on the target with its labels: set "
                     "data.sites=(<target>,), data.held_out=() and data.target_adaptation=False")
