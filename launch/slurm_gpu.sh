#!/usr/bin/env bash
# One model on several GPU nodes with Slurm: one task per node (srun), each process driving every
# GPU of its node (pmap over its local devices), the processes joined by jax.distributed. Usage:
#   sbatch --nodes=2 --gres=gpu:8 launch/slurm_gpu.sh configs/deepall_brain.py runs/deepall_brain [--config.key=value ...]
# (EXPLICIT=1 sbatch ... passes the coordinator, process count and index as flags instead of
# letting jax.distributed.initialize() read them from the Slurm environment.)
# config.batch_size is the global batch over all GPUs of all nodes. Resubmitting the same command
# resumes from the workdir's newest checkpoint, and --requeue lets Slurm do it after a preemption.
#SBATCH --job-name=medgen_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,6p' "$0" >&2
  exit 2
fi
CONFIG=$1
WORKDIR=$2
shift 2

# Under Slurm, jax.distributed.initialize() gives each process only GPU number SLURM_LOCALID (its
# layout is one task per GPU) unless JAX_LOCAL_DEVICE_IDS names the devices: here every GPU of
# the node.
gpus=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L | wc -l)}
JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))
export JAX_LOCAL_DEVICE_IDS
echo "nodes: $SLURM_JOB_NODELIST ($SLURM_NNODES); GPUs per node: $gpus"

if [[ ${EXPLICIT:-0} == 1 ]]; then
  # the first node of the allocation hosts the coordinator
  first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  coordinator="$first:${PORT:-$((20000 + SLURM_JOB_ID % 10000))}"
  # shellcheck disable=SC2016  # expanded by each task's shell: its own SLURM_PROCID
  srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c 'exec python -m medgen_jax.train --config "$1" --workdir "$2" --coordinator_address "$3" --num_processes "$SLURM_NTASKS" --process_id "$SLURM_PROCID" "${@:4}"' \
    _ "$CONFIG" "$WORKDIR" "$coordinator" "$@"
else
  MEDGEN_JAX_DISTRIBUTED=1 srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
    python -m medgen_jax.train --config "$CONFIG" --workdir "$WORKDIR" "$@"
fi
