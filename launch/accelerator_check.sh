#!/usr/bin/env bash
# Installs the accelerator build and prints the check table (experiments/accelerator_check.py).
#   launch/accelerator_check.sh cuda12|tpu [--quick] [flags of experiments/accelerator_check.py]
#   launch/accelerator_check.sh cpu --quick      # no install: the existing CPU .venv
# Accelerator builds go to their own venv (.venv-cuda12, .venv-tpu; VENV=... to choose) from
# the pinned set: constraints.txt pins jax 0.10.2, whose cuda12/tpu extras pin the plugin
# (jax-cuda12-plugin 0.10.2) and libtpu (0.0.42.*).
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:?usage: launch/accelerator_check.sh cuda12|tpu|cpu [--quick] [flags]}
shift
python=${PYTHON:-python3}
case $kind in
  cuda12|tpu)
    venv=${VENV:-.venv-$kind}
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q -c constraints.txt -e ".[envs,$kind]"
    ;;
  cpu) venv=${VENV:-.venv} ;;
  *) echo "launch/accelerator_check.sh: unknown kind '$kind' (cuda12, tpu or cpu)" >&2; exit 2 ;;
esac
"$venv/bin/python" -m experiments.accelerator_check "$@"
