#!/usr/bin/env bash
# One training run on every worker of a Cloud TPU VM pod slice.
#   launch/tpu_pod.sh TPU_NAME ZONE configs/arena_ppo.py /mnt/shared/runs/arena_ppo [--config.x=y ...]
# Copies the checkout's tracked files to ~/mbjax on every worker, installs the TPU build there
# once (BUILD.md) with python3.11 — installed with apt where missing: the TPU VM images are
# Ubuntu 22.04, whose python3 is 3.10 (PYTHON=... for another interpreter >= 3.11) — then
# starts the same command on all workers; JAX connects the workers itself on TPU pods. The
# workdir must be a directory every worker sees (a Filestore or gcsfuse mount): all workers
# write one checkpoint, and experiments/train.py takes a local path, not a gs:// URL.
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1 zone=$2 config=$3 workdir=$4
shift 4
python=${PYTHON:-python3.11}
archive=$(mktemp --suffix=.tgz)
trap 'rm -f "$archive"' EXIT
git ls-files -z | tar --null -T - -czf "$archive"  # tracked files only: no .venv, no runs
gcloud compute tpus tpu-vm scp --zone="$zone" --worker=all "$archive" "$name":mbjax.tgz
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="
  set -e; mkdir -p ~/mbjax && tar -xzf ~/mbjax.tgz -C ~/mbjax && cd ~/mbjax
  command -v $python >/dev/null || { sudo apt-get update -qq &&
    sudo apt-get install -y -qq python3.11 python3.11-venv; }
  $python -c 'import sys; assert sys.version_info >= (3, 11), sys.version'
  [ -x .venv/bin/python ] || { $python -m venv .venv &&
    .venv/bin/pip install -q -c constraints.txt -e '.[envs,video,tpu]'; }
  .venv/bin/python -m experiments.train --config=$config --workdir=$workdir $*"
