#!/usr/bin/env bash
# Runs N superclip_jax processes on this machine, joined through jax.distributed — the way to
# try multi-process (multi-host) training without a cluster. On CPU each process can own
# several devices via XLA_FLAGS=--xla_force_host_platform_device_count=K.
#
#   launch/local_processes.sh 2 --config=configs/demo.py --workdir=/tmp/mp \
#       --config.total_steps=20
#
# MODULE=superclip_jax.evaluate runs the evaluation command the same way (default:
# superclip_jax.main); PYTHON=/path/to/python picks the interpreter (default: python on PATH).
#
# Process 0 writes logs and metrics; each process writes its own checkpoint shards.
# Cloud TPU pods and SLURM need no launcher flags: jax.distributed configures itself there.
set -euo pipefail
if [[ $# -lt 2 || ! "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: [MODULE=superclip_jax.evaluate] $0 NUM_PROCESSES [its flags...]" >&2
  exit 2
fi
n=$1; shift
port=${PORT:-$((20000 + RANDOM % 20000))}
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < n; i++)); do
  "${PYTHON:-python}" -m "${MODULE:-superclip_jax.main}" --coordinator_address="localhost:${port}" \
    --num_processes="$n" --process_id="$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
