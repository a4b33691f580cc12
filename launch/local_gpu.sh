#!/usr/bin/env bash
# One machine, several GPUs, one process: the step is pmapped over every visible GPU. Usage:
#   CUDA_VISIBLE_DEVICES=0,1,2,3 bash launch/local_gpu.sh configs/deepall_brain.py runs/deepall_brain [--config.key=value ...]
# Without CUDA_VISIBLE_DEVICES every GPU is used. config.batch_size is the global batch: keep it a
# multiple of the number of GPUs (and of the number of source sites). Rerun the same command to
# resume from the workdir's newest checkpoint.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,6p' "$0" >&2
  exit 2
fi
CONFIG=$1
WORKDIR=$2
shift 2
echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-(all)}"
python -c 'import jax; print("devices:", jax.devices())'
python -m medgen_jax.train --config "$CONFIG" --workdir "$WORKDIR" "$@"
