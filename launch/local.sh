#!/usr/bin/env bash
# Run the main job as N processes on this machine (multi-host simulation over 127.0.0.1, gloo collectives).
#
#   launch/local.sh NUM_PROCESSES DEVICES_PER_PROCESS --config=configs/t2i_shapes.py --workdir=DIR [--config.x=y ...]
#
# Each process gets DEVICES_PER_PROCESS simulated CPU devices; process 0 is the coordinator.
# Exits non-zero if any process fails.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS [main flags...]" >&2
  exit 2
fi
num=$1; devices=$2; shift 2
port=${COORDINATOR_PORT:-$((20000 + RANDOM % 20000))}
python=${PYTHON:-python}
pids=()
for ((i = 0; i < num; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=${devices}" JAX_PLATFORMS=cpu \
    "$python" -m diffusion_jax.main --coordinator="127.0.0.1:${port}" --num_processes="$num" --process_id="$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
