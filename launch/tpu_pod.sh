#!/usr/bin/env bash
# Train on every host of a Cloud TPU pod slice. Usage:
#   TPU=my-pod ZONE=us-central2-b CONFIG=configs/deepall_brain.py WORKDIR=gs://bucket/run bash launch/tpu_pod.sh
# Each host runs the same command; MEDGEN_JAX_DISTRIBUTED=1 makes medgen_jax call
# jax.distributed.initialize() before touching devices, and only process 0 writes files.
set -euo pipefail
: "${TPU:?set TPU}" "${ZONE:?set ZONE}" "${CONFIG:?set CONFIG}" "${WORKDIR:?set WORKDIR}"
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command \
  "cd medgen_jax && pip install -q -e . && MEDGEN_JAX_DISTRIBUTED=1 python -m medgen_jax.train --config $CONFIG --workdir $WORKDIR ${EXTRA_ARGS:-}"
