#!/usr/bin/env bash
# Run the same command on every host of a Cloud TPU pod slice; JAX discovers the topology itself.
#
#   launch/tpu_pod.sh TPU_NAME ZONE --config=configs/imagen_base64.py --workdir=/mnt/shared/runs/base64
#
# The repository must be checked out (and installed with `pip install -e .`) at the same path on every host, and
# the workdir must be one directory every host sees (Filestore/NFS, or a bucket mounted with gcsfuse).
# MODULE=diffusion_jax.train_autoencoder (or .sample, .evaluate) runs that job instead of diffusion_jax.main.
# DRY_RUN=1 prints the gcloud command instead of running it.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: [MODULE=diffusion_jax.main] $0 TPU_NAME ZONE [job flags...]" >&2
  exit 2
fi
name=$1; zone=$2; shift 2
repo=${REPO_DIR:-$(pwd)}
command=(gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all
  --command="cd ${repo} && python -m ${MODULE:-diffusion_jax.main} --auto_distributed $(printf '%q ' "$@")")
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${command[@]}"; echo
else
  "${command[@]}"
fi
