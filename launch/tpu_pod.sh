#!/usr/bin/env bash
# One training run on every worker of a Cloud TPU VM pod slice.
#   launch/tpu_pod.sh TPU_NAME ZONE configs/arena_ppo.py gs://BUCKET/runs/arena_ppo [--config.x=y ...]
# Copies this checkout to every worker, installs the TPU set (BUILD.md) and starts the same
# command on all of them; JAX connects the workers itself on TPU pods.
set -euo pipefail
name=$1 zone=$2 config=$3 workdir=$4
shift 4
gcloud compute tpus tpu-vm scp --recurse --zone="$zone" --worker=all . "$name":~/mbjax
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="
  set -e; cd ~/mbjax
  [ -d .venv ] || { python3 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e '.[envs,video]' && .venv/bin/pip install -q 'jax[tpu]==0.10.2'; }
  .venv/bin/python -m experiments.train --config=$config --workdir=$workdir $*"
