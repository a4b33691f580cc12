"""Source only (no adaptation): DeepAll on the labelled source domain, tested on the target's
test cases: the "no adaptation" row of the cross-modality tables (SIFA's MR→CT 17.2 % Dice).

The same step, networks and optimizer as DeepAll (methods/deepall.py); the run is configured as
an adaptation run (data.target_adaptation=True) so that it tests on exactly the target cases
the adaptation methods test on, and never sees a target image.
"""

from __future__ import annotations

from medgen_jax.methods import deepall

LABEL = "Source only"
SAMPLER = "pooled"
init_state = deepall.init_state
make_step = deepall.make_step
eval_network = deepall.eval_network
make_train_step = deepall.make_train_step


def label(config, sources) -> str:
  return LABEL
