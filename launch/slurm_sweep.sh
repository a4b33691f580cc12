#!/usr/bin/env bash
# A sweep as a plain Slurm job array: array task i runs the i-th of N disjoint slices of the runs
# (`sweep --shard i/N`), one GPU each; every run resumes if interrupted and is skipped if finished.
#   sbatch --array=1-8 launch/slurm_sweep.sh --config configs/deepall_brain.py \
#       --config configs/masf_brain.py --held-out all --seeds 3 --workdir runs/sweep_brain
# Then, once every task has finished, the table (the same flags):
#   python -m medgen_jax.sweep --config ... --workdir runs/sweep_brain --report
# Or let submitit make the array from the login node and wait for it:
#   python -m medgen_jax.sweep --executor slurm --slurm-gpus 1 --config ... --workdir ...
#SBATCH --job-name=medgen_sweep
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=%x-%A_%a.out
set -euo pipefail
: "${SLURM_ARRAY_TASK_ID:?submit with sbatch --array=1-N}"
# 1-based slice index whatever the array's first index (--array=0-7 or 1-8)
shard=$((SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN + 1))
python -m medgen_jax.sweep --shard "$shard/$SLURM_ARRAY_TASK_COUNT" "$@"
