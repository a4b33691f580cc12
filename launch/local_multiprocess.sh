#!/usr/bin/env bash
# Multi-host data parallelism on one machine: NUM_PROCESSES processes of `python -m medgen_jax.train`,
# each with DEVICES_PER_PROCESS fake CPU devices, joined by jax.distributed (gloo collectives). They
# compute what one process with NUM_PROCESSES x DEVICES_PER_PROCESS devices computes (tests/test_multihost.py),
# so this is how multi-host code is tried without a cluster. Usage:
#   bash launch/local_multiprocess.sh 2 2 --config configs/deepall_brain.py:quick --workdir runs/mh [--config.key=value ...]
# Rerunning the same command resumes from the workdir's checkpoints. If one process fails, the
# others are stopped (they would wait for it in the next collective) and the exit status is 1.
set -euo pipefail
if (( $# < 2 )); then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS --config CONFIG --workdir DIR [--config.key=value ...]" >&2
  exit 2
fi
NUM_PROCESSES=$1; DEVICES=$2; shift 2
PORT=${PORT:-$((20000 + RANDOM % 20000))}
# Each process gets its own device count; other XLA flags are kept.
XLA_REST=$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')
pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES $XLA_REST" JAX_PLATFORMS=cpu \
    python -m medgen_jax.train --coordinator_address "127.0.0.1:$PORT" \
    --num_processes "$NUM_PROCESSES" --process_id "$i" "$@" &
  pids+=($!)
done
status=0
for ((i = 0; i < NUM_PROCESSES; i++)); do
  if ! wait -n; then
    status=1
    kill "${pids[@]}" 2>/dev/null || true
  fi
done
exit "$status"
