#!/usr/bin/env bash
# One GPU node, all its GPUs data-parallel (pmap over local devices). Usage:
#   sbatch --gres=gpu:8 launch/slurm_gpu.sh configs/deepall_brain.py runs/deepall_brain [--config.key=value ...]
# Multi-node: add MEDGEN_JAX_DISTRIBUTED=1 and srun one task per node (jax reads the Slurm env).
#SBATCH --job-name=medgen_jax
#SBATCH --time=24:00:00
set -euo pipefail
CONFIG=$1; WORKDIR=$2; shift 2
srun python -m medgen_jax.train --config "$CONFIG" --workdir "$WORKDIR" "$@"
