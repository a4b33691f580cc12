#!/usr/bin/env bash
# One model on every host of a Cloud TPU pod slice (TPU VMs), data-parallel over all its chips.
#
#   export TPU=medgen-pod ZONE=us-central2-b ACCELERATOR=v4-32   # VERSION, PROJECT, SPOT optional
#   bash launch/tpu_pod.sh create          # the slice (SPOT=1: a spot slice, cheaper, preemptible)
#   bash launch/tpu_pod.sh copy            # this checkout to every worker, installed with jax[tpu]
#   bash launch/tpu_pod.sh run configs/deepall_brain.py gs://BUCKET/runs/deepall_brain [--config.key=value ...]
#   bash launch/tpu_pod.sh resume configs/deepall_brain.py gs://BUCKET/runs/deepall_brain [...]
#   bash launch/tpu_pod.sh delete
#
# `run` starts the same command on every worker (gcloud ... ssh --worker=all). With
# MEDGEN_JAX_DISTRIBUTED=1 each process calls jax.distributed.initialize(), which on TPU VMs finds
# the coordinator, the number of processes and its own index from the TPU metadata; only process 0
# writes files. Rerunning `run` resumes from the workdir's newest checkpoint. After a preemption
# (spot slice) the VMs and their disks are gone: `resume` deletes the preempted slice, creates and
# copies a new one, then runs; give a bucket (gs://...) as the workdir so the checkpoints survive.
# `run` streams every worker's output and stops when the ssh session ends: start it inside tmux or
# screen on your machine. For queued resources (`gcloud compute tpus queued-resources create`),
# create the slice that way and use `copy` and `run` as here.
set -euo pipefail

usage() {
  sed -n '2,10p' "$0" >&2
  exit 2
}

: "${TPU:?set TPU (the slice name)}" "${ZONE:?set ZONE (e.g. us-central2-b)}"
ACCELERATOR=${ACCELERATOR:-v4-32}
VERSION=${VERSION:-tpu-ubuntu2204-base}
REPO=$(cd "$(dirname "$0")/.." && pwd)
project_flag=()
if [[ -n ${PROJECT:-} ]]; then
  project_flag=(--project="$PROJECT")
fi

tpu() {  # gcloud compute tpus tpu-vm SUBCOMMAND ... with the slice's zone and project
  local subcommand=$1
  shift
  gcloud compute tpus tpu-vm "$subcommand" "$@" --zone="$ZONE" "${project_flag[@]}"
}

on_all_workers() {
  tpu ssh "$TPU" --worker=all --command="$1"
}

create() {
  local spot=()
  if [[ ${SPOT:-0} == 1 ]]; then
    spot=(--spot)
  fi
  tpu create "$TPU" --accelerator-type="$ACCELERATOR" --version="$VERSION" "${spot[@]}"
}

copy() {
  # The files git knows of (tracked, with their uncommitted edits, and untracked but not ignored):
  # no virtual environments, runs or caches.
  local tarball
  tarball=$(mktemp "${TMPDIR:-/tmp}/medgen_jax.XXXXXX.tar.gz")
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard |
    tar --null --files-from=- --ignore-failed-read -czf "$tarball")
  tpu scp "$tarball" "$TPU:medgen_jax.tar.gz" --worker=all
  rm -f "$tarball"
  # [gcs]: gs:// workdirs (gcsfs, google-cloud-storage); jax[tpu] of the same version as the jax that the project's pins resolve to (libtpu); the
  # $(...) is expanded on the workers
  # shellcheck disable=SC2016
  on_all_workers 'set -e; rm -rf medgen_jax; mkdir medgen_jax; tar -xzf medgen_jax.tar.gz -C medgen_jax
    python3 -m pip install -q -e "./medgen_jax[gcs]"
    python3 -m pip install -q "jax[tpu]==$(python3 -c "import jax; print(jax.__version__)")"'
}

run() {
  [[ $# -ge 2 ]] || usage
  local config workdir overrides
  config=$(printf %q "$1")
  workdir=$(printf %q "$2")
  shift 2
  overrides=$(printf '%q ' "$@")
  on_all_workers "cd medgen_jax && MEDGEN_JAX_DISTRIBUTED=1 python3 -m medgen_jax.train --config $config --workdir $workdir $overrides"
}

resume() {
  local state
  state=$(tpu describe "$TPU" --format='value(state)' 2>/dev/null || true)
  case $state in
    READY) ;;
    PREEMPTED | TERMINATED | STOPPED) delete && create && copy ;;
    '') create && copy ;;
    *) echo "error: slice $TPU is $state. Fix: wait until it is READY (or PREEMPTED), then resume" >&2
       exit 1 ;;
  esac
  run "$@"
}

delete() {
  tpu delete "$TPU" --quiet
}

[[ $# -ge 1 ]] || usage
command=$1
shift
case $command in
  create | copy | delete) "$command" ;;
  run | resume) "$command" "$@" ;;
  *) usage ;;
esac
